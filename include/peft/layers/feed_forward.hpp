#pragma once
// Position-wise feed-forward block of a transformer (Vaswani et al., 2017):
//
//   z = x W_1ᵀ + b_1            [rows, inner]   (fc1, LoRA-capable)
//   h = f(z)                    [rows, inner]   (f from activations.hpp)
//   y = fc2(h)                  [rows, d]       (adapted linear: with add_ia3, (h ⊙ l_ff) W_2ᵀ + b_2)
//
// l_ff is (IA)³'s feed-forward vector (Liu et al., 2022): PEFT's is_feedforward=true scaling of
// fc2's input, an (IA)³ adapter of fc2 named `fc2.ia3_l.<adapter>`, merged into fc2's columns.
//
// Backward: dh = fc2ᵀ(dy) (with dl_ff); dz = dh ⊙ f'(z); dx = fc1ᵀ(dz).
// No residual and no dropout here: the model wires those (Dropout in dropout.hpp).
#include <string>

#include "peft/core/module.hpp"
#include "peft/core/scratch.hpp"
#include "peft/layers/activations.hpp"
#include "peft/layers/ia3.hpp"
#include "peft/layers/lora_linear.hpp"
#include "peft/layers/lora_mixed_batch.hpp"

namespace peft {

template <class T>
class FeedForward : public Module<T> {
 public:
  using LinearCache = typename LoRALinear<T>::Cache;

  /// What backward needs: z (pre-activation) and the linears' caches.
  struct Cache {
    LinearCache fc1, fc2;
    Matrix<T> z;  ///< [rows, inner]
  };

  FeedForward() = default;

  FeedForward(Index dim, Index inner, Activation activation, Rng& rng, bool bias = true, std::string name = "")
      : Module<T>(std::move(name)), activation_(activation) {
    if (dim <= 0 || inner <= 0)
      throw ConfigError(describe("FeedForward", this->name()) + ": dim and inner must be > 0, got dim=" +
                        std::to_string(dim) + ", inner=" + std::to_string(inner));
    fc1 = LoRALinear<T>(dim, inner, rng, bias);
    fc2 = LoRALinear<T>(inner, dim, rng, bias);
    this->set_name(this->name());
  }

  LoRALinear<T> fc1, fc2;

  Index dim() const { return fc1.in_features(); }
  Index inner_dim() const { return fc1.out_features(); }
  Activation activation() const { return activation_; }

  void freeze_base() {
    fc1.freeze_base();
    fc2.freeze_base();
  }

  /// Adds an (IA)³ adapter (ones) scaling the inner activation (fc2's input), next to the adapters
  /// active on fc2. One (IA)³ adapter per block.
  void add_ia3(const std::string& adapter = "default") {
    if (const auto* m = ia3())
      throw ConfigError(describe("FeedForward", this->name()) + ": already has an (IA)^3 adapter \"" + m->name() +
                        "\"");
    add_ia3_adapter(fc2, adapter, true);
  }
  void remove_ia3() {
    if (ia3_merged()) throw ConfigError(describe("FeedForward", this->name()) + ": unmerge (IA)^3 before removing it");
    if (const auto* m = ia3()) fc2.delete_adapter(std::string(m->name()), "IA3");
  }
  /// The (IA)³ adapter on fc2 (nullptr when absent).
  IA3Method<T>* ia3() { return ia3_adapter_of(fc2); }
  const IA3Method<T>* ia3() const { return ia3_adapter_of(fc2); }
  bool has_ia3() const { return ia3() != nullptr; }
  bool ia3_merged() const { return ia3_merged_in(fc2); }
  /// Folds l_ff into fc2's weight columns; forward then skips the scaling.
  void merge_ia3() {
    const auto* m = ia3();
    if (m == nullptr) throw ConfigError(describe("FeedForward", this->name()) + ": has no (IA)^3 adapter to merge");
    fc2.merge({m->name()}, "IA3");
  }
  /// Unmerges fc2 (every adapter merged there).
  void unmerge_ia3() { fc2.unmerge(); }

  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
    fc1.forward(x, cache.z, cache.fc1);  // z = x W_1ᵀ + b_1
    // h only feeds fc2, which keeps what its backward needs: thread scratch, shared by every block
    Matrix<T>& hidden = scratch<T>(ScratchOwner::FeedForward, 0, x.rows(), inner_dim());
    activation_forward<T>(activation_, cache.z, hidden);
    fc2.forward(hidden, y, cache.fc2);  // y = h W_2ᵀ + b_2
  }

  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }

  /// The same output with nothing kept for backward (the linears' inference paths): evaluation.
  /// With `adapters`, each sequence's rows go through its named adapter (lora_mixed_batch.hpp).
  void forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y, const SequenceAdapters* adapters = nullptr) {
    forward_inference_routed<T>(fc1, x, z_inf_, adapters, route_[0]);  // z = x W_1ᵀ + b_1
    activation_forward<T>(activation_, z_inf_, h_inf_);
    forward_inference_routed<T>(fc2, h_inf_, y, adapters, route_[1]);  // y = h W_2ᵀ + b_2
  }

  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("fc1", fc1);
    fn("fc2", fc2);
  }

 private:
  Activation activation_ = Activation::GELU;
  RoutedWorkspace<T> route_[2];  ///< per-sequence adapter routing of fc1, fc2
  Matrix<T> z_inf_, h_inf_;      ///< forward_inference's z and h [rows, inner] (forward's buffers keep their shapes)
};

// ---- FeedForward members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
void FeedForward<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
  if (ia3_merged())
    throw ConfigError(describe("FeedForward", this->name()) + ": cannot train while (IA)^3 is merged; unmerge first");
  // Thread scratch (core/scratch.hpp), shared by every block: dh [rows, inner], f'(z) [rows, inner]
  const Index rows = cache.z.rows(), inner = inner_dim();
  Matrix<T>& dhidden = scratch<T>(ScratchOwner::FeedForward, 1, rows, inner);
  Matrix<T>& fprime = scratch<T>(ScratchOwner::FeedForward, 2, rows, inner);
  fc2.backward(cache.fc2, dy, &dhidden);                                   // dh = dy W_2   [rows, inner]
  activation_backward<T>(activation_, cache.z, dhidden, dhidden, fprime);  // dz = dh ⊙ f'(z)
  fc1.backward(cache.fc1, dhidden, dx);                                    // dx = dz W_1
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class FeedForward<float>;
extern template class FeedForward<double>;
}  // namespace peft
#endif
