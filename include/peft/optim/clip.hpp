#pragma once
// Global-norm gradient clipping, as torch.nn.utils.clip_grad_norm_ (Pascanu et al., 2013, "On the
// difficulty of training recurrent neural networks"):
//   total = (Σ_params ‖g_p‖_q^q)^(1/q)   (q = norm_type; q = ∞: max_p max|g_p|)
//   coef  = max_norm / (total + 1e-6);  when coef < 1 every gradient is multiplied by coef.
// Returns the total norm before clipping. Only trainable parameters (which have gradients) count.
// A NaN or Inf total norm throws NumericError (torch's error_if_nonfinite=True, the safer
// default here); with error_if_nonfinite = false we do what torch does: scale by the NaN/0
// coefficient, which poisons the gradients visibly rather than silently skipping the clip.
// Norms are accumulated in double.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parameters.hpp"

namespace peft {

struct ClipOptions {
  double norm_type = 2.0;  ///< q > 0, or std::numeric_limits<double>::infinity()
  bool error_if_nonfinite = true;
};

/// Clips the gradients of `params` in place to a global q-norm of at most max_norm; returns the
/// norm before clipping.
template <class T>
double clip_grad_norm(const std::vector<NamedParameter<T>>& params, double max_norm, const ClipOptions& options = {}) {
  if (!std::isfinite(max_norm) || max_norm <= 0.0)
    throw ConfigError("clip_grad_norm: max_norm must be finite and > 0, got " + check::num(max_norm));
  const double q = options.norm_type;
  const bool inf_norm = std::isinf(q) && q > 0.0;
  if (!inf_norm && (!std::isfinite(q) || q <= 0.0))
    throw ConfigError("clip_grad_norm: norm_type must be > 0 or infinity, got " + check::num(q));
  double acc = 0.0;
  for (const NamedParameter<T>& np : params) {
    if (np.param == nullptr) throw ConfigError("clip_grad_norm: parameter \"" + np.name + "\" is null");
    const Parameter<T>& p = *np.param;
    if (!p.trainable() || p.grad.size() == 0) continue;
    if (inf_norm) {
      const double m = static_cast<double>(p.grad.cwiseAbs().maxCoeff());
      acc = (std::isnan(m) || std::isnan(acc)) ? std::numeric_limits<double>::quiet_NaN() : std::max(acc, m);
    } else if (q == 2.0) {
      acc += p.grad.template cast<double>().squaredNorm();
    } else if (q == 1.0) {
      acc += p.grad.template cast<double>().cwiseAbs().sum();
    } else {
      acc += p.grad.template cast<double>().cwiseAbs().array().pow(q).sum();
    }
  }
  const double total = inf_norm ? acc : (q == 2.0 ? std::sqrt(acc) : (q == 1.0 ? acc : std::pow(acc, 1.0 / q)));
  if (!std::isfinite(total) && options.error_if_nonfinite)
    throw NumericError("clip_grad_norm: the total gradient norm is " + check::num(total) +
                       " (NaN or Inf gradients); set ClipOptions::error_if_nonfinite = false to clip anyway");
  const double coef = max_norm / (total + 1e-6);
  if (coef < 1.0 || std::isnan(coef)) {
    const T c = static_cast<T>(coef);
    for (const NamedParameter<T>& np : params)
      if (np.param->trainable()) np.param->grad *= c;
  }
  return total;
}

/// Clips the gradients of every trainable parameter of `module`.
template <class T>
double clip_grad_norm(Module<T>& module, double max_norm, const ClipOptions& options = {}) {
  return clip_grad_norm(trainable_parameters(module), max_norm, options);
}

}  // namespace peft
