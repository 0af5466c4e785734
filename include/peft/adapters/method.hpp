#pragma once
// The adapter interface: what every PEFT method attached to a linear layer implements (LoRA, DoRA,
// VeRA, LoHa, LoKr, (IA)³). The host (layers/adapted_linear.hpp) owns the base weight, the named
// adapters, the active set, the merge stack and the caches; a method adds its term and nothing else,
// in the spirit of Hugging Face PEFT's LoraVariant (init / forward / merge / unmerge per variant).
//
// Semantics every method follows, with W₀, b₀ the base with nothing merged and x the input:
//
//   y = x W₀ᵀ + b₀ + Σ_active t_i(x; W₀, b₀)                   independent terms, each on W₀
//   merged form:  W = W₀ + Σ_merged C_i,  C_i = diag(f_i − 1) W₀ + W₀ diag(h_i − 1) + D_i
//                 b = b₀ + Σ_merged diag(g_i − 1) b₀
//
// where a method declares, at merge time, a row gain f (DoRA's m/‖W₀ + ΔW‖, (IA)³ on outputs), a
// column gain h ((IA)³ on inputs), a bias gain g ((IA)³ on outputs) and an additive part D that
// does not depend on W₀ once the gains are fixed (s·B·A for LoRA, f ⊙ s·B·A for DoRA, ΔW for VeRA,
// LoHa, LoKr). Because every C_i is affine in W₀, the host recovers W₀ from any merged state:
//
//   W₀_jk = (W − Σ D_i)_jk / (1 + Σ (f_i − 1)_j + Σ (h_i − 1)_k)
//
// so merge, unmerge and forward with some adapters merged agree to rounding for any set and order.
//
// Forward state: each method keeps what its backward needs in its own cache type (derived from
// MethodCache); the host keeps one per active adapter and reuses them across calls.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "peft/adapters/common.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/types.hpp"
#include "peft/merge/lora_factors.hpp"

namespace peft {

/// Forward state of one adapter for one forward call. Methods derive their own (see cache_as).
struct MethodCache {
  MethodCache() = default;
  MethodCache(const MethodCache&) = default;
  MethodCache& operator=(const MethodCache&) = default;
  virtual ~MethodCache() = default;
  virtual std::unique_ptr<MethodCache> clone() const = 0;
};

/// CRTP helper: `struct MyCache : MethodCacheOf<MyCache> { ... }` gets clone().
template <class C>
struct MethodCacheOf : MethodCache {
  std::unique_ptr<MethodCache> clone() const override { return std::make_unique<C>(static_cast<const C&>(*this)); }
};

/// The state of a method that keeps nothing for backward ((IA)³ reads the host's x and x W₀ᵀ).
struct NoCache final : MethodCache {
  std::unique_ptr<MethodCache> clone() const override { return std::make_unique<NoCache>(); }
};

/// The cache in `slot` as a C, created on first use (or when the slot held another method's):
/// after the first call with a given adapter this neither allocates nor moves anything.
template <class C>
C& cache_as(std::unique_ptr<MethodCache>& slot) {
  C* c = dynamic_cast<C*>(slot.get());
  if (c == nullptr) {
    auto fresh = std::make_unique<C>();
    c = fresh.get();
    slot = std::move(fresh);
  }
  return *c;
}

/// What a method reads when it adds its term in forward.
template <class T>
struct TermInput {
  explicit TermInput(const ConstMatrixRef<T>& x_) : x(x_) {}
  ConstMatrixRef<T> x;            ///< input [rows, in]
  const Matrix<T>* z = nullptr;   ///< x W₀ᵀ [rows, out] without bias, when the method asked (needs_base_output)
  const Matrix<T>* w0 = nullptr;  ///< W₀ [out, in], the weight with nothing merged (on an NF4 base: only
                                  ///< when the method asked, needs_base_weight; else nullptr)
  const Matrix<T>* b0 = nullptr;  ///< b₀ [1, out]; nullptr when the layer has no bias
  bool training = false;          ///< train mode: dropouts are drawn
  Rng* rng = nullptr;             ///< the layer's generator (dropout masks)
  /// The host ran its base product on x ⊙ (1 + Σ (h − 1)) (AdapterMethod::scales_input): a method
  /// that scales the input adds no term of its own.
  bool input_folded = false;
};

/// What a method reads in backward (nothing is merged then: W = W₀, b = b₀).
template <class T>
struct GradInput {
  const Matrix<T>* x = nullptr;   ///< the cached input [rows, in] (empty when forward said it is not needed)
  const Matrix<T>* z = nullptr;   ///< x W₀ᵀ [rows, out] when some adapter asked for it; else empty
  const Matrix<T>* w0 = nullptr;  ///< W₀ [out, in] (on an NF4 base: only when needs_base_weight; else nullptr)
  const Matrix<T>* b0 = nullptr;  ///< b₀ [1, out] or nullptr
  Matrix<T>* dw = nullptr;        ///< the base weight's gradient accumulator when W is trainable; else nullptr
  /// When the forward folded the input gains (TermInput::input_folded): P = E W₀ [rows, in], the
  /// base path's input gradient before the gain (nullptr when nothing needs it: no input gradient
  /// asked for and no input-scaling adapter trains). The host then does dX = P ⊙ (1 + Σ (h − 1)) and
  /// dW = Eᵀ (x ⊙ (1 + Σ (h − 1))); the method adds only its own parameter gradients.
  const Matrix<T>* p = nullptr;
  bool input_folded = false;
};

/// Gains the base path's output gradient by Σ (f − 1) (see AdapterMethod::add_base_gain).
template <class T>
struct BaseGain {
  RowVector<T> z;  ///< Σ (f − 1) on x W₀ᵀ [out] (valid when has_z)
  RowVector<T> b;  ///< Σ (g − 1) on b₀ [out] (valid when has_b)
  bool has_z = false;
  bool has_b = false;
};

/// What a method contributes when merged (see the file comment). Empty vectors: no such gain.
template <class T>
struct MergeRecord {
  RowVector<T> row_gain;   ///< f − 1 [out], rows of W₀
  RowVector<T> col_gain;   ///< h − 1 [in], columns of W₀
  RowVector<T> bias_gain;  ///< g − 1 [out], entries of b₀
  RowVector<T> data;       ///< the method's own (DoRA: f), fixed at merge time
};

template <class T>
class AdapterMethod {
 public:
  using ParameterVisitor = std::function<void(const std::string& name, Parameter<T>& p)>;

