#pragma once
// Position-wise feed-forward block of a transformer (Vaswani et al., 2017):
//
//   z = x W_1ᵀ + b_1            [rows, inner]   (fc1, LoRA-capable)
//   h = f(z) ⊙ l_ff             [rows, inner]   (f from activations.hpp; l_ff optional (IA)³, init 1)
//   y = h W_2ᵀ + b_2            [rows, d]       (fc2, LoRA-capable)
//
// l_ff is (IA)³'s feed-forward vector (Liu et al., 2022): PEFT's is_feedforward=true scaling of
// fc2's input, named `fc2.ia3_l.<adapter>`, mergeable into fc2's weight columns.
//
// Backward: dh = fc2ᵀ(dy); dl_ff += Σ_rows dh ⊙ f(z); dz = (dh ⊙ l_ff) ⊙ f'(z); dx = fc1ᵀ(dz).
// No residual and no dropout here: the model wires those (Dropout in dropout.hpp).
#include <string>

#include "peft/core/module.hpp"
#include "peft/layers/activations.hpp"
#include "peft/layers/ia3.hpp"
#include "peft/layers/lora_linear.hpp"

namespace peft {

template <class T>
class FeedForward : public Module<T> {
 public:
  using LinearCache = typename LoRALinear<T>::Cache;

  /// What backward needs: z (pre-activation), f(z) when (IA)³ trains, and the linears' caches.
  struct Cache {
    LinearCache fc1, fc2;
    Matrix<T> z;    ///< [rows, inner]
    Matrix<T> act;  ///< f(z) [rows, inner]; only with trainable, unmerged (IA)³
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
  IA3Vector<T> ia3;  ///< (IA)³ on fc2's input; disabled (empty) until add_ia3

  Index dim() const { return fc1.in_features(); }
  Index inner_dim() const { return fc1.out_features(); }
  Activation activation() const { return activation_; }

  void freeze_base() {
    fc1.freeze_base();
    fc2.freeze_base();
  }

  /// Adds a trainable (IA)³ vector of ones scaling the inner activation (fc2's input).
  void add_ia3(const std::string& adapter = "default") {
    if (ia3.enabled())
      throw ConfigError(describe("FeedForward", this->name()) + ": already has an (IA)^3 adapter \"" +
                        ia3.adapter_name() + "\"");
    ia3 = IA3Vector<T>(IA3Placement::Input, inner_dim(), adapter);
  }
  void remove_ia3() {
    if (ia3.merged()) throw ConfigError(describe("FeedForward", this->name()) + ": unmerge (IA)^3 before removing it");
    ia3 = IA3Vector<T>();
  }
  bool has_ia3() const { return ia3.enabled(); }
  /// Folds l_ff into fc2's weight columns; forward then skips the scaling.
  void merge_ia3() {
    if (!ia3.enabled()) throw ConfigError(describe("FeedForward", this->name()) + ": has no (IA)^3 adapter to merge");
    ia3.merge_into(fc2);
  }
  void unmerge_ia3() { ia3.unmerge_from(fc2); }

  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
    fc1.forward(x, cache.z, cache.fc1);  // z = x W_1ᵀ + b_1
    activation_forward<T>(activation_, cache.z, hidden_);
    const bool scale = ia3.enabled() && !ia3.merged();
    if (scale && ia3.ia3_l.trainable())
      cache.act = hidden_;
    else
      cache.act.resize(0, 0);
    if (scale) ia3.apply(hidden_);       // h = f(z) ⊙ l
    fc2.forward(hidden_, y, cache.fc2);  // y = h W_2ᵀ + b_2
  }

  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }

  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
    if (ia3.merged())
      throw ConfigError(describe("FeedForward", this->name()) + ": cannot train while (IA)^3 is merged; unmerge first");
    fc2.backward(cache.fc2, dy, &dhidden_);                                     // dh = dy W_2   [rows, inner]
    if (ia3.enabled()) ia3.backward(cache.act, dhidden_);                       // dl += Σ dh ⊙ f(z); dh ← dh ⊙ l
    activation_backward<T>(activation_, cache.z, dhidden_, dhidden_, fprime_);  // dz = dh ⊙ f'(z)
    fc1.backward(cache.fc1, dhidden_, dx);                                      // dx = dz W_1
  }

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    if (ia3.enabled()) fn("fc2." + ia3.parameter_name(), ia3.ia3_l);
  }
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("fc1", fc1);
    fn("fc2", fc2);
  }

 private:
  Activation activation_ = Activation::GELU;
  Matrix<T> hidden_;   ///< forward scratch: h [rows, inner] (fc2 caches what it needs)
  Matrix<T> dhidden_;  ///< backward scratch [rows, inner]
  Matrix<T> fprime_;   ///< backward scratch f'(z) [rows, inner]
};

}  // namespace peft
