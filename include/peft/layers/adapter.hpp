#pragma once
// Adapter: a bottleneck MLP inserted into a frozen transformer (Houlsby et al., 2019,
// "Parameter-Efficient Transfer Learning for NLP"; Pfeiffer et al., 2020, "AdapterFusion";
// He et al., 2022, "Towards a Unified View of Parameter-Efficient Transfer Learning").
//
//   sequential:  y = x + s · f(x W_dᵀ + b_d) W_uᵀ + s · b_u
//   parallel:    y =     s · f(x W_dᵀ + b_d) W_uᵀ + s · b_u     (added by the host to the FFN output)
//
//   W_d [b, d] down-projection, W_u [d, b] up-projection, f an activation, s a fixed scale.
//   Parameter count 2·d·b + b + d. Bottleneck b given directly or as d / reduction_factor
//   (AdapterHub: b = ⌊d / factor⌋).
//
// Placements (used by the model, see models/transformer.hpp):
//   Houlsby  — a sequential adapter after the attention sub-layer and another after the FFN;
//   Pfeiffer — one sequential adapter after the FFN only;
//   Parallel — He et al.'s parallel adapter: s·adapter(h) is added to FFN(h) (no own residual).
//
// Inits:
//   Zero    — W_d as nn.Linear (kaiming-uniform), W_u = 0, b_u = 0: the output term is exactly 0,
//             so the sequential adapter is the identity (and the parallel one adds exactly 0).
//   Bert    — every weight N(0, 0.02²), biases 0 (BERT's initializer_range, AdapterHub "bert").
//   Houlsby — every weight from a normal with std 1e-2 truncated to ±2 std, biases 0: "near
//             identity" as in Houlsby et al. §3.1 (they report std 1e-2 works; ≥ 1e-1 degrades).
//
// Backward (per call, shapes [rows, ·]):
//   dZ = s · dY;  dW_u += dZᵀ A;  db_u += Σ dZ;  dA = dZ W_u;  dH = dA ⊙ f'(H);
//   dW_d += dHᵀ X;  db_d += Σ dH;  dX = dH W_d (+ dY when sequential).
#include <string>

#include "peft/core/check.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parallel.hpp"
#include "peft/layers/activations.hpp"
#include "peft/layers/linear.hpp"

namespace peft {

enum class AdapterInit { Zero, Bert, Houlsby };

/// Where a transformer block hosts its adapters.
enum class AdapterPlacement {
  Houlsby,   ///< after attention and after the FFN (sequential)
  Pfeiffer,  ///< after the FFN only (sequential)
  Parallel,  ///< parallel to the FFN: FFN(h) + s·adapter(h) (He et al., 2022)
};

struct AdapterOptions {
  Index bottleneck = 0;            ///< b; when 0 it is ⌊d / reduction_factor⌋
  double reduction_factor = 16.0;  ///< used only when bottleneck == 0
  double scaling = 1.0;            ///< s
  Activation activation = Activation::ReLU;
  AdapterInit init = AdapterInit::Zero;

  /// The bottleneck width for a model width d; ConfigError when it would be < 1.
  Index bottleneck_for(Index d, const std::string& who = "Adapter") const {
    if (bottleneck < 0)
      throw ConfigError(who + ": bottleneck must be > 0 (or 0 to use reduction_factor), got " +
                        std::to_string(bottleneck));
    if (bottleneck > 0) return bottleneck;
    check::positive("Adapter", who, "reduction_factor", reduction_factor);
    const Index b = static_cast<Index>(static_cast<double>(d) / reduction_factor);
    if (b < 1)
      throw ConfigError(who + ": reduction_factor " + std::to_string(reduction_factor) +
                        " leaves no bottleneck for d=" + std::to_string(d) + " (d / factor < 1)");
    return b;
  }
};

template <class T>
class Adapter : public Module<T> {
 public:
  /// What backward needs: the two linears' caches (x, and the activation A when trainable) and
  /// the pre-activation H (for f'(H)).
  struct Cache {
    typename Linear<T>::Cache down;
    typename Linear<T>::Cache up;
    Matrix<T> h;  ///< x W_dᵀ + b_d  [rows, b]
    Matrix<T> a;  ///< f(H)          [rows, b]
    Index rows = 0;
  };

  Adapter() = default;

  /// `residual` = true: sequential adapter (y = x + s·g(x)); false: parallel (y = s·g(x)).
  Adapter(Index dim, const AdapterOptions& options, Rng& rng, bool residual = true, std::string name = "");

  Linear<T> down;  ///< W_d [b, d], b_d [b]   (names `adapter_down.weight`, `adapter_down.bias`)
  Linear<T> up;    ///< W_u [d, b], b_u [d]   (names `adapter_up.weight`, `adapter_up.bias`)

