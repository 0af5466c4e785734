#pragma once
// Scalar-templated Eigen aliases. Everything is row-major like PyTorch and safetensors:
// weights are [out, in], activations [rows, features], so file buffers map without transposes.
#include <Eigen/Core>

#include <cstdint>
#include <string>

namespace peft {

using Index = Eigen::Index;

template <class T>
using Matrix = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

/// A 1-D tensor (bias, norm scale, magnitude vector) is stored as a [1, n] row.
template <class T>
using RowVector = Eigen::Matrix<T, 1, Eigen::Dynamic, Eigen::RowMajor>;

template <class T>
using ColVector = Eigen::Matrix<T, Eigen::Dynamic, 1>;

/// Read-only view of any row-major block (no copy for Matrix, Map or row blocks).
template <class T>
using ConstMatrixRef = Eigen::Ref<const Matrix<T>>;

/// Writable view of a row-major block.
template <class T>
using MatrixRef = Eigen::Ref<Matrix<T>>;

template <class T>
using MatrixMap = Eigen::Map<Matrix<T>>;

template <class T>
using ConstMatrixMap = Eigen::Map<const Matrix<T>>;

/// "[rows, cols]" for error messages.
inline std::string shape_str(Index rows, Index cols) {
  return "[" + std::to_string(rows) + ", " + std::to_string(cols) + "]";
}

template <class Derived>
std::string shape_str(const Eigen::EigenBase<Derived>& m) {
  return shape_str(m.rows(), m.cols());
}

/// Whether every entry is finite, as Eigen's allFinite() but vectorized: x · 0 is 0 for a finite x
/// and NaN for ±Inf or NaN, and a sum of zeros cannot overflow, so the sum is NaN iff some entry
/// is not finite. allFinite() stops at the first bad entry but checks one scalar at a time, which
/// made it most of a streaming merge's CPU time.
template <class Derived>
bool all_finite(const Eigen::DenseBase<Derived>& m) {
  using Scalar = typename Derived::Scalar;
  if (m.size() == 0) return true;
  const Scalar z = (m.derived().array() * Scalar(0)).sum();
  return z == z;  // false only for NaN
}

}  // namespace peft
