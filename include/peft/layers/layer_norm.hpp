#pragma once
// Layer normalisation over the last dimension (Ba, Kiros & Hinton, 2016, "Layer Normalization"),
// with torch.nn.LayerNorm's semantics (biased variance, eps inside the square root):
//
//   μ = (1/d) Σ_j x_j,  σ² = (1/d) Σ_j (x_j − μ)²,  r = 1/√(σ² + eps),  x̂ = (x − μ) r
//   y = x̂ ⊙ γ + β                    (γ = 1, β = 0 at init; without affine y = x̂)
//
// Backward per row, with g = dy ⊙ γ:
//   dx = r (g − mean(g) − x̂ mean(g ⊙ x̂)),   dγ += Σ_rows dy ⊙ x̂,   dβ += Σ_rows dy.
#include <cmath>
#include <string>

#include "peft/core/check.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parallel.hpp"

namespace peft {

template <class T>
class LayerNorm : public Module<T> {
 public:
  /// What backward needs: x̂ and r per row.
  struct Cache {
    Matrix<T> xhat;     ///< [rows, d]
    ColVector<T> rstd;  ///< r [rows]
  };

  LayerNorm() = default;

  explicit LayerNorm(Index dim, double eps = 1e-5, bool affine = true, std::string name = "")
      : Module<T>(std::move(name)), eps_(eps), dim_(dim) {
    const std::string who = describe("LayerNorm", this->name());
    if (dim <= 0) throw ShapeError(who + ": dim must be > 0, got " + std::to_string(dim));
    check::positive("LayerNorm", this->name(), "eps", eps);
    if (affine) {
      weight = Parameter<T>(1, dim, true, true);
      weight.value.setOnes();
      bias = Parameter<T>(1, dim, true, true);
    }
  }

  Parameter<T> weight;  ///< γ [d] (stored [1, d]); empty without affine
  Parameter<T> bias;    ///< β [d]; empty without affine

  Index dim() const { return dim_; }
  double eps() const { return eps_; }
  bool affine() const { return weight.size() > 0; }

  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache);

  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }

  /// The same output with nothing kept for backward (no x̂, no r): evaluation and serving. `y` is
  /// resized only when its shape changes; it must not share storage with `x`.
  void forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y) const;

  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx);

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    if (affine()) {
      fn("weight", weight);
      fn("bias", bias);
    }
  }

 private:
  double eps_ = 1e-5;
  Index dim_ = 0;
};

// ---- LayerNorm members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
void LayerNorm<T>::forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
  check::input_features("LayerNorm", this->name(), x.cols(), dim_);
  const Index rows = x.rows();
  const T inv_d = T(1) / static_cast<T>(dim_);
  cache.xhat.resize(rows, dim_);
  cache.rstd.resize(rows);
  y.resize(rows, dim_);
  const bool aff = affine();
  parallel_rows(rows, 8.0 * static_cast<double>(dim_), [&](Index begin, Index end) {  // rows are independent
    for (Index i = begin; i < end; ++i) {
      const T mu = x.row(i).sum() * inv_d;
      cache.xhat.row(i).array() = x.row(i).array() - mu;
      const T var = cache.xhat.row(i).squaredNorm() * inv_d;  // biased, as torch
      const T r = T(1) / std::sqrt(var + static_cast<T>(eps_));
      cache.rstd(i) = r;
      cache.xhat.row(i) *= r;
      if (aff)
        y.row(i).array() = cache.xhat.row(i).array() * weight.value.row(0).array() + bias.value.row(0).array();
      else
        y.row(i) = cache.xhat.row(i);
    }
  });
}

template <class T>
void LayerNorm<T>::forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y) const {
  check::input_features("LayerNorm", this->name(), x.cols(), dim_);
  const Index rows = x.rows();
  const T inv_d = T(1) / static_cast<T>(dim_);
  y.resize(rows, dim_);
  const bool aff = affine();
  parallel_rows(rows, 8.0 * static_cast<double>(dim_), [&](Index begin, Index end) {
    for (Index i = begin; i < end; ++i) {  // the operations of forward(), with y in place of x̂
      const T mu = x.row(i).sum() * inv_d;
      y.row(i).array() = x.row(i).array() - mu;
      const T var = y.row(i).squaredNorm() * inv_d;
      y.row(i) *= T(1) / std::sqrt(var + static_cast<T>(eps_));
      if (aff) y.row(i).array() = y.row(i).array() * weight.value.row(0).array() + bias.value.row(0).array();
    }
  });
}

template <class T>
void LayerNorm<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
  check::shape("LayerNorm", this->name(), "output gradient", dy.rows(), dy.cols(), cache.xhat.rows(), dim_);
  if (affine()) {  // columns split between threads, each summing its rows in order
    if (weight.trainable()) add_column_product_sums<T>(dy, cache.xhat, weight.accumulator().data());  // dγ
    if (bias.trainable()) add_column_sums<T>(dy, bias.accumulator().data());                          // dβ
  }
  if (dx == nullptr) return;
  dx->resize(dy.rows(), dim_);
  const T inv_d = T(1) / static_cast<T>(dim_);
  const bool aff = affine();
  Matrix<T>& out = *dx;
  parallel_rows(dy.rows(), 8.0 * static_cast<double>(dim_), [&](Index begin, Index end) {
    for (Index i = begin; i < end; ++i) {
      if (aff)
        out.row(i).array() = dy.row(i).array() * weight.value.row(0).array();  // g = dy ⊙ γ
      else
        out.row(i) = dy.row(i);
      const T mean_g = out.row(i).sum() * inv_d;
      const T mean_gx = out.row(i).dot(cache.xhat.row(i)) * inv_d;
      out.row(i).array() =
          cache.rstd(i) * (out.row(i).array() - mean_g - cache.xhat.row(i).array() * mean_gx);  // r (g − ḡ − x̂ ⟨g x̂⟩)
    }
  });
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class LayerNorm<float>;
extern template class LayerNorm<double>;
}  // namespace peft
#endif