  explicit AdapterMethod(std::string name) : name_(std::move(name)) {}
  AdapterMethod(const AdapterMethod&) = default;
  AdapterMethod& operator=(const AdapterMethod&) = default;
  virtual ~AdapterMethod() = default;
  virtual std::unique_ptr<AdapterMethod<T>> clone() const = 0;

  /// The adapter's name ("default", "user42", ...).
  const std::string& name() const { return name_; }
  /// Hugging Face PEFT's peft_type: "LORA" (also DoRA), "VERA", "LOHA", "LOKR", "IA3".
  virtual const char* peft_type() const = 0;
  /// Name for messages: "LoRA", "DoRA", "VeRA", "LoHa", "LoKr", "(IA)^3".
  virtual const char* kind() const = 0;
  /// The adapter's rank where it has one (LoRA r, VeRA r, ...); 0 otherwise.
  virtual Index rank() const { return 0; }
  /// Switched off by its host (AdaptedLinear::disable_adapter): an active adapter the host's forward
  /// skips, its trainable flags untouched. Set only through the host, which checks merges.
  bool switched_off() const { return off_; }
  void set_switched_off(bool off) { off_ = off; }

  // ---- forward / backward -------------------------------------------------------------------

  /// Whether forward needs z = x W₀ᵀ (the host computes it once for every adapter).
  virtual bool needs_base_output(bool /*training*/) const { return false; }
  /// Whether forward or backward reads the dense W₀ itself (TermInput::w0, GradInput::w0): DoRA's
  /// row norm, (IA)³ on inputs. A host whose base is quantized (NF4) dequantizes W₀ only when an
  /// active adapter says so; otherwise it passes w0 = nullptr.
  virtual bool needs_base_weight(bool /*training*/) const { return false; }
  /// y += t(x). With a cache (training forward) keeps what backward needs there; with none
  /// (inference, routed rows) keeps nothing. Returns whether backward will read the layer's input x.
  virtual bool forward(const TermInput<T>& in, Matrix<T>& y, std::unique_ptr<MethodCache>* cache) = 0;
  /// Adds this adapter's share of the base path's output-gradient gain (terms of the form
  /// (f − 1) ⊙ x W₀ᵀ or (g − 1) ⊙ b₀ whose input gradient and dW the host folds into its own GEMMs).
  virtual void add_base_gain(const MethodCache& /*cache*/, BaseGain<T>& /*gain*/) const {}
  /// Whether the term is (x ⊙ (h − 1)) W₀ᵀ, a gain on the base product's input ((IA)³ on inputs).
  /// A host with a plain, unmerged base and no adapter reading x W₀ᵀ then runs one base product on
  /// x ⊙ (1 + Σ (h − 1)) (add_input_gain adds h − 1 [in] to `gain`) instead of one per adapter, and
  /// sets TermInput::input_folded / GradInput::input_folded.
  virtual bool scales_input() const { return false; }
  virtual void add_input_gain(RowVector<T>& /*gain*/) const {}
  /// Accumulates this adapter's parameter gradients (those trainable) and adds its input gradient
  /// into *dx (when given) and its share of dW into *in.dw (when given), except what add_base_gain
  /// handed to the host.
  virtual void backward(const GradInput<T>& in, const MethodCache& cache, const ConstMatrixRef<T>& dy,
                        Matrix<T>* dx) = 0;

  // ---- merge --------------------------------------------------------------------------------

