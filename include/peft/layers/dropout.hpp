#pragma once
// Inverted dropout (Srivastava et al., 2014, "Dropout: A Simple Way to Prevent Neural Networks
// from Overfitting"), as torch.nn.Dropout:
//
//   training:  y = x ⊙ m,  m_ij = 0 with probability p, else 1/(1 − p)      (so E[y] = x)
//   eval:      y = x
//   backward:  dx = dy ⊙ m   (eval: dx = dy)
//
// The layer owns a seeded peft::Rng (checkpointable through rng()), and the mask m lives in the
// Cache, so two forwards with two caches draw two masks and each backward uses its own.
#include <cstdint>
#include <string>

#include "peft/core/check.hpp"
#include "peft/core/module.hpp"
#include "peft/core/rng.hpp"

namespace peft {

template <class T>
class Dropout : public Module<T> {
 public:
  /// What backward needs: the multiplier m (empty when the forward was the identity).
  struct Cache {
    Matrix<T> keep;  ///< m [rows, cols]: 0 or 1/(1−p); empty in eval mode or with p = 0
    Index rows = 0;
    Index cols = 0;
  };

  Dropout() = default;

  /// p ∈ [0, 1). Throws ConfigError otherwise.
  explicit Dropout(double p, std::uint64_t seed = 0xd0, std::string name = "")
      : Module<T>(std::move(name)), p_(p), rng_(seed) {
    check::unit_interval_open("Dropout", this->name(), "p", p);
  }

  double p() const { return p_; }

  /// Whether forward currently draws a mask (train mode and p > 0).
  bool active() const { return this->training() && p_ > 0.0; }

  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
    cache.rows = x.rows();
    cache.cols = x.cols();
    if (!active()) {
      cache.keep.resize(0, 0);
      y = x;
      return;
    }
    const T kept = static_cast<T>(1.0 / (1.0 - p_));
    cache.keep.resize(x.rows(), x.cols());
    for (Index i = 0; i < x.rows(); ++i)
      for (Index j = 0; j < x.cols(); ++j) cache.keep(i, j) = rng_.uniform() < p_ ? T(0) : kept;
    y.resize(x.rows(), x.cols());
    y.array() = x.array() * cache.keep.array();  // y = x ⊙ m
  }

  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }

  /// dx = dy ⊙ m (dy in eval mode). `dx` may be null (nothing to do then).
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) const {
    check::shape("Dropout", this->name(), "output gradient", dy.rows(), dy.cols(), cache.rows, cache.cols);
    if (dx == nullptr) return;
    dx->resize(dy.rows(), dy.cols());
    if (cache.keep.size() == 0)
      *dx = dy;
    else
      dx->array() = dy.array() * cache.keep.array();  // dx = dy ⊙ m
  }

  /// The generator that draws masks (save/restore its state for reproducible resumption).
  Rng& rng() { return rng_; }

 private:
  double p_ = 0.0;
  Rng rng_{0xd0};
};

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class Dropout<float>;
extern template class Dropout<double>;
}  // namespace peft
#endif
