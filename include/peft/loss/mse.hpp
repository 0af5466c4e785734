#pragma once
// Mean squared error, torch.nn.functional.mse_loss with its default reduction="mean":
//   L = (1/(R·C)) Σ_ij (ŷ_ij − y_ij)²,   ∂L/∂ŷ = 2(ŷ − y)/(R·C)
// NOTE the reduction: the mean is over ALL elements (R·C), not over rows as the other losses do,
// because that is what torch computes; for a [R, 1] regression target the two coincide.
#include <string>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/loss/common.hpp"

namespace peft {

/// Mean over all elements of (prediction − target)²; writes ∂L/∂prediction into *dprediction
/// (resized only when needed) unless it is null. Empty inputs give 0.
template <class T>
T mse(const ConstMatrixRef<T>& prediction, const ConstMatrixRef<T>& target, Matrix<T>* dprediction) {
  if (prediction.rows() != target.rows() || prediction.cols() != target.cols())
    throw ShapeError("mse: prediction has shape " + shape_str(prediction.rows(), prediction.cols()) +
                     ", target has shape " + shape_str(target.rows(), target.cols()) + ", expected equal shapes");
  detail::check_finite_rows<T>("mse", prediction, "prediction");
  detail::check_finite_rows<T>("mse", target, "target");
  const Index count = prediction.size();
  if (dprediction && (dprediction->rows() != prediction.rows() || dprediction->cols() != prediction.cols()))
    dprediction->resize(prediction.rows(), prediction.cols());
  if (count == 0) return T(0);
  const T inv = T(1) / static_cast<T>(count);
  if (dprediction) dprediction->array() = (prediction.array() - target.array()) * (T(2) * inv);
  return (prediction - target).squaredNorm() * inv;
}

}  // namespace peft
