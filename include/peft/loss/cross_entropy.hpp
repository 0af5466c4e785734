#pragma once
// Softmax cross-entropy with label smoothing and an ignore index, as torch.nn.functional.cross_entropy
// (reduction="mean", no class weights) computes it.
//
// For row i with logits z_i [C] and label y_i (Szegedy et al., 2016, "Rethinking the Inception
// Architecture", §7 for label smoothing; torch's formulation):
//   log p_ic = z_ic − logsumexp(z_i),  logsumexp computed as m + log Σ_c exp(z_ic − m), m = max_c z_ic
//   ℓ_i      = (1 − ε) · (−log p_{i,y_i}) + ε · (1/C) Σ_c (−log p_ic)
//   L        = (1/N) Σ_{i not ignored} ℓ_i,   N = number of rows with y_i ≠ ignore_index
//   ∂L/∂z_ic = (p_ic − (1 − ε)·[c = y_i] − ε/C) / N  for kept rows, 0 for ignored rows.
//
// Reduction: mean over the non-ignored rows, like torch. When every row is ignored torch returns
// NaN (0/0); we return 0 with an all-zero gradient instead, so a fully padded micro-batch adds
// nothing to training rather than poisoning it.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/loss/common.hpp"

namespace peft {

struct CrossEntropyOptions {
  double label_smoothing = 0.0;      ///< ε in [0, 1]
  std::int64_t ignore_index = -100;  ///< rows with this label contribute nothing (torch default)
};

/// Mean softmax cross-entropy over the non-ignored rows of `logits` [rows, classes]; writes
/// ∂L/∂logits into *dlogits (resized only when its shape differs) unless dlogits is null.
template <class T>
T cross_entropy(const ConstMatrixRef<T>& logits, const std::vector<std::int64_t>& labels, Matrix<T>* dlogits,
                const CrossEntropyOptions& options = {}) {
  const Index n = logits.rows();
  const Index c = logits.cols();
  if (static_cast<Index>(labels.size()) != n)
    throw ShapeError("cross_entropy: " + std::to_string(labels.size()) + " labels for logits of shape " +
                     shape_str(n, c) + ", expected " + std::to_string(n));
  if (c == 0) throw ShapeError("cross_entropy: logits of shape " + shape_str(n, c) + " have no classes, expected >= 1");
  const double eps = options.label_smoothing;
  if (!std::isfinite(eps) || eps < 0.0 || eps > 1.0)
    throw ConfigError("cross_entropy: label_smoothing must be in [0, 1], got " + check::num(eps));
  Index kept = 0;
  for (Index i = 0; i < n; ++i) {
    const std::int64_t y = labels[static_cast<std::size_t>(i)];
    if (y == options.ignore_index) continue;
    if (y < 0 || y >= static_cast<std::int64_t>(c))
      throw ShapeError("cross_entropy: label at row " + std::to_string(i) + " is " + std::to_string(y) +
                       ", expected a class in [0, " + std::to_string(c) + ") or ignore_index " +
                       std::to_string(options.ignore_index));
    ++kept;
  }
  detail::check_finite_rows<T>("cross_entropy", logits, "logits");
  if (dlogits) {
    if (dlogits->rows() != n || dlogits->cols() != c) dlogits->resize(n, c);
  }
  if (kept == 0) {
    if (dlogits) dlogits->setZero();
    return T(0);
  }
  const T inv_n = T(1) / static_cast<T>(kept);
  const T smooth = static_cast<T>(eps);
  const T inv_c = T(1) / static_cast<T>(c);
  double total = 0.0;  // accumulate in double: N rows of O(log C) terms
  for (Index i = 0; i < n; ++i) {
    const std::int64_t y = labels[static_cast<std::size_t>(i)];
    if (y == options.ignore_index) {
      if (dlogits) dlogits->row(i).setZero();
      continue;
    }
    const auto z = logits.row(i);
    const T m = z.maxCoeff();
    const T sum_exp = (z.array() - m).exp().sum();
    const T lse = m + std::log(sum_exp);  // logsumexp(z), stable: every exponent ≤ 0
    // −log p_y = lse − z_y;  (1/C) Σ_c −log p_c = lse − mean(z)
    const T nll = lse - z(static_cast<Index>(y));
    const T smooth_term = lse - z.sum() * inv_c;
    total += static_cast<double>((T(1) - smooth) * nll + smooth * smooth_term);
    if (dlogits) {
      auto g = dlogits->row(i);
      // ∂ℓ_i/∂z_c = p_c − ε/C − (1 − ε)[c = y]; then divided by N for the mean
      g.array() = ((z.array() - lse).exp() - smooth * inv_c) * inv_n;
      g(static_cast<Index>(y)) -= (T(1) - smooth) * inv_n;
    }
  }
  return static_cast<T>(total / static_cast<double>(kept));
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_CROSS_ENTROPY_TEMPLATES(KW, T)                                                              \
  KW template T cross_entropy<T>(const ConstMatrixRef<T>&, const std::vector<std::int64_t>&, Matrix<T>*, \
                                 const CrossEntropyOptions&);
namespace peft {
PEFT_CROSS_ENTROPY_TEMPLATES(extern, float)
PEFT_CROSS_ENTROPY_TEMPLATES(extern, double)
}  // namespace peft
#endif
