#pragma once
// Root-mean-square layer normalisation (Zhang & Sennrich, 2019, "Root Mean Square Layer
// Normalization"), as Hugging Face's LlamaRMSNorm / Qwen2RMSNorm / MistralRMSNorm compute it:
//
//   r = 1/√(mean_j x_j² + eps),  x̂ = x r,  y = γ ⊙ x̂           γ [d] (ones at init), no bias
//
// (HF computes x̂ in float32 and casts back to the input dtype before the γ product; here everything
// is in T.) Backward per row, with g = dy ⊙ γ:
//   dx = r (g − x̂ mean(g ⊙ x̂)),   dγ += Σ_rows dy ⊙ x̂.
#include <cmath>
#include <string>

#include "peft/core/check.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parallel.hpp"

namespace peft {

template <class T>
class RMSNorm : public Module<T> {
 public:
  /// What backward needs: x̂ and r per row.
  struct Cache {
    Matrix<T> xhat;     ///< [rows, d]
    ColVector<T> rstd;  ///< r [rows]
  };

  RMSNorm() = default;

  explicit RMSNorm(Index dim, double eps = 1e-6, std::string name = "") : Module<T>(std::move(name)), eps_(eps) {
    if (dim <= 0) throw ShapeError(describe("RMSNorm", this->name()) + ": dim must be > 0, got " + std::to_string(dim));
    check::positive("RMSNorm", this->name(), "eps", eps);
    weight = Parameter<T>(1, dim, true, true);
    weight.value.setOnes();
  }

  Parameter<T> weight;  ///< γ [d] (stored [1, d])

  Index dim() const { return weight.value.cols(); }
  double eps() const { return eps_; }

  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache);
  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }
  /// Accumulates dγ when trainable; writes dx unless null.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx);

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override { fn("weight", weight); }

 private:
  double eps_ = 1e-6;
};

// ---- RMSNorm members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
void RMSNorm<T>::forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
  check::input_features("RMSNorm", this->name(), x.cols(), dim());
  const Index rows = x.rows(), d = dim();
  const T inv_d = T(1) / static_cast<T>(d);
  const T eps = static_cast<T>(eps_);
  cache.xhat.resize(rows, d);
  cache.rstd.resize(rows);
  y.resize(rows, d);
  parallel_rows(rows, 6.0 * static_cast<double>(d), [&](Index begin, Index end) {  // rows are independent
    for (Index i = begin; i < end; ++i) {
      const T r = T(1) / std::sqrt(x.row(i).squaredNorm() * inv_d + eps);  // 1/√(mean x² + eps)
      cache.rstd(i) = r;
      cache.xhat.row(i) = x.row(i) * r;                                            // x̂ = x r
      y.row(i).array() = cache.xhat.row(i).array() * weight.value.row(0).array();  // y = γ ⊙ x̂
    }
  });
}

template <class T>
void RMSNorm<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
  check::shape("RMSNorm", this->name(), "output gradient", dy.rows(), dy.cols(), cache.xhat.rows(), dim());
  if (weight.trainable())  // dγ += Σ dy ⊙ x̂ (columns split between threads, rows summed in order)
    add_column_product_sums<T>(dy, cache.xhat, weight.accumulator().data());
  if (dx == nullptr) return;
  const Index rows = dy.rows(), d = dim();
  const T inv_d = T(1) / static_cast<T>(d);
  dx->resize(rows, d);
  Matrix<T>& out = *dx;
  parallel_rows(rows, 8.0 * static_cast<double>(d), [&](Index begin, Index end) {
    for (Index i = begin; i < end; ++i) {
      // g = dy ⊙ γ;  dx = r (g − x̂ mean(g ⊙ x̂))   [d]
      const T m = (dy.row(i).array() * weight.value.row(0).array() * cache.xhat.row(i).array()).sum() * inv_d;
      out.row(i).array() =
          cache.rstd(i) * (dy.row(i).array() * weight.value.row(0).array() - cache.xhat.row(i).array() * m);
    }
  });
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class RMSNorm<float>;
extern template class RMSNorm<double>;
}  // namespace peft
#endif
