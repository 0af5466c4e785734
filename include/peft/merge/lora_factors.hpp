#pragma once
// LoraFactors: one low-rank update as plain data, ΔW = scaling · B · A (A [r, in], B [out, r]).
// The common currency of combine, extract and analysis, and what every adapter method that has a
// low-rank form converts to (see adapters/method.hpp). Data only: no layer, no file.
#include <string>

#include "peft/core/types.hpp"

namespace peft {

/// One LoRA adapter as factors: ΔW = scaling · B · A.
template <class T>
struct LoraFactors {
  Matrix<T> A;           ///< [r, in]
  Matrix<T> B;           ///< [out, r]
  double scaling = 1.0;  ///< s (alpha / r or alpha / √r for a trained adapter; 1 for results here)
  std::string name;      ///< optional, used in error messages

  Index rank() const { return A.rows(); }
  Index in_features() const { return A.cols(); }
  Index out_features() const { return B.rows(); }

  /// The dense update s · B · A [out, in]. Materializes out × in numbers: for tests and small layers.
  Matrix<T> delta() const {
    Matrix<T> d(out_features(), in_features());
    d.noalias() = static_cast<T>(scaling) * (B * A);
    return d;
  }
};

}  // namespace peft