  /// Whether merge_record reads W₀ / b₀ (gains or a W₀-dependent scale).
  virtual bool merge_needs_base() const { return false; }
  /// Fills the gains and data this adapter contributes when merged now (see the file comment).
  virtual void merge_record(const Matrix<T>& /*w0*/, const Matrix<T>* /*b0*/, MergeRecord<T>& /*rec*/) {}
  /// acc += sign · D, the additive part under `rec`.
  virtual void add_delta(const MergeRecord<T>& rec, T sign, Matrix<T>& acc) = 0;

  // ---- parameters and files -----------------------------------------------------------------

  /// fn(local name, parameter) as PEFT's model state dict names them below the linear
  /// ("lora_A.<adapter>.weight", "hada_w1_a.<adapter>", "ia3_l.<adapter>", ...).
  virtual void visit_parameters(const ParameterVisitor& fn) = 0;
  /// The tensors of this adapter under PEFT's file keys (`base_model.model.<module_path>.<param>`).
  virtual std::vector<AdapterTensor<T>> tensors(const std::string& module_path) = 0;
  /// Whether any of its parameters trains. Overridden without allocating (the default visits the
  /// named parameters, which builds strings): hot paths (a model's backward) ask it every step.
  virtual bool any_trainable() {
    bool any = false;
    visit_parameters([&any](const std::string&, Parameter<T>& p) { any = any || p.trainable(); });
    return any;
  }
  /// PEFT's set_adapter: active adapters train, the others are frozen.
  virtual void set_trainable(bool on) {
    visit_parameters([on](const std::string&, Parameter<T>& p) { p.set_trainable(on); });
  }

  // ---- conversion ---------------------------------------------------------------------------

  /// Whether to_factors() gives this adapter's update exactly as LoRA factors.
  virtual bool has_factors() const { return false; }
  /// ΔW as LoRA factors (combine, analysis and extract then work for the method).
  virtual LoraFactors<T> to_factors() const {
    throw ConfigError(std::string(kind()) + " adapter \"" + name_ + "\" has no LoRA-factor form");
  }

 protected:
  std::string name_;
  bool off_ = false;
};

/// A non-empty name without '.', as the host requires of every adapter (it becomes part of
/// parameter names).
inline void check_adapter_name(const std::string& who, const std::string& adapter_name) {
  if (adapter_name.empty()) throw ConfigError(who + ": adapter name must not be empty");
  if (adapter_name.find('.') != std::string::npos)
    throw ConfigError(who + ": adapter name \"" + adapter_name +
                      "\" must not contain '.' (it is part of parameter names)");
}

}  // namespace peft

namespace peft {

/// The AdapterMethod of a self-contained kernel K (VeraAdapter, LohaAdapter, LokrAdapter): K has
/// forward(x, y, cache) (y += term), backward(cache, dy, dx*) (dx += ...), delta(dW), to_factors(),
/// tensors(module_path, adapter), train(bool), rank(), and the constants K::kPeftType, K::kKind.
/// Its cache keeps whatever backward needs, so the host never has to keep x for it.
template <class T, class K>
class KernelMethod final : public AdapterMethod<T> {
 public:
  KernelMethod(std::string adapter_name, K kernel) : AdapterMethod<T>(std::move(adapter_name)), k_(std::move(kernel)) {}

  std::unique_ptr<AdapterMethod<T>> clone() const override { return std::make_unique<KernelMethod>(*this); }
  const char* peft_type() const override { return K::kPeftType; }
  const char* kind() const override { return K::kKind; }
  Index rank() const override { return static_cast<Index>(k_.rank()); }

  K& kernel() { return k_; }
  const K& kernel() const { return k_; }

  bool forward(const TermInput<T>& in, Matrix<T>& y, std::unique_ptr<MethodCache>* cache) override {
    k_.train(in.training);
    typename K::Cache& c = cache != nullptr ? cache_as<Cache>(*cache).c : scratch_.c;
    k_.forward(in.x, y, c);
    return false;
  }

  void backward(const GradInput<T>&, const MethodCache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) override {
    k_.backward(static_cast<const Cache&>(cache).c, dy, dx);
  }

  void add_delta(const MergeRecord<T>&, T sign, Matrix<T>& acc) override {
    k_.delta(delta_);
    acc += sign * delta_;  // ± ΔW
  }

  void visit_parameters(const typename AdapterMethod<T>::ParameterVisitor& fn) override {
    for (auto& t : k_.tensors("", this->name_)) fn(t.model_name, *t.parameter);
  }
  bool any_trainable() override { return k_.any_trainable(); }

  std::vector<AdapterTensor<T>> tensors(const std::string& module_path) override {
    return k_.tensors(module_path, this->name_);
  }

  bool has_factors() const override { return true; }
  LoraFactors<T> to_factors() const override {
    LoraFactors<T> f = k_.to_factors();
    f.name = this->name_;
    return f;
  }

 private:
  struct Cache : MethodCache {
    typename K::Cache c;
    std::unique_ptr<MethodCache> clone() const override { return std::make_unique<Cache>(*this); }
  };

  K k_;
  Cache scratch_;    ///< inference forward's state
  Matrix<T> delta_;  ///< ΔW for merges [out, in]
};

}  // namespace peft
