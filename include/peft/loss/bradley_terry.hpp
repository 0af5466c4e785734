#pragma once
// Bradley–Terry pairwise preference loss for reward models (Bradley & Terry, 1952; the reward-model
// objective of Ouyang et al., 2022, "Training language models to follow instructions", eq. 1):
//   L = (1/N) Σ_i −log σ(r⁺_i − r⁻_i) = (1/N) Σ_i softplus(−d_i),   d_i = r⁺_i − r⁻_i
// computed stably as softplus(x) = max(x, 0) + log1p(exp(−|x|)), which never overflows.
//   ∂L/∂r⁺_i = −σ(−d_i)/N,   ∂L/∂r⁻_i = +σ(−d_i)/N
// With a margin m_i (Llama 2): d_i = r⁺_i − r⁻_i − m_i, the same formulas.
// N is the number of pairs: rewards are [N, 1] (one score per row), or any equal shapes, in which
// case every element is one pair.
#include <algorithm>
#include <cmath>
#include <string>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/loss/common.hpp"

namespace peft {

namespace detail {
/// softplus(x) = log(1 + eˣ) without overflow.
template <class T>
T stable_softplus(T x) {
  return std::max(x, T(0)) + std::log1p(std::exp(-std::abs(x)));
}
/// σ(x) without overflow: both branches only exponentiate a non-positive number.
template <class T>
T stable_sigmoid(T x) {
  if (x >= T(0)) return T(1) / (T(1) + std::exp(-x));
  const T e = std::exp(x);
  return e / (T(1) + e);
}
}  // namespace detail

namespace detail {
template <class T>
T bradley_terry_impl(const ConstMatrixRef<T>& chosen, const ConstMatrixRef<T>& rejected,
                     const ConstMatrixRef<T>* margin, Matrix<T>* dchosen, Matrix<T>* drejected) {
  if (chosen.rows() != rejected.rows() || chosen.cols() != rejected.cols())
    throw ShapeError("bradley_terry: chosen rewards have shape " + shape_str(chosen.rows(), chosen.cols()) +
                     ", rejected rewards have shape " + shape_str(rejected.rows(), rejected.cols()) +
                     ", expected equal shapes");
  detail::check_finite_rows<T>("bradley_terry", chosen, "chosen");
  detail::check_finite_rows<T>("bradley_terry", rejected, "rejected");
  if (margin != nullptr) {
    if (margin->rows() != chosen.rows() || margin->cols() != chosen.cols())
      throw ShapeError("bradley_terry: margins have shape " + shape_str(margin->rows(), margin->cols()) +
                       ", expected the rewards' shape " + shape_str(chosen.rows(), chosen.cols()));
    detail::check_finite_rows<T>("bradley_terry", *margin, "margin");
  }
  const Index rows = chosen.rows();
  const Index cols = chosen.cols();
  if (dchosen && (dchosen->rows() != rows || dchosen->cols() != cols)) dchosen->resize(rows, cols);
  if (drejected && (drejected->rows() != rows || drejected->cols() != cols)) drejected->resize(rows, cols);
  const Index count = chosen.size();
  if (count == 0) return T(0);
  const T inv_n = T(1) / static_cast<T>(count);
  double total = 0.0;
  for (Index i = 0; i < rows; ++i) {
    for (Index j = 0; j < cols; ++j) {
      const T d = chosen(i, j) - rejected(i, j) - (margin != nullptr ? (*margin)(i, j) : T(0));
      total += static_cast<double>(detail::stable_softplus(-d));
      const T g = detail::stable_sigmoid(-d) * inv_n;  // σ(−d)/N
      if (dchosen) (*dchosen)(i, j) = -g;
      if (drejected) (*drejected)(i, j) = g;
    }
  }
  return static_cast<T>(total / static_cast<double>(count));
}
}  // namespace detail

/// Mean of −log σ(chosen − rejected); writes the gradients for both reward tensors (resized only
/// when needed) unless the pointers are null. Empty inputs give 0.
template <class T>
T bradley_terry(const ConstMatrixRef<T>& chosen, const ConstMatrixRef<T>& rejected, Matrix<T>* dchosen,
                Matrix<T>* drejected) {
  return detail::bradley_terry_impl<T>(chosen, rejected, nullptr, dchosen, drejected);
}

/// With a margin per pair (Llama 2's reward-model loss, Touvron et al., 2023, eq. 2):
/// mean of −log σ(chosen − rejected − margin), the margin [same shape] a constant (e.g. larger for
/// pairs rated as more clearly separated). The gradients are those above with d − m in place of d.
template <class T>
T bradley_terry(const ConstMatrixRef<T>& chosen, const ConstMatrixRef<T>& rejected, const ConstMatrixRef<T>& margin,
                Matrix<T>* dchosen, Matrix<T>* drejected) {
  return detail::bradley_terry_impl<T>(chosen, rejected, &margin, dchosen, drejected);
}

}  // namespace peft