  Index dim() const { return down.in_features(); }
  Index bottleneck() const { return down.out_features(); }
  double scaling() const { return options_.scaling; }
  bool residual() const { return residual_; }
  const AdapterOptions& options() const { return options_; }

  /// y = [x +] s · (f(x W_dᵀ + b_d) W_uᵀ + b_u). Buffers are reused across calls; `y` must not
  /// share storage with `x`.
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache);

  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }

  /// The same output with nothing kept for backward: evaluation and serving. `y` must not share
  /// storage with `x`.
  void forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y);

  /// Accumulates the gradients of the trainable projections; *dx = ∂L/∂x unless dx is null.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("adapter_down", down);
    fn("adapter_up", up);
  }

 private:
  AdapterOptions options_;
  bool residual_ = true;
  Matrix<T> dz_, da_, dh_;   ///< backward scratch, reused
  Matrix<T> h_inf_, a_inf_;  ///< forward_inference's H and f(H) [rows, b]
  Matrix<T> fprime_;         ///< backward scratch f'(H)
};

// ---- Adapter members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
Adapter<T>::Adapter(Index dim, const AdapterOptions& options, Rng& rng, bool residual, std::string name)
    : Module<T>(std::move(name)), options_(options), residual_(residual) {
  if (dim <= 0) throw ConfigError(describe("Adapter", this->name()) + ": dim must be > 0, got " + std::to_string(dim));
  check::positive("Adapter", this->name(), "scaling", options.scaling);
  const Index b = options.bottleneck_for(dim, describe("Adapter", this->name()));
  down = Linear<T>(dim, b, rng, true);
  up = Linear<T>(b, dim, rng, true);
  switch (options.init) {
    case AdapterInit::Zero:  // down keeps nn.Linear's init; up is zero → exact identity
      up.weight.value.setZero();
      up.bias.value.setZero();
      break;
    case AdapterInit::Bert:
      init::normal<T>(down.weight.value, rng, 0.0, 0.02);
      init::normal<T>(up.weight.value, rng, 0.0, 0.02);
      down.bias.value.setZero();
      up.bias.value.setZero();
      break;
    case AdapterInit::Houlsby:
      init::truncated_normal<T>(down.weight.value, rng, 0.0, 1e-2);
      init::truncated_normal<T>(up.weight.value, rng, 0.0, 1e-2);
      down.bias.value.setZero();
      up.bias.value.setZero();
      break;
  }
  this->set_name(this->name());
}

template <class T>
void Adapter<T>::forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
  check::input_features("Adapter", this->name(), x.cols(), dim());
  cache.rows = x.rows();
  down.forward(x, cache.h, cache.down);                          // H = x W_dᵀ + b_d   [rows, b]
  activation_forward<T>(options_.activation, cache.h, cache.a);  // A = f(H)
  up.forward(cache.a, y, cache.up);                              // Z = A W_uᵀ + b_u   [rows, d]
  const T s = static_cast<T>(options_.scaling);
  if (residual_)
    parallel_scaled_sum<T>(y, x, s, y);  // y = x + s Z (coefficient-wise: no aliasing hazard)
  else if (s != T(1))
    parallel_scale<T>(y, s, y);
}

template <class T>
void Adapter<T>::forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y) {
  check::input_features("Adapter", this->name(), x.cols(), dim());
  down.forward_inference(x, h_inf_);                           // H = x W_dᵀ + b_d   [rows, b]
  activation_forward<T>(options_.activation, h_inf_, a_inf_);  // A = f(H)
  up.forward_inference(a_inf_, y);                             // Z = A W_uᵀ + b_u   [rows, d]
  const T s = static_cast<T>(options_.scaling);
  if (residual_)
    parallel_scaled_sum<T>(y, x, s, y);
  else if (s != T(1))
    parallel_scale<T>(y, s, y);
}

template <class T>
void Adapter<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
  check::shape("Adapter", this->name(), "output gradient", dy.rows(), dy.cols(), cache.rows, dim());
  const T s = static_cast<T>(options_.scaling);
  parallel_scale<T>(dz_, s, dy);  // dZ = s dY   [rows, d]
  const bool need_input_grad = dx != nullptr || down.weight.trainable() || down.bias.trainable();
  up.backward(cache.up, dz_, need_input_grad ? &da_ : nullptr);  // dW_u += dZᵀ A; dA = dZ W_u
  if (!need_input_grad) return;
  activation_backward<T>(options_.activation, cache.h, da_, dh_, fprime_);  // dH = dA ⊙ f'(H)
  down.backward(cache.down, dh_, dx);                                       // dW_d += dHᵀ X; dX = dH W_d
  if (dx != nullptr && residual_) parallel_add<T>(*dx, dy);                 // identity path
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class Adapter<float>;
extern template class Adapter<double>;
}  // namespace peft
#endif
