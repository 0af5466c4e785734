#pragma once
// A trainable tensor: value, gradient and a trainable flag. The gradient buffer exists only while
// the parameter is trainable, so a frozen base weight costs no gradient memory (the point of PEFT).
#include <cstdint>
#include <vector>

#include "peft/core/types.hpp"

namespace peft {

template <class T>
class Parameter {
 public:
  Parameter() = default;

  /// A [rows, cols] parameter; `vector = true` marks a 1-D tensor stored as a [1, cols] row
  /// (bias, norm scale), so files see the shape PyTorch uses.
  Parameter(Index rows, Index cols, bool trainable = true, bool vector = false)
      : value(Matrix<T>::Zero(rows, cols)), vector_(vector) {
    set_trainable(trainable);
  }

  Matrix<T> value;
  /// Accumulated gradient, same shape as `value`; empty while frozen.
  Matrix<T> grad;

  bool trainable() const { return trainable_; }

  void set_trainable(bool on) {
    trainable_ = on;
    if (on) {
      if (grad.rows() != value.rows() || grad.cols() != value.cols()) grad.setZero(value.rows(), value.cols());
    } else {
      grad.resize(0, 0);  // frees the buffer
    }
  }

  /// Zeroes the gradient; (re)sizes it to the value's shape if the value was replaced by a
  /// tensor of another shape (e.g. loaded from a file).
  void zero_grad() {
    if (trainable_) grad.setZero(value.rows(), value.cols());
  }

  /// The gradient buffer that backward accumulates into (`+=`), guaranteed to have the value's
  /// shape: a value replaced by one of another shape restarts the gradient at zero instead of
  /// letting backward write out of bounds. Costs a shape comparison (no allocation) when in sync.
  /// Call only on a trainable parameter.
  Matrix<T>& accumulator() {
    if (grad.rows() != value.rows() || grad.cols() != value.cols()) grad.setZero(value.rows(), value.cols());
    return grad;
  }

  Index size() const { return value.size(); }
  bool is_vector() const { return vector_; }

  /// The logical (PyTorch) shape: [n] for vectors, [rows, cols] otherwise.
  std::vector<std::int64_t> shape() const {
    if (vector_) return {static_cast<std::int64_t>(value.cols())};
    return {static_cast<std::int64_t>(value.rows()), static_cast<std::int64_t>(value.cols())};
  }

 private:
  bool trainable_ = false;
  bool vector_ = false;
};

}  // namespace peft
