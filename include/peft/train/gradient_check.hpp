#pragma once
// Finite-difference gradient checking, used by the test suite and available to users who write
// their own layers. Central differences in double precision:
//   ∂L/∂θ_i ≈ (L(θ + ε e_i) − L(θ − ε e_i)) / 2ε,  error O(ε²).
// Compare with relative_error(g, ĝ) = ‖g − ĝ‖ / max(‖g‖ + ‖ĝ‖, tiny).
#include <algorithm>
#include <cmath>
#include <limits>

#include "peft/core/types.hpp"

namespace peft {

/// Relative error between two gradients; 0 when both are exactly zero.
template <class DerivedA, class DerivedB>
double relative_error(const Eigen::MatrixBase<DerivedA>& a, const Eigen::MatrixBase<DerivedB>& b) {
  const double diff = (a - b).template cast<double>().norm();
  const double scale = a.template cast<double>().norm() + b.template cast<double>().norm();
  return diff / std::max(scale, std::numeric_limits<double>::min());
}

/// Numerical gradient of loss() with respect to every entry of `x`, which loss() reads.
/// `x` is perturbed in place and restored exactly.
template <class T, class LossFn>
Matrix<T> numerical_gradient(Matrix<T>& x, LossFn&& loss, double eps = 1e-6) {
  Matrix<T> g(x.rows(), x.cols());
  for (Index i = 0; i < x.rows(); ++i) {
    for (Index j = 0; j < x.cols(); ++j) {
      const T saved = x(i, j);
      x(i, j) = static_cast<T>(saved + eps);
      const double up = static_cast<double>(loss());
      x(i, j) = static_cast<T>(saved - eps);
      const double down = static_cast<double>(loss());
      x(i, j) = saved;
      g(i, j) = static_cast<T>((up - down) / (2.0 * eps));
    }
  }
  return g;
}

}  // namespace peft
