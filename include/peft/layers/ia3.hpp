#pragma once
// (IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al., 2022,
// "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context Learning").
//
// A learned vector l (init 1, so the model is unchanged at init, exactly) rescales an activation:
//
//   keys / values (output scaling):    K = (x W_kᵀ + b_k) ⊙ l_k          l_k [d]
//   feed-forward (input scaling):      y = (h ⊙ l_ff) W_2ᵀ + b_2          l_ff [inner]
//
// as Hugging Face PEFT's IA3 layer: is_feedforward=false scales the output of the wrapped linear,
// is_feedforward=true scales its input. Stored shapes follow PEFT so files map 1:1: output scaling
// [out, 1], input scaling [1, in]; the parameter is named `<linear>.ia3_l.<adapter>`, e.g.
// `attn.k_proj.ia3_l.default` or `ffn.fc2.ia3_l.default`.
//
// Gradients: with U the unscaled activation [rows, n] and G = ∂L/∂(U ⊙ l):
//   ∂L/∂l_j = Σ_rows G_ij U_ij,    ∂L/∂U = G ⊙ l (row-broadcast).
//
// Merge (PEFT's IA3 merge): output scaling multiplies row i of W and b_i by l_i; input scaling
// multiplies column j of W by l_j (the bias is untouched). Unmerge divides again. PEFT divides by
// l + 1e-8; we divide exactly and refuse (NumericError) if some l_j == 0, so merge → unmerge is
// exact up to rounding. Merging is refused while the linear has active or merged LoRA adapters,
// because scaling W would then not scale the LoRA term (or would corrupt a later LoRA unmerge).
//
// IA3Vector is not a Module: the layer that applies it (MultiHeadAttention, FeedForward) owns it
// and lists its parameter under the PEFT name.
#include <string>

#include "peft/core/check.hpp"
#include "peft/core/parameter.hpp"
#include "peft/layers/lora_linear.hpp"

namespace peft {

/// Where the vector acts on its linear: Output = PEFT is_feedforward=false (k, v), Input = true (fc2).
enum class IA3Placement { Output, Input };

template <class T>
class IA3Vector {
 public:
  IA3Vector() = default;

  /// A trainable vector of `features` ones. Output placement stores [features, 1], Input [1, features].
  IA3Vector(IA3Placement placement, Index features, std::string adapter = "default")
      : adapter_(std::move(adapter)), placement_(placement) {
    if (features <= 0) throw ShapeError("IA3Vector: features must be > 0, got " + std::to_string(features));
    if (adapter_.empty()) throw ConfigError("IA3Vector: adapter name must not be empty");
    ia3_l = placement == IA3Placement::Output ? Parameter<T>(features, 1, true) : Parameter<T>(1, features, true);
    ia3_l.value.setOnes();
  }

  /// l: [n, 1] (Output) or [1, n] (Input), as in PEFT.
  Parameter<T> ia3_l;

  bool enabled() const { return ia3_l.size() > 0; }
  const std::string& adapter_name() const { return adapter_; }
  IA3Placement placement() const { return placement_; }
  Index features() const { return ia3_l.size(); }
  bool merged() const { return merged_; }
  /// Local parameter name below the linear: "ia3_l.<adapter>".
  std::string parameter_name() const { return "ia3_l." + adapter_; }

  /// l as a [1, n] row (a view; the storage is contiguous in both placements).
  Eigen::Map<const RowVector<T>> scales() const {
    return Eigen::Map<const RowVector<T>>(ia3_l.value.data(), features());
  }

  /// Y ← Y ⊙ l on every row (Y [rows, n]).
  void apply(MatrixRef<T> y) const {
    check_features(y.cols());
    y.array().rowwise() *= scales().array();
  }

  /// Backward of apply: accumulates dl += Σ_rows G ⊙ U when trainable, then G ← G ⊙ l.
  /// `unscaled` is U (the activation before scaling); it may be empty when l is frozen.
  void backward(const ConstMatrixRef<T>& unscaled, MatrixRef<T> g) {
    check_features(g.cols());
    if (ia3_l.trainable()) {
      check::shape("IA3Vector", adapter_, "cached unscaled activation", unscaled.rows(), unscaled.cols(), g.rows(),
                   g.cols());
      Eigen::Map<RowVector<T>> dl(ia3_l.grad.data(), features());
      dl.noalias() += (g.array() * unscaled.array()).matrix().colwise().sum();  // dl_j = Σ_i G_ij U_ij
    }
    g.array().rowwise() *= scales().array();  // dU = G ⊙ l
  }

  /// Folds l into the linear's weights (see file comment). `owner` names the linear in messages.
  void merge_into(LoRALinear<T>& linear) {
    const std::string who = describe("IA3", linear.name());
    check_mergeable(linear, who);
    if (merged_) throw ConfigError(who + ": adapter \"" + adapter_ + "\" is already merged");
    check_linear_shape(linear, who);
    if (placement_ == IA3Placement::Output) {
      linear.weight.value.array().colwise() *= scales().transpose().array();  // W_i· ← l_i W_i·
      if (linear.has_bias()) linear.bias.value.array() *= scales().array();   // b_i ← l_i b_i
    } else {
      linear.weight.value.array().rowwise() *= scales().array();  // W_·j ← l_j W_·j
    }
    merged_ = true;
  }

  /// Inverse of merge_into. Throws NumericError if some l_j is 0 (the scaling is not invertible).
  void unmerge_from(LoRALinear<T>& linear) {
    const std::string who = describe("IA3", linear.name());
    if (!merged_) throw ConfigError(who + ": adapter \"" + adapter_ + "\" is not merged");
    check_linear_shape(linear, who);
    for (Index j = 0; j < features(); ++j)
      if (scales()(j) == T(0))
        throw NumericError(who + ": cannot unmerge adapter \"" + adapter_ + "\": ia3_l[" + std::to_string(j) +
                           "] is 0, the scaling is not invertible");
    if (placement_ == IA3Placement::Output) {
      linear.weight.value.array().colwise() /= scales().transpose().array();
      if (linear.has_bias()) linear.bias.value.array() /= scales().array();
    } else {
      linear.weight.value.array().rowwise() /= scales().array();
    }
    merged_ = false;
  }

 private:
  void check_features(Index n) const {
    if (n != features())
      throw ShapeError(describe("IA3Vector", adapter_) + ": activation has " + std::to_string(n) +
                       " features, expected " + std::to_string(features()));
  }

  void check_linear_shape(const LoRALinear<T>& linear, const std::string& who) const {
    const Index n = placement_ == IA3Placement::Output ? linear.out_features() : linear.in_features();
    if (n != features())
      throw ShapeError(who + ": ia3_l has " + std::to_string(features()) + " entries, the linear's " +
                       (placement_ == IA3Placement::Output ? "out" : "in") + "_features is " + std::to_string(n));
  }

  static void check_mergeable(const LoRALinear<T>& linear, const std::string& who) {
    if (linear.merged() || (!linear.adapters_disabled() && !linear.active_adapters().empty()))
      throw ConfigError(who + ": cannot merge (IA)^3 into a linear with active or merged LoRA adapters");
  }

  std::string adapter_ = "default";
  IA3Placement placement_ = IA3Placement::Output;
  bool merged_ = false;
};

}  // namespace peft
