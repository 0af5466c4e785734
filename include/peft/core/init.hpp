#pragma once
// Weight initializers, matching torch.nn.init where a torch counterpart exists.
// Fan-in/fan-out follow torch for a [out, in] weight: fan_in = in = cols, fan_out = out = rows.
#include <cmath>
#include <string>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/types.hpp"

namespace peft::init {

template <class T>
void zeros(MatrixRef<T> w) {
  w.setZero();
}

template <class T>
void constant(MatrixRef<T> w, T value) {
  w.setConstant(value);
}

template <class T>
void uniform(MatrixRef<T> w, Rng& rng, double lo, double hi) {
  if (!std::isfinite(lo) || !std::isfinite(hi) || !(lo <= hi))
    throw ConfigError("init::uniform: bounds must be finite with lo <= hi, got lo=" + check::num(lo) +
                      ", hi=" + check::num(hi));
  for (Index i = 0; i < w.rows(); ++i)
    for (Index j = 0; j < w.cols(); ++j) w(i, j) = static_cast<T>(rng.uniform(lo, hi));
}

template <class T>
void normal(MatrixRef<T> w, Rng& rng, double mean, double stddev) {
  if (!(stddev >= 0.0) || !std::isfinite(stddev))
    throw ConfigError("init::normal: stddev must be finite and >= 0, got " + check::num(stddev));
  for (Index i = 0; i < w.rows(); ++i)
    for (Index j = 0; j < w.cols(); ++j) w(i, j) = static_cast<T>(rng.normal(mean, stddev));
}

/// Normal truncated to [mean - 2·std, mean + 2·std] by rejection (torch.nn.init.trunc_normal_ with
/// its default a=-2, b=2 when std=1; here the bounds scale with std as Houlsby adapters use them).
template <class T>
void truncated_normal(MatrixRef<T> w, Rng& rng, double mean, double stddev) {
  if (!(stddev >= 0.0) || !std::isfinite(stddev))
    throw ConfigError("init::truncated_normal: stddev must be finite and >= 0, got " + check::num(stddev));
  for (Index i = 0; i < w.rows(); ++i)
    for (Index j = 0; j < w.cols(); ++j) {
      double z = rng.normal();
      while (std::abs(z) > 2.0) z = rng.normal();
      w(i, j) = static_cast<T>(mean + stddev * z);
    }
}

/// torch.nn.init.kaiming_uniform_(w, a): bound = gain · √(3 / fan_in), gain = √(2 / (1 + a²)).
/// With a = √5 (nn.Linear's default and LoRA's A init) the bound is 1/√fan_in.
template <class T>
void kaiming_uniform(MatrixRef<T> w, Rng& rng, double a = std::sqrt(5.0)) {
  if (w.cols() == 0) throw ShapeError("init::kaiming_uniform: weight has fan_in 0");
  const double gain = std::sqrt(2.0 / (1.0 + a * a));
  const double bound = gain * std::sqrt(3.0 / static_cast<double>(w.cols()));
  uniform<T>(w, rng, -bound, bound);
}

/// torch.nn.init.xavier_uniform_: bound = gain · √(6 / (fan_in + fan_out)).
template <class T>
void xavier_uniform(MatrixRef<T> w, Rng& rng, double gain = 1.0) {
  const double bound = gain * std::sqrt(6.0 / static_cast<double>(w.rows() + w.cols()));
  uniform<T>(w, rng, -bound, bound);
}

/// torch.nn.init.xavier_normal_: std = gain · √(2 / (fan_in + fan_out)).
template <class T>
void xavier_normal(MatrixRef<T> w, Rng& rng, double gain = 1.0) {
  normal<T>(w, rng, 0.0, gain * std::sqrt(2.0 / static_cast<double>(w.rows() + w.cols())));
}

}  // namespace peft::init
