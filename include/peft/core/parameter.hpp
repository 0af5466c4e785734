#pragma once
// A trainable tensor: value, gradient and a trainable flag. The gradient buffer exists only while
// the parameter is trainable, so a frozen base weight costs no gradient memory (the point of PEFT).
#include <atomic>
#include <cstdint>
#include <utility>
#include <vector>

#include "peft/core/types.hpp"

namespace peft {

namespace detail {
/// Advanced whenever the set of trainable parameters may have changed anywhere in the program.
inline std::atomic<std::uint64_t> parameter_epoch_counter{0};
inline void touch_parameters() { parameter_epoch_counter.fetch_add(1, std::memory_order_relaxed); }
}  // namespace detail

/// A number that changes whenever a Parameter is created (copied, moved), destroyed, or changes
/// trainability, anywhere in the program. An optimizer compares it with the value at its last check
/// of the model, so that a step re-checks the model only after such a change and otherwise costs
/// one load (see optim/optimizer.hpp).
inline std::uint64_t parameter_epoch() { return detail::parameter_epoch_counter.load(std::memory_order_relaxed); }

template <class T>
class Parameter {
 public:
  Parameter() = default;  // empty and frozen: nothing for an optimizer to miss
  Parameter(const Parameter& o) : value(o.value), grad(o.grad), trainable_(o.trainable_), vector_(o.vector_) {
    detail::touch_parameters();
  }
  Parameter(Parameter&& o) noexcept
      : value(std::move(o.value)), grad(std::move(o.grad)), trainable_(o.trainable_), vector_(o.vector_) {
    detail::touch_parameters();
  }
  Parameter& operator=(const Parameter& o) {
    if (this != &o) assign(o.value, o.grad, o.trainable_, o.vector_);
    return *this;
  }
  Parameter& operator=(Parameter&& o) noexcept {
    if (this != &o) {
      if (trainable_ != o.trainable_) detail::touch_parameters();
      value = std::move(o.value);
      grad = std::move(o.grad);
      trainable_ = o.trainable_;
      vector_ = o.vector_;
    }
    return *this;
  }
  ~Parameter() { detail::touch_parameters(); }

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
    if (on != trainable_) detail::touch_parameters();
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
  void assign(const Matrix<T>& v, const Matrix<T>& g, bool trainable, bool vector) {
    if (trainable_ != trainable) detail::touch_parameters();
    value = v;
    grad = g;
    trainable_ = trainable;
    vector_ = vector;
  }

  bool trainable_ = false;
  bool vector_ = false;
};

}  // namespace peft
