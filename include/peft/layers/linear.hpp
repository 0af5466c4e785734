#pragma once
// Linear layer: y = x Wᵀ + b, W [out, in], b [out], x [rows, in], y [rows, out] (torch.nn.Linear).
//
// Backward returns dX and accumulates dW, db only when they are trainable: a frozen base never
// pays for the weight-gradient GEMM, and its forward cache stores nothing.
#include <string>

#include "peft/core/check.hpp"
#include "peft/core/gemm.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parallel.hpp"

namespace peft {

template <class T>
class Linear : public Module<T> {
 public:
  /// What backward needs: x, and only when W is trainable (dW = dYᵀ X).
  struct Cache {
    Matrix<T> x;
    Index rows = 0;
  };

  Linear() = default;

  /// torch.nn.Linear's init: W ~ kaiming_uniform(a=√5) = U(±1/√in), b ~ U(±1/√in).
  Linear(Index in_features, Index out_features, Rng& rng, bool with_bias = true, std::string name = "");

  /// Wraps existing weights (e.g. loaded from a file). `b` may be empty for no bias.
  Linear(Matrix<T> w, const RowVector<T>& b, std::string name = "") : Module<T>(std::move(name)) {
    if (w.rows() == 0 || w.cols() == 0)
      throw ShapeError(describe("Linear", this->name()) + ": weight has shape " + shape_str(w) +
                       ", expected non-empty [out, in]");
    weight.value = std::move(w);
    weight.set_trainable(true);
    if (b.size() > 0) {
      check::shape("Linear", this->name(), "bias", 1, b.size(), 1, weight.value.rows());
      bias = Parameter<T>(1, b.size(), true, true);
      bias.value = b;
    }
  }

  Parameter<T> weight;
  Parameter<T> bias;

  Index in_features() const { return weight.value.cols(); }
  Index out_features() const { return weight.value.rows(); }
  bool has_bias() const { return bias.size() > 0; }

  /// y = x Wᵀ + b. `y` is resized only when its shape changes, so a reused buffer never reallocates.
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache);

  /// The same output with nothing kept for backward (serving, evaluation).
  void forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y) const {
    check::input_features("Linear", this->name(), x.cols(), in_features());
    y.resize(x.rows(), out_features());
    gemm(y, x, weight.value.transpose());  // [rows, out]
    if (has_bias()) parallel_add_to_rows<T>(y, bias.value);
  }

  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }

  /// Accumulates dW, db (when trainable) and writes dX into *dx unless dx is null.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx);

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    fn("weight", weight);
    if (has_bias()) fn("bias", bias);
  }
};

// ---- Linear members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
Linear<T>::Linear(Index in_features, Index out_features, Rng& rng, bool with_bias, std::string name)
    : Module<T>(std::move(name)) {
  if (in_features <= 0 || out_features <= 0)  // before any sizing: a negative size would abort in Eigen
    throw ShapeError(describe("Linear", this->name()) + ": features must be > 0, got in=" +
                     std::to_string(in_features) + ", out=" + std::to_string(out_features));
  weight = Parameter<T>(out_features, in_features, true);
  if (with_bias) bias = Parameter<T>(1, out_features, true, true);
  init::kaiming_uniform<T>(weight.value, rng);
  if (has_bias()) {
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
    init::uniform<T>(bias.value, rng, -bound, bound);
  }
}

template <class T>
void Linear<T>::forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
  check::input_features("Linear", this->name(), x.cols(), in_features());
  y.resize(x.rows(), out_features());
  gemm(y, x, weight.value.transpose());  // [rows, out]
  if (has_bias()) parallel_add_to_rows<T>(y, bias.value);
  cache.rows = x.rows();
  if (weight.trainable())
    parallel_assign<T>(cache.x, x);
  else
    cache.x.resize(0, 0);  // frozen: keep no activation (and never reuse a stale one)
}

template <class T>
void Linear<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
  check::shape("Linear", this->name(), "output gradient", dy.rows(), dy.cols(), cache.rows, out_features());
  if (weight.trainable()) {
    check::shape("Linear", this->name(), "cached input", cache.x.rows(), cache.x.cols(), cache.rows, in_features());
    gemm(weight.accumulator(), dy.transpose(), cache.x, T(1), true);  // dW += dYᵀ X   [out, in]
  }
  if (has_bias() && bias.trainable()) add_column_sums<T>(dy, bias.accumulator().data());  // db = Σ_rows dY
  if (dx != nullptr) {
    dx->resize(dy.rows(), in_features());
    gemm(*dx, dy, weight.value);  // dX = dY W   [rows, in]
  }
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class Linear<float>;
extern template class Linear<double>;
}  // namespace peft
#endif
