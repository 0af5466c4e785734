#pragma once
// AdaptedLinear: a linear layer y = x Wᵀ + b that hosts any number of named adapters of any method
// (LoRA, DoRA, VeRA, LoHa, LoKr, (IA)³: adapters/*.hpp), the one hook every base matmul of a model
// goes through (llama.cpp's build_lora_mm, PEFT's BaseTunerLayer). With no adapter it costs what
// Linear costs. `LoRALinear<T>` is this class (layers/lora_linear.hpp).
//
// The host owns the base weight W [out, in] and bias b [out], the adapters (in insertion order, on
// the heap: adding one never moves another, so optimizers keep valid pointers), the active set
// (PEFT's set_adapter: active adapters train, the others are frozen), the merge stack, a
// generation counter that invalidates caches, and the typed caches. Each adapter adds one term:
//
//   y = x W₀ᵀ + b₀ + Σ_active t_i(x; W₀, b₀)                   (W₀, b₀: nothing merged)
//
// and declares what merging it means (adapters/method.hpp): W = W₀ + Σ_merged C_i with
// C_i = diag(f_i − 1) W₀ + W₀ diag(h_i − 1) + D_i, b = b₀ + Σ diag(g_i − 1) b₀. Every C_i is
// affine in W₀, so W₀ is recovered from any merged state by
//
//   W₀_jk = (W − Σ_merged D_i)_jk / (1 + Σ (f_i − 1)_j + Σ (h_i − 1)_k),   b₀ = b / (1 + Σ (g_i − 1))
//
// which is how unmerge restores the base (to rounding: about 1e-16 relative, not bit for bit; on an
// NF4 base to the re-quantization error, see below) and how forward runs unmerged adapters that read
// W₀ (DoRA's norm, (IA)³'s scaled base) while others are merged. Merging any subset, in any order,
// over any number of calls gives the unmerged forward's outputs (to rounding), and a merge that would
// make a divisor smaller than √ε (W₀ unrecoverable) is refused with nothing changed. Merged
// adapters are skipped in forward; backward while anything is merged is refused.
//
// Backward: the host does the base GEMMs, dX = E W and dW = Eᵀ X with E = dY ⊙ (1 + Σ (f − 1))
// over the adapters that scale x W₀ᵀ (add_base_gain: DoRA without dropout, (IA)³ on outputs), so
// those terms cost no GEMM of their own; then each adapter adds its own gradients.
//
// The base is dense (`weight`) or 4-bit NF4 (QLoRA, Dettmers et al. 2023: the constructor from a
// quant::NF4Tensor, `quantize_linear`, `NF4LoRALinear<T>` in quant/nf4_lora_linear.hpp). On an NF4
// base W = deq(Q) is frozen and never formed whole on the hot path: the base products decode
// `tile_rows` output rows at a time into one reused [tile, in] buffer,
//   y[:, t] = x · W_tᵀ,   dX += E[:, t] · W_t      (per tile t of output rows; no dW: Q is frozen)
// so LoRA, VeRA, LoHa, LoKr and (IA)³ on outputs cost tile_rows·in extra scalars. A method that
// reads W₀ itself (needs_base_weight: DoRA's row norm, (IA)³ on inputs) gets a dense deq(Q) kept in
// one reused [out, in] buffer (re-decoded only after the base or the adapter set changed), as PEFT's
// bitsandbytes DoRA dequantizes: out·in scalars, allocated on first use and kept (so is it for a
// forward with unmerged adapters while others are merged: W₀ is then recovered densely). The
// dense `weight` Parameter is then empty, frozen and not visited (optimizers never see it); making it
// trainable is refused. Merge and unmerge on NF4 are lossy, as PEFT's bnb merge (w = deq(Q) + ΔW,
// then re-quantize): deq(Q) goes through the dense algebra above and is re-quantized in the base's
// layout, one extra rounding per call (last_requantize() reports the error it added).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/lora.hpp"
#include "peft/adapters/method.hpp"
#include "peft/core/check.hpp"
#include "peft/core/gemm.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parallel.hpp"
#include "peft/core/scratch.hpp"
#include "peft/layers/linear.hpp"
#include "peft/quant/nf4.hpp"

namespace peft {

/// A view of some of a layer's adapters (size(), [i], front(), back(), range-for over references).
/// Valid while the layer lives and no adapter is added or removed.
template <class A>
class AdapterRefs {
 public:
  class iterator {
   public:
    explicit iterator(typename std::vector<A*>::const_iterator it) : it_(it) {}
    A& operator*() const { return **it_; }
    A* operator->() const { return *it_; }
    iterator& operator++() {
      ++it_;
      return *this;
    }
    bool operator==(const iterator& o) const { return it_ == o.it_; }
    bool operator!=(const iterator& o) const { return it_ != o.it_; }

   private:
    typename std::vector<A*>::const_iterator it_;
  };

  explicit AdapterRefs(std::vector<A*> v) : v_(std::move(v)) {}
  std::size_t size() const { return v_.size(); }
  bool empty() const { return v_.empty(); }
  A& operator[](std::size_t i) const { return *v_[i]; }
  A& front() const { return *v_.front(); }
  A& back() const { return *v_.back(); }
  iterator begin() const { return iterator(v_.begin()); }
  iterator end() const { return iterator(v_.end()); }

 private:
  std::vector<A*> v_;
};

/// Reused buffers of forward_routed (mixed-adapter batches): they grow to the largest batch seen.
template <class T>
struct RoutedWorkspace {
  std::vector<int> routing;  ///< per row: adapter index or -1 (filled from names)
  std::vector<Index> count;  ///< rows per adapter
  std::vector<Index> start;  ///< first slot of each adapter in `order`
  std::vector<Index> order;  ///< row indices grouped by adapter
  Matrix<T> z;               ///< x W₀ᵀ [rows, out] when some routed adapter reads it
  // Per adapter (so that a repeated routing reallocates nothing): its rows' inputs X_a [m_a, in],
  // their x W₀ᵀ [m_a, out] when it reads them, and its term [m_a, out].
  std::vector<Matrix<T>> xg, zg, up;
};

/// What a re-quantization of an NF4 base added (merge, unmerge, merge_and_requantize).
struct RequantizeReport {
  double added_error = 0.0;         ///< ‖deq(Q') − W‖_F, W the dense weight that was re-quantized
  double relative_error = 0.0;      ///< added_error / ‖W‖_F
  std::vector<std::string> merged;  ///< merge_and_requantize: the adapters folded into the base (and removed)
};

template <class T>
class AdaptedLinear : public Module<T> {
 public:
  using RequantizeReport = peft::RequantizeReport;

  /// One active adapter's forward state (its method's cache type).
  struct Slot {
    std::size_t adapter = 0;             ///< index into methods()
    std::unique_ptr<MethodCache> state;  ///< the method's cache, reused across calls
    bool folded = false;                 ///< its input gain went into the base product (Cache::folded)
    Slot() = default;
    Slot(const Slot& o) : adapter(o.adapter), state(o.state ? o.state->clone() : nullptr), folded(o.folded) {}
    Slot& operator=(const Slot& o) {
      if (this != &o) {
        adapter = o.adapter;
        state = o.state ? o.state->clone() : nullptr;
        folded = o.folded;
      }
      return *this;
    }
    Slot(Slot&&) noexcept = default;
    Slot& operator=(Slot&&) noexcept = default;
    ~Slot() = default;
  };

  /// What backward needs: x (when the base weight or an adapter's gradient needs it), x W₀ᵀ (when
  /// an adapter scales it) and one Slot per active adapter. Reused across calls.
  struct Cache {
    Matrix<T> x;                   ///< the input, when backward needs it; else empty
    Matrix<T> z;                   ///< x W₀ᵀ [rows, out] when an active adapter reads it; else empty
    Matrix<T> xs;                  ///< x ⊙ h, the base product's input, when `folded`; else unused
    RowVector<T> h;                ///< h = 1 + Σ (h_i − 1) [in] over the folded input gains
    bool folded = false;           ///< the base product ran on x ⊙ h (AdapterMethod::scales_input)
    bool needs_input = false;      ///< backward reads x (kept in `x`, or handed back by the caller)
    bool input_by_caller = false;  ///< forward_shared_input: x is the caller's to keep and hand to backward
    Index rows = 0;                ///< rows of the input of the last forward
    std::vector<Slot> slots;       ///< grows to the largest active set, then is reused
    std::size_t used = 0;          ///< entries of `slots` filled by the last forward
    std::uint64_t generation = 0;  ///< layer state the cache was filled under (0: never filled)

    /// Slot k's state as the method's cache type C (std::bad_cast if it is another method's).
    template <class C>
    const C& state(std::size_t k) const {
      return dynamic_cast<const C&>(*slots.at(k).state);
    }
    const LoraCache<T>& lora(std::size_t k) const { return state<LoraCache<T>>(k); }
    const DoraCache<T>& dora(std::size_t k) const { return state<DoraCache<T>>(k); }
  };

  AdaptedLinear() = default;

  /// A fresh base with nn.Linear's init and no adapters. The base is drawn from `rng` first, then
  /// the dropout generator's seed (in this order on every compiler: the draws are sequenced in the
  /// body, not in an argument list whose evaluation order is unspecified).
  AdaptedLinear(Index in_features, Index out_features, Rng& rng, bool with_bias = true, std::string name = "");

  /// Wraps an existing Linear (weights moved in, trainable flags kept).
  explicit AdaptedLinear(Linear<T> base, std::string name = "", std::uint64_t dropout_seed = 0x10a)
      : Module<T>(std::move(name)), weight(std::move(base.weight)), bias(std::move(base.bias)), rng_(dropout_seed) {}

  /// A frozen 4-bit NF4 base [out, in] (QLoRA) and an optional bias (frozen; unfreeze it if wanted).
  /// `weight` stays empty: the base lives in quantized_weight().
  explicit AdaptedLinear(quant::NF4Tensor q, const RowVector<T>& b = RowVector<T>(), std::string name = "",
                         std::uint64_t dropout_seed = 0x4f4);

  // Copies clone every adapter. The special members are defined below the class, not defaulted
  // here: the test build's extern template declaration then covers them too.
  AdaptedLinear(const AdaptedLinear& o);
  AdaptedLinear& operator=(const AdaptedLinear& o);
  AdaptedLinear(AdaptedLinear&&) noexcept;
  AdaptedLinear& operator=(AdaptedLinear&&) noexcept;
  ~AdaptedLinear() override;

  Parameter<T> weight;  ///< W [out, in]; empty (and frozen) on an NF4 base
  Parameter<T> bias;    ///< b [out] (stored [1, out]); empty when the layer has no bias

  Index in_features() const { return quantized() ? static_cast<Index>(q_.cols()) : weight.value.cols(); }
  Index out_features() const { return quantized() ? static_cast<Index>(q_.rows()) : weight.value.rows(); }
  bool has_bias() const { return bias.size() > 0; }

  // ---- the base ------------------------------------------------------------------------------

  /// Whether the base is a 4-bit NF4 tensor (QLoRA) rather than the dense `weight`.
  bool quantized() const { return !q_.shape.empty(); }
  /// The NF4 base (empty shape on a dense layer).
  const quant::NF4Tensor& quantized_weight() const { return q_; }

  /// The current base weight W as a dense matrix [out, in]: `weight.value`, or deq(Q) on an NF4
  /// base (merged adapters included).
  Matrix<T> dequantized_weight() const { return quantized() ? quant::dequantize_nf4<T>(q_) : weight.value; }

  /// W₀ [out, in], the base with nothing merged, dense (dequantized on an NF4 base).
  Matrix<T> base_weight() const { return const_cast<AdaptedLinear*>(this)->w0(); }

  /// W₀ + Σ over active, unmerged adapters of C_i [out, in]: the weight merge() would give (before
  /// any re-quantization). For LoRA, deq(Q) + Σ s·B·A on an NF4 base.
  Matrix<T> merged_weight() const { return const_cast<AdaptedLinear*>(this)->merged_weight_impl(); }

  /// Output rows decoded per tile on an NF4 base (default 256: one GEMM per tile stays efficient,
  /// and at in = 4096 the buffer is 4 MiB of fp32, 1/16 of the dense weight). Memory: tile_rows · in.
  void set_tile_rows(Index rows) {
    if (rows <= 0) throw ConfigError(who() + ": tile_rows must be > 0, got " + std::to_string(rows));
    tile_rows_ = rows;
  }
  Index tile_rows() const { return tile_rows_; }

  /// The layout of the NF4 base (block sizes, double quantization, dtype): what merge, unmerge and
  /// merge_and_requantize() keep. ConfigError on a dense base.
  quant::NF4Options quant_options() const;

  /// What the last re-quantization (merge, unmerge, merge_and_requantize on an NF4 base) added.
  const RequantizeReport& last_requantize() const { return last_requantize_; }

  /// PEFT's merge_and_unload on a 4-bit base: Q ← quantize(W₀ + Σ_active C_i) in the base's layout
  /// (or `opt`'s), the active adapters removed (their update now lives in the base). Reports the
  /// error this second rounding adds. Refused (ConfigError) on a dense base, with nothing active or
  /// while adapters are merged; NumericError (nothing changed) when the merged weight is not finite.
  RequantizeReport merge_and_requantize() {
    return merge_and_requantize(quantized() ? quant_options() : quant::NF4Options{});  // dense: refused below
  }
  RequantizeReport merge_and_requantize(const quant::NF4Options& opt);

  /// Freezes W and b (what get_peft_model does to every non-adapter weight; an NF4 base is frozen anyway).
  void freeze_base() {
    weight.set_trainable(false);
    if (has_bias()) bias.set_trainable(false);
  }

  // ---- adapter management -------------------------------------------------------------------

  /// Adds a LoRA (or, with config.use_dora, DoRA) adapter and makes it the only active one (PEFT's
  /// add_adapter + set_adapter). DoRA is refused while adapters are merged (its magnitude is
  /// initialised from W₀'s norm, which the merged weight is not).
  LoraAdapter<T>& add_adapter(const std::string& adapter_name, const LoraConfig& config, Rng& rng);

  /// Same, with the layer's generator (seeded at construction).
  LoraAdapter<T>& add_adapter(const std::string& adapter_name, const LoraConfig& config = {}) {
    return add_adapter(adapter_name, config, rng_);
  }

  /// Adds an adapter of any method (built for this layer's [out, in]) and makes it the only active one.
  AdapterMethod<T>& add_adapter(std::unique_ptr<AdapterMethod<T>> method);

  /// Removes an adapter. Refused while it is merged.
  /// Removes the adapter(s) of that name (one per method; only `peft_type`'s when given). Refused
  /// while merged.
  void delete_adapter(const std::string& adapter_name, const std::string& peft_type = "");

  /// Activates exactly these adapters (duplicates dropped, order kept); they become trainable and
  /// every other adapter is frozen, as PEFT's set_adapter does. An empty list leaves the base alone.
  void set_active(const std::vector<std::string>& names);
  void set_active(const std::string& adapter_name) { set_active(std::vector<std::string>{adapter_name}); }
  /// `set_active({"a", "b"})`: without this overload the braces would also match std::string's
  /// iterator-pair constructor (two const char*), an ambiguous call at best.
  void set_active(std::initializer_list<std::string> names) { set_active(std::vector<std::string>(names)); }

  /// While disabled, forward is the base layer alone (PEFT's disable_adapter()). Refused while merged.
  void disable_adapters(bool disabled = true) {
    if (disabled && !merged_.empty())
      throw ConfigError(who() + ": cannot disable adapters while some are merged; unmerge first");
    disabled_ = disabled;
    ++generation_;
  }
  bool adapters_disabled() const { return disabled_; }

  /// Switches one adapter off (every adapter of that name) while the others stay active: forward
  /// skips it exactly as if the layer did not hold it (the reference of DPO / PPO: an SFT adapter
  /// active and frozen, the policy adapter off). Neither the active set nor any trainable flag
  /// changes, and a cache filled before the switch stays valid for its backward (the cache records
  /// the adapters its forward ran). Allocates nothing. ConfigError for an unknown adapter, or when
  /// switching off a merged one (a merged adapter cannot be disabled; unmerge first). Like
  /// disable_adapters(), it does not affect forward_routed, whose rows name their adapter.
  void disable_adapter(const std::string& adapter_name, bool disabled = true);
  bool adapter_disabled(const std::string& adapter_name) const {
    return adapters_[index_of(adapter_name)]->switched_off();
  }

  bool has_adapter(const std::string& adapter_name) const { return find(adapter_name) != npos; }
  /// The index of an adapter in methods(), or -1.
  int adapter_index(const std::string& adapter_name) const {
    const std::size_t i = find(adapter_name);
    return i == npos ? -1 : static_cast<int>(i);
  }
  std::size_t num_adapters() const { return adapters_.size(); }
  /// Adapter i in insertion order (i < num_adapters()); unlike methods(), builds no list.
  AdapterMethod<T>& method_at(std::size_t i) { return *adapters_[i]; }
  const AdapterMethod<T>& method_at(std::size_t i) const { return *adapters_[i]; }

  /// An adapter by name (the first of that name: a name is unique per method, so a layer may hold a
  /// LoRA "default" and an (IA)³ "default", as PEFT keeps one dict per method; set_active, merge
  /// and delete_adapter act on every adapter of the name).
  AdapterMethod<T>& method(const std::string& adapter_name) { return *adapters_[index_of(adapter_name)]; }
  const AdapterMethod<T>& method(const std::string& adapter_name) const { return *adapters_[index_of(adapter_name)]; }

  /// A LoRA or DoRA adapter's factors and config by name (ConfigError for another method's).
  LoraAdapter<T>& adapter(const std::string& adapter_name) { return lora_of(adapter_name); }
  const LoraAdapter<T>& adapter(const std::string& adapter_name) const {
    return const_cast<AdaptedLinear*>(this)->lora_of(adapter_name);
  }

  /// Every adapter, in insertion order.
  AdapterRefs<AdapterMethod<T>> methods() {
    std::vector<AdapterMethod<T>*> v;
    for (auto& m : adapters_) v.push_back(m.get());
    return AdapterRefs<AdapterMethod<T>>(std::move(v));
  }
  AdapterRefs<const AdapterMethod<T>> methods() const {
    std::vector<const AdapterMethod<T>*> v;
    for (const auto& m : adapters_) v.push_back(m.get());
    return AdapterRefs<const AdapterMethod<T>>(std::move(v));
  }

  /// The LoRA and DoRA adapters, in insertion order (other methods: methods()).
  AdapterRefs<const LoraAdapter<T>> adapters() const {
    std::vector<const LoraAdapter<T>*> v;
    for (const auto& m : adapters_)
      if (auto* l = dynamic_cast<const LoraMethod<T>*>(m.get())) v.push_back(&l->adapter());
    return AdapterRefs<const LoraAdapter<T>>(std::move(v));
  }

  std::vector<std::string> active_adapters() const { return names_of(active_); }
  std::vector<std::string> merged_adapters() const { return names_of(merged_indices()); }
  /// The merged adapters themselves (in merge order).
  std::vector<const AdapterMethod<T>*> merged_methods() const {
    std::vector<const AdapterMethod<T>*> v;
    for (const auto& e : merged_) v.push_back(adapters_[e.adapter].get());
    return v;
  }
  bool merged() const { return !merged_.empty(); }

  // ---- merge / unmerge ----------------------------------------------------------------------

  /// W += C_i (and b += its bias part) for each named adapter (default: the active ones not yet
  /// merged), every C_i computed on W₀ (see the file comment). On an NF4 base W = deq(Q) + Σ C_i is
  /// re-quantized in the base's layout (lossy: last_requantize() has the error it added).
  /// With `peft_type`, only that method's adapters of those names.
  void merge(const std::vector<std::string>& names = {}, const std::string& peft_type = "") {
    merge_impl(names, false, peft_type);
  }

  /// As merge, but builds the new W aside and refuses (NumericError) if any entry is NaN or Inf;
  /// W is left untouched on failure.
  void safe_merge(const std::vector<std::string>& names = {}, const std::string& peft_type = "") {
    merge_impl(names, true, peft_type);
  }

  /// Undoes every merge: W ← W₀, b ← b₀ (see the file comment).
  /// On an NF4 base: deq(Q) → W₀ → re-quantized (lossy: one more rounding, see last_requantize()).
  void unmerge();

  /// PEFT's merge_and_unload on this layer: merges the named adapters (default: the active ones not
  /// yet merged), then drops every adapter, leaving W = W₀ + Σ_merged C_i and b: forward then costs
  /// what Linear costs. Refused (nothing changed) where merge refuses.
  void merge_and_unload(const std::vector<std::string>& names = {}) {
    merge(names);
    drop_adapters();
  }

  /// PEFT's unload: unmerges, then drops every adapter (the layer is its base again).
  void unload() {
    unmerge();
    drop_adapters();
  }

  /// DoRA's row norm n = ‖W₀ + s·B·A‖_row of a DoRA adapter [1, out], W₀ the weight with nothing merged.
  RowVector<T> dora_weight_norm(const std::string& adapter_name);

  /// The low-rank update of one adapter [out, in]: s·B·A for LoRA and DoRA (for DoRA the effective
  /// change is f ⊙ (W₀ + s·B·A) − W₀: effective_delta), ΔW for VeRA, LoHa and LoKr, 0 for (IA)³.
  Matrix<T> delta_weight(const std::string& adapter_name) const;

  /// What merging this adapter alone would add to W₀: C = diag(f − 1) W₀ + W₀ diag(h − 1) + D [out, in].
  Matrix<T> effective_delta(const std::string& adapter_name);

  // ---- forward / backward -------------------------------------------------------------------

  /// y = x Wᵀ + b + Σ over active, unmerged adapters of their terms. Reuses `y`, `cache` and the
  /// adapters' scratch, so repeated calls with the same shapes do not allocate.
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) { forward_into(x, y, cache, true); }

  /// The same output with nothing kept for backward (no copy of x): serving and evaluation.
  void forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y) { forward_into(x, y, inference_cache_, false); }

  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }

  /// forward() without the copy of x: the caller keeps x, once for several linears that read the
  /// same input (attention's q, k and v; a gated MLP's gate and up), and hands it back to
  /// backward(cache, dy, dx, x) when cache.needs_input. Same output, same gradients.
  void forward_shared_input(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
    forward_into(x, y, cache, false, true);
  }

  /// Accumulates dW, db and every active adapter's gradients (those trainable), writes dX into *dx
  /// unless dx is null.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx);
  /// The same after forward_shared_input: `x` is that forward's input [rows, in] (read only when
  /// cache.needs_input; after forward() the cache's own copy is used).
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx, const Matrix<T>& x);

  /// y = base(x) plus, on each row r, the term of adapter routing[r] (an index into methods(), or
  /// -1 for none): many adapters served in one batch (S-LoRA, Punica; PEFT's `adapter_names=`).
  /// One base GEMM covers all rows; each adapter's term runs on its gathered rows only. Inference:
  /// no dropout, no cache; ignores the active set and the disable flag. Refused while merged.
  void forward_routed(const ConstMatrixRef<T>& x, const std::vector<int>& routing, Matrix<T>& y,
                      RoutedWorkspace<T>& ws);

  /// Generator used for dropout masks (and by add_adapter without an explicit one); checkpointable.
  Rng& rng() { return rng_; }

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    if (!quantized()) fn("weight", weight);  // an NF4 base is no parameter (see quantized_weight())
    if (has_bias()) fn("bias", bias);
    for (auto& m : adapters_) m->visit_parameters(fn);
  }

 private:
  /// The layer's kind in messages: "LoRALinear", or "NF4LoRALinear" on an NF4 base.
  const char* kind_name() const { return quantized() ? "NF4LoRALinear" : "LoRALinear"; }
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);

  struct Merged {
    std::size_t adapter = 0;
    MergeRecord<T> record;  ///< gains and data fixed at merge time
  };

  std::string who() const { return describe(kind_name(), this->name()); }

  std::size_t find(const std::string& n) const {
    for (std::size_t i = 0; i < adapters_.size(); ++i)
      if (adapters_[i]->name() == n) return i;
    return npos;
  }

  std::size_t index_of(const std::string& n) const;

  /// Every adapter named n (of `peft_type` when not empty): at least one, else ConfigError.
  std::vector<std::size_t> indices_of(const std::string& n, const std::string& peft_type = "") const;

  LoraAdapter<T>& lora_of(const std::string& n);

  /// A name is unique per method (peft_type).
  void check_new_name(const std::string& n, const std::string& peft_type) const {
    check_adapter_name(who(), n);
    for (const auto& m : adapters_)
      if (m->name() == n && m->peft_type() == peft_type)
        throw ConfigError(who() + ": adapter \"" + n + "\" already exists");
  }

  void drop_adapters() {
    adapters_.clear();
    active_.clear();
    merged_.clear();
    disabled_ = false;
    ++generation_;
  }

  void push(std::unique_ptr<AdapterMethod<T>> m) {
    adapters_.push_back(std::move(m));
    active_ = {adapters_.size() - 1};
    sync_trainable();
    ++generation_;
  }

  void sync_trainable() {
    for (std::size_t i = 0; i < adapters_.size(); ++i)
      adapters_[i]->set_trainable(std::find(active_.begin(), active_.end(), i) != active_.end());
  }

  bool is_merged(std::size_t i) const {
    for (const auto& e : merged_)
      if (e.adapter == i) return true;
    return false;
  }

  std::vector<std::size_t> merged_indices() const {
    std::vector<std::size_t> v;
    for (const auto& e : merged_) v.push_back(e.adapter);
    return v;
  }

  std::vector<std::string> names_of(const std::vector<std::size_t>& idx) const {
    std::vector<std::string> out;
    for (std::size_t i : idx) out.push_back(adapters_[i]->name());
    return out;
  }

  /// "a, b, c" for messages.
  std::string join(const std::vector<std::size_t>& idx) const {
    std::string s;
    for (std::size_t i : idx) s += (s.empty() ? "" : ", ") + adapters_[i]->name();
    return s;
  }

  /// W₀ (a copy; dequantized on an NF4 base, recovered when something is merged).
  Matrix<T> w0() {
    Matrix<T> w = dequantized_weight();
    if (!merged_.empty()) recover_base(w, nullptr);
    return w;
  }

  Matrix<T> merged_weight_impl();

  // ---- the NF4 base's products (tile-wise; nothing dense of size [out, in]) ----

  /// ConfigError unless the layer has a base and an NF4 base is frozen.
  void check_base() const;
  /// y = x Wᵀ   [rows, out] (y already sized).
  void base_forward(const ConstMatrixRef<T>& x, Matrix<T>& y);
  /// dx = E W   [rows, in] (dx already sized).
  void base_input_grad(const ConstMatrixRef<T>& e, Matrix<T>& dx);
  /// Decodes base rows [r0, r0 + n) into the first n rows of tile_ (sized once to min(tile, out)
  /// rows, so a ragged last tile neither shrinks nor regrows it).
  void decode_tile(Index r0, Index n);
  /// W₀ dense for the methods that read it, on an NF4 base: deq(Q), recovered when merged; decoded
  /// into work_q_ once per layer state (generation).
  const Matrix<T>& nf4_w0();
  /// Q ← quantize(w) in `opt`'s layout; returns the error added.
  RequantizeReport requantize(const Matrix<T>& w, const quant::NF4Options& opt);

  /// The gains of the merged adapters, plus those of `extra`: row Σ (f − 1) [out], column Σ (h − 1)
  /// [in], bias Σ (g − 1) [out]; each flag false when no adapter has that gain.
  struct Gains {
    RowVector<T> row, col, bias;
    bool has_row = false, has_col = false, has_bias = false;
    void add(const MergeRecord<T>& r) {
      auto acc = [](RowVector<T>& v, bool& has, const RowVector<T>& g) {
        if (g.size() == 0) return;
        if (!has) v.setZero(g.size());
        has = true;
        v += g;
      };
      acc(row, has_row, r.row_gain);
      acc(col, has_col, r.col_gain);
      acc(bias, has_bias, r.bias_gain);
    }
  };

  Gains merged_gains() const {
    Gains g;
    for (const auto& e : merged_) g.add(e.record);
    return g;
  }

  /// w, b hold the current W, b on entry and W₀, b₀ on exit:
  ///   W₀ = (W − Σ_merged D_i) ⊘ (1 + Σ(f − 1)_j + Σ(h − 1)_k),  b₀ = b ⊘ (1 + Σ(g − 1)).
  void recover_base(Matrix<T>& w, Matrix<T>* b);

  /// acc += C = diag(f − 1) W₀ + W₀ diag(h − 1) + D of one adapter under `rec`.
  void add_contribution(AdapterMethod<T>& m, const MergeRecord<T>& rec, const Matrix<T>& base, Matrix<T>& acc) {
    if (rec.row_gain.size() > 0) acc.array() += base.array().colwise() * rec.row_gain.transpose().array();
    if (rec.col_gain.size() > 0) acc.array() += base.array().rowwise() * rec.col_gain.array();
    m.add_delta(rec, T(1), acc);
  }

  /// `fold`: merge_and_requantize (requantize in `opt`'s layout and delete the merged adapters).
  void merge_impl(const std::vector<std::string>& names, bool safe, const std::string& peft_type,
                  const quant::NF4Options* fold = nullptr);

  /// NumericError unless every divisor of recover_base under gains g is finite with |d| ≥ √ε.
  void check_divisors(const Gains& g, const std::vector<std::size_t>& pending,
                      const std::vector<MergeRecord<T>>& records) const;

  /// forward(), forward_inference() and forward_shared_input(): `keep_input` = whether to copy x into
  /// the cache when backward will read it; `caller_keeps_input` = forward_shared_input.
  void forward_into(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache, bool keep_input,
                    bool caller_keeps_input = false);
  /// backward() with the input x (the cache's copy or the caller's).
  void backward_with_input(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx, const Matrix<T>& x);

  quant::NF4Tensor q_;     ///< the NF4 base; empty shape on a dense layer
  Index tile_rows_ = 256;  ///< NF4 base rows decoded per tile
  RequantizeReport last_requantize_;
  std::vector<std::unique_ptr<AdapterMethod<T>>> adapters_;  ///< on the heap: stable addresses
  std::vector<std::size_t> active_;                          ///< indices into adapters_, in activation order
  std::vector<Merged> merged_;                               ///< merge order
  bool disabled_ = false;
  std::uint64_t generation_ = 1;
  Rng rng_{0x10a};
  Cache inference_cache_;  ///< forward_inference's buffers; never read by backward
  // Scratch, reused across calls (never part of a call's state: that lives in Cache).
  BaseGain<T> gain_;                     ///< backward's base-path gains
  Matrix<T> work_w0_;                    ///< W₀ recovered for forward while adapters are merged [out, in]
  Matrix<T> work_b0_;                    ///< b₀ likewise [1, out]
  RowVector<T> work_g_;                  ///< recover_base divisors
  Matrix<T> tile_;                       ///< NF4 base: decoded rows [tile_rows, in], reused by forward and backward
  Matrix<T> work_q_;                     ///< NF4 base: dense W₀ for the methods that read it [out, in] (else empty)
  std::uint64_t work_q_generation_ = 0;  ///< generation work_q_ was decoded under (0: never)
};

// ---- AdaptedLinear members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
AdaptedLinear<T>::AdaptedLinear(Index in_features, Index out_features, Rng& rng, bool with_bias, std::string name)
    : Module<T>(std::move(name)) {
  if (in_features <= 0 || out_features <= 0)
    throw ShapeError(describe(kind_name(), this->name()) + ": features must be > 0, got in=" +
                     std::to_string(in_features) + ", out=" + std::to_string(out_features));
  Linear<T> base(in_features, out_features, rng, with_bias, this->name());
  weight = std::move(base.weight);
  bias = std::move(base.bias);
  rng_.reseed(rng.next_u64());
}

template <class T>
AdaptedLinear<T>::AdaptedLinear(const AdaptedLinear& o)
    : Module<T>(o),
      weight(o.weight),
      bias(o.bias),
      q_(o.q_),
      tile_rows_(o.tile_rows_),
      last_requantize_(o.last_requantize_),
      active_(o.active_),
      merged_(o.merged_),
      disabled_(o.disabled_),
      generation_(o.generation_),
      rng_(o.rng_) {
  adapters_.reserve(o.adapters_.size());
  for (const auto& m : o.adapters_) adapters_.push_back(m->clone());
}

template <class T>
AdaptedLinear<T>& AdaptedLinear<T>::operator=(const AdaptedLinear& o) {
  if (this != &o) *this = AdaptedLinear(o);
  return *this;
}

template <class T>
AdaptedLinear<T>::AdaptedLinear(AdaptedLinear&&) noexcept = default;
template <class T>
AdaptedLinear<T>& AdaptedLinear<T>::operator=(AdaptedLinear&&) noexcept = default;
template <class T>
AdaptedLinear<T>::~AdaptedLinear() = default;

template <class T>
LoraAdapter<T>& AdaptedLinear<T>::add_adapter(const std::string& adapter_name, const LoraConfig& config, Rng& rng) {
  check_new_name(adapter_name, "LORA");
  if (config.use_dora && !merged_.empty())
    throw ConfigError(who() + ": cannot add DoRA adapter \"" + adapter_name + "\" while adapters are merged (" +
                      join(merged_indices()) + "); its magnitude would be taken from the merged weight");
  // On an NF4 base only DoRA reads W₀ (its magnitude): plain LoRA needs the shape alone.
  auto m = !quantized() ? make_lora<T>(adapter_name, config, weight.value, rng, kind_name(), this->name())
           : config.use_dora
               ? make_lora<T>(adapter_name, config, nf4_w0(), rng, kind_name(), this->name())
               : make_lora<T>(adapter_name, config, in_features(), out_features(), rng, kind_name(), this->name());
  LoraAdapter<T>& a = m->adapter();
  push(std::move(m));
  return a;
}

template <class T>
AdapterMethod<T>& AdaptedLinear<T>::add_adapter(std::unique_ptr<AdapterMethod<T>> method) {
  if (!method) throw ConfigError(who() + ": add_adapter got no adapter");
  check_new_name(method->name(), method->peft_type());
  AdapterMethod<T>& m = *method;
  push(std::move(method));
  return m;
}

template <class T>
void AdaptedLinear<T>::delete_adapter(const std::string& adapter_name, const std::string& peft_type) {
  const std::vector<std::size_t> idx = indices_of(adapter_name, peft_type);
  for (std::size_t i : idx)
    if (is_merged(i))
      throw ConfigError(who() + ": adapter \"" + adapter_name + "\" is merged; unmerge before deleting it");
  for (std::size_t k = idx.size(); k-- > 0;) {  // highest index first
    const std::size_t i = idx[k];
    adapters_.erase(adapters_.begin() + static_cast<std::ptrdiff_t>(i));
    active_.erase(std::remove(active_.begin(), active_.end(), i), active_.end());
    for (auto& a : active_)
      if (a > i) --a;
    for (auto& e : merged_)
      if (e.adapter > i) --e.adapter;
  }
  ++generation_;
}

template <class T>
void AdaptedLinear<T>::disable_adapter(const std::string& adapter_name, bool disabled) {
  index_of(adapter_name);  // ConfigError naming the adapters when there is none of that name
  for (std::size_t i = 0; i < adapters_.size(); ++i) {
    if (adapters_[i]->name() != adapter_name) continue;
    if (disabled && is_merged(i))
      throw ConfigError(who() + ": cannot disable adapter \"" + adapter_name + "\" while it is merged; unmerge first");
    adapters_[i]->set_switched_off(disabled);
  }
}

template <class T>
void AdaptedLinear<T>::set_active(const std::vector<std::string>& names) {
  std::vector<std::size_t> next;
  for (const auto& n : names)
    for (std::size_t i : indices_of(n))
      if (std::find(next.begin(), next.end(), i) == next.end()) next.push_back(i);
  active_ = std::move(next);
  sync_trainable();
  ++generation_;
}

template <class T>
RowVector<T> AdaptedLinear<T>::dora_weight_norm(const std::string& adapter_name) {
  DoraMethod<T>* d = nullptr;
  for (std::size_t i : indices_of(adapter_name))
    if (d == nullptr) d = dynamic_cast<DoraMethod<T>*>(adapters_[i].get());
  if (d == nullptr) throw ConfigError(who() + ": adapter \"" + adapter_name + "\" is not a DoRA adapter");
  RowVector<T> n;
  d->weight_norm(w0(), n);
  return n;
}

template <class T>
Matrix<T> AdaptedLinear<T>::delta_weight(const std::string& adapter_name) const {
  const std::size_t i = index_of(adapter_name);
  Matrix<T> d = Matrix<T>::Zero(out_features(), in_features());
  if (const auto* l = dynamic_cast<const LoraMethod<T>*>(adapters_[i].get())) {
    const LoraAdapter<T>& a = l->adapter();
    d.noalias() = static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
    return d;
  }
  adapters_[i]->add_delta(MergeRecord<T>{}, T(1), d);
  return d;
}

template <class T>
Matrix<T> AdaptedLinear<T>::effective_delta(const std::string& adapter_name) {
  const std::size_t i = index_of(adapter_name);
  const Matrix<T> base = w0();
  MergeRecord<T> rec;
  adapters_[i]->merge_record(base, nullptr, rec);
  Matrix<T> c = Matrix<T>::Zero(out_features(), in_features());
  add_contribution(*adapters_[i], rec, base, c);
  return c;
}

template <class T>
void AdaptedLinear<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
  if (cache.input_by_caller && cache.needs_input)
    throw ConfigError(who() +
                      ": the forward was forward_shared_input, which keeps no copy of the input; pass the input to "
                      "backward(cache, dy, dx, x)");
  backward_with_input(cache, dy, dx, cache.x);
}

template <class T>
void AdaptedLinear<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx, const Matrix<T>& x) {
  if (!cache.input_by_caller) {
    backward_with_input(cache, dy, dx, cache.x);
    return;
  }
  if (cache.needs_input)
    check::shape(kind_name(), this->name(), "input handed to backward", x.rows(), x.cols(), cache.rows, in_features());
  backward_with_input(cache, dy, dx, x);
}

template <class T>
void AdaptedLinear<T>::backward_with_input(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx,
                                           const Matrix<T>& x) {
  if (cache.generation == 0) throw ConfigError(who() + ": backward called with a cache that no forward filled");
  if (!merged_.empty())
    throw ConfigError(who() + ": cannot train while adapters are merged (" + join(merged_indices()) +
                      "); unmerge first");
  if (cache.generation != generation_)
    throw ConfigError(who() +
                      ": adapters were added, removed, (un)merged or switched between forward and backward; run "
                      "forward again");
  check::shape(kind_name(), this->name(), "output gradient", dy.rows(), dy.cols(), cache.rows, out_features());
  check_base();
  if (weight.trainable())
    check::shape(kind_name(), this->name(), "cached input (was a parameter unfrozen after forward?)", x.rows(),
                 x.cols(), cache.rows, in_features());

  // Base path: E = dY ⊙ (1 + Σ (f − 1)) over the adapters that scale x W₀ᵀ (E = dY otherwise):
  // dW = Eᵀ X [out, in], dX = E W [rows, in], db = Σ_rows dY ⊙ (1 + Σ (g − 1)).
  gain_.has_z = gain_.has_b = false;
  for (std::size_t k = 0; k < cache.used; ++k)
    adapters_[cache.slots[k].adapter]->add_base_gain(*cache.slots[k].state, gain_);
  const Matrix<T>* e = nullptr;
  // E [rows, out] and P [rows, in] (below) are the thread's scratch (core/scratch.hpp), shared by
  // every linear of that width.
  if (gain_.has_z) {
    Matrix<T>& work_e = scratch<T>(ScratchOwner::AdaptedLinear, 0, dy.rows(), out_features());
    parallel_add_self_scaled_columns<T>(work_e, dy, gain_.z);  // E = dY + dY ⊙ Σ (f − 1)
    e = &work_e;
  }
  const ConstMatrixRef<T> E = e != nullptr ? ConstMatrixRef<T>(*e) : dy;
  // Folded input gains: the base input was X̃ = x ⊙ h, so dW = Eᵀ X̃ and dX = (E W) ⊙ h; the
  // input-scaling adapters read P = E W (before ⊙ h) for their own gradient. No output gain can be
  // set then (the adapters that give one read x W₀ᵀ, which forward excluded), so E = dY.
  const Matrix<T>& x_base = cache.folded ? cache.xs : x;
  if (weight.trainable()) gemm(weight.accumulator(), E.transpose(), x_base, T(1), true);  // dW += Eᵀ X   [out, in]
  bool need_p = false;
  if (cache.folded)
    for (std::size_t k = 0; k < cache.used && !need_p; ++k)
      need_p = cache.slots[k].folded && adapters_[cache.slots[k].adapter]->any_trainable();
  Matrix<T>* p = dx != nullptr ? dx
                 : need_p      ? &scratch<T>(ScratchOwner::AdaptedLinear, 1, dy.rows(), in_features())
                               : nullptr;
  if (p != nullptr) {
    p->resize(dy.rows(), in_features());
    base_input_grad(E, *p);  // dX = E W   [rows, in] (tile-wise on an NF4 base)
  }
  if (has_bias() && bias.trainable()) {
    if (gain_.has_b) gain_.b.array() += T(1);  // 1 + Σ (g − 1): backward's last use of the gain
    // db = Σ_rows dY (⊙ (1 + Σ (g − 1))), columns split between threads
    add_column_sums<T>(dy, bias.accumulator().data(), gain_.has_b ? gain_.b.data() : nullptr);
  }

  GradInput<T> in;
  in.x = &x;
  in.z = &cache.z;
  if (!quantized()) {
    in.w0 = &weight.value;
  } else {
    for (std::size_t k = 0; k < cache.used && in.w0 == nullptr; ++k)
      if (adapters_[cache.slots[k].adapter]->needs_base_weight(this->training())) in.w0 = &nf4_w0();
  }
  in.b0 = has_bias() ? &bias.value : nullptr;
  in.dw = weight.trainable() ? &weight.accumulator() : nullptr;
  if (cache.folded) {
    GradInput<T> folded = in;
    folded.input_folded = true;
    folded.p = p;
    for (std::size_t k = 0; k < cache.used; ++k)
      if (cache.slots[k].folded)
        adapters_[cache.slots[k].adapter]->backward(folded, *cache.slots[k].state, dy, nullptr);
    if (dx != nullptr) parallel_scale_columns<T>(*dx, *dx, cache.h);  // dX = P ⊙ h
  }
  for (std::size_t k = 0; k < cache.used; ++k)
    if (!cache.slots[k].folded) adapters_[cache.slots[k].adapter]->backward(in, *cache.slots[k].state, dy, dx);
}

template <class T>
void AdaptedLinear<T>::forward_routed(const ConstMatrixRef<T>& x, const std::vector<int>& routing, Matrix<T>& y,
                                      RoutedWorkspace<T>& ws) {
  if (!merged_.empty())
    throw ConfigError(who() + ": mixed-adapter batches need an unmerged layer (merged: " + join(merged_indices()) +
                      "); unmerge first");
  check::input_features(kind_name(), this->name(), x.cols(), in_features());
  if (static_cast<Index>(routing.size()) != x.rows())
    throw ShapeError(who() + ": mixed batch has " + std::to_string(x.rows()) + " rows but " +
                     std::to_string(routing.size()) + " row adapter entries");
  const Index rows = x.rows(), in = in_features(), out = out_features();
  const std::size_t n = adapters_.size();
  for (std::size_t r = 0; r < routing.size(); ++r)
    if (routing[r] != -1 && (routing[r] < 0 || static_cast<std::size_t>(routing[r]) >= n))
      throw ConfigError(who() + ": row " + std::to_string(r) + " is routed to adapter " + std::to_string(routing[r]) +
                        ", expected -1 (none) or an index in [0, " + std::to_string(n) + ")");

  // Group rows by adapter (counting sort: stable, O(rows + n)).
  ws.count.assign(n, 0);
  for (int a : routing)
    if (a >= 0) ++ws.count[static_cast<std::size_t>(a)];
  ws.start.resize(n + 1);
  ws.start[0] = 0;
  bool need_z = false, need_w = false;  // need_w: an NF4 base is decoded densely only for methods that read W₀
  for (std::size_t a = 0; a < n; ++a) {
    ws.start[a + 1] = ws.start[a] + ws.count[a];
    if (ws.count[a] == 0) continue;
    need_z = need_z || adapters_[a]->needs_base_output(false);
    need_w = need_w || adapters_[a]->needs_base_weight(false);
  }
  ws.order.resize(static_cast<std::size_t>(ws.start[n]));
  std::fill(ws.count.begin(), ws.count.end(), 0);  // reused as fill cursor
  for (Index r = 0; r < rows; ++r) {
    const int a = routing[static_cast<std::size_t>(r)];
    if (a < 0) continue;
    const std::size_t ua = static_cast<std::size_t>(a);
    ws.order[static_cast<std::size_t>(ws.start[ua] + ws.count[ua]++)] = r;
  }

  check_base();
  const Matrix<T>* w0 = !quantized() ? &weight.value : need_w ? &nf4_w0() : nullptr;
  y.resize(rows, out);
  base_forward(x, y);  // x Wᵀ   [rows, out]
  if (need_z) ws.z = y;
  if (has_bias()) y.rowwise() += bias.value.row(0);
  if (ws.xg.size() < n) {
    ws.xg.resize(n);
    ws.zg.resize(n);
    ws.up.resize(n);
  }
  for (std::size_t a = 0; a < n; ++a) {
    const Index m = ws.start[a + 1] - ws.start[a];
    if (m == 0) continue;
    const Index* rows_a = ws.order.data() + ws.start[a];
    Matrix<T>& xg = ws.xg[a];
    Matrix<T>& up = ws.up[a];
    xg.resize(m, in);
    for (Index j = 0; j < m; ++j) xg.row(j) = x.row(rows_a[j]);  // X_a = x[R_a]   [m, in]
    TermInput<T> tin{ConstMatrixRef<T>(xg)};
    if (adapters_[a]->needs_base_output(false)) {
      ws.zg[a].resize(m, out);
      for (Index j = 0; j < m; ++j) ws.zg[a].row(j) = ws.z.row(rows_a[j]);
      tin.z = &ws.zg[a];
    }
    tin.w0 = w0;
    tin.b0 = has_bias() ? &bias.value : nullptr;
    tin.training = false;
    tin.rng = &rng_;
    up.setZero(m, out);
    adapters_[a]->forward(tin, up, nullptr);                      // U_a = t_a(X_a)   [m, out]
    for (Index j = 0; j < m; ++j) y.row(rows_a[j]) += up.row(j);  // y[R_a] += U_a
  }
}

template <class T>
std::size_t AdaptedLinear<T>::index_of(const std::string& n) const {
  const std::size_t i = find(n);
  if (i == npos) {
    std::vector<std::size_t> all(adapters_.size());
    for (std::size_t k = 0; k < all.size(); ++k) all[k] = k;
    throw ConfigError(who() + ": unknown adapter \"" + n + "\"; available: [" + join(all) + "]");
  }
  return i;
}

template <class T>
std::vector<std::size_t> AdaptedLinear<T>::indices_of(const std::string& n, const std::string& peft_type) const {
  std::vector<std::size_t> v;
  for (std::size_t i = 0; i < adapters_.size(); ++i)
    if (adapters_[i]->name() == n && (peft_type.empty() || adapters_[i]->peft_type() == peft_type)) v.push_back(i);
  if (v.empty() && !peft_type.empty() && find(n) != npos)
    throw ConfigError(who() + ": adapter \"" + n + "\" is not a " + peft_type + " adapter");
  if (v.empty()) (void)index_of(n);
  return v;
}

template <class T>
LoraAdapter<T>& AdaptedLinear<T>::lora_of(const std::string& n) {
  // No vector of indices here: adapter() is an accessor a training loop may call every step.
  for (const auto& m : adapters_)
    if (m->name() == n)
      if (auto* l = dynamic_cast<LoraMethod<T>*>(m.get())) return l->adapter();
  const std::vector<std::size_t> idx = indices_of(n);  // throws for an unknown name
  throw ConfigError(who() + ": adapter \"" + n + "\" is a " + adapters_[idx.front()]->kind() +
                    " adapter, not LoRA; use method()");
}

template <class T>
void AdaptedLinear<T>::recover_base(Matrix<T>& w, Matrix<T>* b) {
  for (std::size_t k = merged_.size(); k-- > 0;)  // last merged first
    adapters_[merged_[k].adapter]->add_delta(merged_[k].record, T(-1), w);
  const Gains g = merged_gains();
  if (g.has_row && g.has_col) {
    for (Index j = 0; j < w.rows(); ++j) w.row(j).array() /= (g.col.array() + (T(1) + g.row(j)));
  } else if (g.has_row) {
    work_g_ = g.row.array() + T(1);
    w.array().colwise() /= work_g_.transpose().array();
  } else if (g.has_col) {
    work_g_ = g.col.array() + T(1);
    w.array().rowwise() /= work_g_.array();
  }
  if (b != nullptr && g.has_bias) b->row(0).array() /= (g.bias.array() + T(1));
}

template <class T>
void AdaptedLinear<T>::merge_impl(const std::vector<std::string>& names, bool safe, const std::string& peft_type,
                                  const quant::NF4Options* fold) {
  if (disabled_)
    throw ConfigError(who() +
                      ": adapters are disabled; enable them before merging (a merged adapter cannot be disabled)");
  std::vector<std::size_t> pending;
  if (names.empty()) {
    for (std::size_t i : active_)
      if (!is_merged(i) && (peft_type.empty() || adapters_[i]->peft_type() == peft_type)) pending.push_back(i);
  } else {
    for (const auto& n : names)
      for (std::size_t i : indices_of(n, peft_type)) {
        if (is_merged(i) || std::find(pending.begin(), pending.end(), i) != pending.end())
          throw ConfigError(who() + ": adapter \"" + n + "\" is already merged");
        pending.push_back(i);
      }
  }
  for (std::size_t i : pending)
    if (adapters_[i]->switched_off())
      throw ConfigError(who() + ": adapter \"" + adapters_[i]->name() +
                        "\" is disabled; enable it before merging (a merged adapter cannot be disabled)");
  if (pending.empty()) {
    if (fold != nullptr) throw ConfigError(who() + ": no active adapter to merge");
    return;
  }

  // The current W, dense: the weight itself, or deq(Q) on an NF4 base (merged there and re-quantized).
  Matrix<T> w_nf4;
  if (quantized()) w_nf4 = quant::dequantize_nf4<T>(q_);
  Matrix<T>& w = quantized() ? w_nf4 : weight.value;

  // W₀ and b₀: W and b unless something is merged, else recovered (every term is on W₀).
  Matrix<T> w0_store, b0_store;
  const Matrix<T>* w0 = &w;
  const Matrix<T>* b0 = has_bias() ? &bias.value : nullptr;
  if (!merged_.empty()) {
    w0_store = w;
    if (has_bias()) b0_store = bias.value;
    recover_base(w0_store, has_bias() ? &b0_store : nullptr);
    w0 = &w0_store;
    if (has_bias()) b0 = &b0_store;
  }
  // All checks before W changes: every record finite, and the divisors of recover_base
  // (1 + Σ row + Σ col, 1 + Σ bias over merged ∪ pending) at least √ε in magnitude, so W₀ stays
  // recoverable. Dividing by d amplifies rounding by 1/|d|: |d| < √ε would leave fewer than half
  // the digits of W₀, so it counts as zero.
  std::vector<MergeRecord<T>> records(pending.size());
  Gains g = merged_gains();
  bool pending_gain = false;
  for (std::size_t k = 0; k < pending.size(); ++k) {
    try {
      adapters_[pending[k]]->merge_record(*w0, b0, records[k]);
    } catch (const NumericError& e) {
      throw NumericError(who() + ": " + e.what());
    }
    const MergeRecord<T>& r = records[k];
    pending_gain = pending_gain || r.row_gain.size() > 0 || r.col_gain.size() > 0 || r.bias_gain.size() > 0;
    g.add(r);
  }
  // Folded adapters leave the merge stack: W₀ need not be recoverable afterwards.
  if (pending_gain && fold == nullptr) check_divisors(g, pending, records);

  // Safe: W + C_1 + C_2 + … built aside, checked after each adapter, swapped in at the end.
  // Plain: U = Σ C_i built aside (every allocation happens here), then W += U, which cannot fail:
  // both leave no partial merge behind. An NF4 base is re-quantized from W + U before anything changes.
  Matrix<T> acc = safe ? w : Matrix<T>::Zero(out_features(), in_features());
  for (std::size_t k = 0; k < pending.size(); ++k) {
    add_contribution(*adapters_[pending[k]], records[k], *w0, acc);
    if (safe && !all_finite(acc))
      throw NumericError(who() + ": merging adapter \"" + adapters_[pending[k]]->name() +
                         "\" gives NaN or Inf in the weight; nothing was merged");
  }
  Matrix<T> new_bias;
  if (has_bias()) {
    new_bias = bias.value;
    for (const auto& r : records)
      if (r.bias_gain.size() > 0) new_bias.row(0).array() += b0->row(0).array() * r.bias_gain.array();
    if (safe && !all_finite(new_bias))
      throw NumericError(who() + ": merging gives NaN or Inf in the bias; nothing was merged");
  }
  if (quantized()) {
    if (!safe) acc += w;  // W + U
    if (!all_finite(acc))
      throw NumericError(who() + ": the merged weight has NaN or Inf; nothing was merged (an NF4 base cannot hold it)");
    last_requantize_ = requantize(acc, fold != nullptr ? *fold : quant_options());
  } else if (safe) {
    weight.value.swap(acc);
  } else {
    weight.value += acc;
  }
  if (has_bias()) bias.value.swap(new_bias);
  ++generation_;
  if (fold != nullptr) {  // the update now lives in the base: the adapters go
    std::sort(pending.begin(), pending.end());
    last_requantize_.merged = names_of(pending);
    for (std::size_t k = pending.size(); k-- > 0;) {
      const std::size_t i = pending[k];
      adapters_.erase(adapters_.begin() + static_cast<std::ptrdiff_t>(i));
      active_.erase(std::remove(active_.begin(), active_.end(), i), active_.end());
      for (auto& a : active_)
        if (a > i) --a;
    }
    return;
  }
  for (std::size_t k = 0; k < pending.size(); ++k) merged_.push_back({pending[k], std::move(records[k])});
}

template <class T>
void AdaptedLinear<T>::unmerge() {
  if (merged_.empty()) return;
  if (quantized()) {
    Matrix<T> w = quant::dequantize_nf4<T>(q_);
    recover_base(w, has_bias() ? &bias.value : nullptr);
    last_requantize_ = requantize(w, quant_options());
  } else {
    recover_base(weight.value, has_bias() ? &bias.value : nullptr);
  }
  merged_.clear();
  ++generation_;
}

template <class T>
typename AdaptedLinear<T>::RequantizeReport AdaptedLinear<T>::merge_and_requantize(const quant::NF4Options& opt) {
  if (!quantized())
    throw ConfigError(who() +
                      ": merge_and_requantize needs an NF4 base; on a dense base use merge() and delete_adapter()");
  if (!merged_.empty())
    throw ConfigError(who() + ": adapters are merged (" + join(merged_indices()) +
                      "); unmerge them before folding the active adapters into the base");
  merge_impl({}, true, "", &opt);
  return last_requantize_;
}

template <class T>
typename AdaptedLinear<T>::RequantizeReport AdaptedLinear<T>::requantize(const Matrix<T>& w,
                                                                         const quant::NF4Options& opt) {
  quant::NF4Tensor next = quant::quantize_nf4<T>(w, opt);
  RequantizeReport rep;
  const Matrix<T> back = quant::dequantize_nf4<T>(next);
  rep.added_error = (back - w).template cast<double>().norm();
  const double wn = w.template cast<double>().norm();
  rep.relative_error = wn > 0.0 ? rep.added_error / wn : rep.added_error;
  q_ = std::move(next);
  return rep;
}

template <class T>
quant::NF4Options AdaptedLinear<T>::quant_options() const {
  if (!quantized()) throw ConfigError(who() + ": the base is dense, not NF4; it has no quantization layout");
  quant::NF4Options o;
  o.blocksize = q_.blocksize;
  o.double_quant = q_.nested;
  o.nested_blocksize = q_.nested_blocksize;
  o.dtype = q_.dtype == "float16" ? "float16" : q_.dtype == "bfloat16" ? "bfloat16" : "float32";
  return o;
}

template <class T>
Matrix<T> AdaptedLinear<T>::merged_weight_impl() {
  Matrix<T> w = dequantized_weight();
  Matrix<T> base = w;
  if (!merged_.empty()) recover_base(base, nullptr);
  if (disabled_) return w;
  for (std::size_t i : active_) {
    if (is_merged(i) || adapters_[i]->switched_off()) continue;
    MergeRecord<T> rec;
    adapters_[i]->merge_record(base, nullptr, rec);
    add_contribution(*adapters_[i], rec, base, w);
  }
  return w;
}

template <class T>
AdaptedLinear<T>::AdaptedLinear(quant::NF4Tensor q, const RowVector<T>& b, std::string name, std::uint64_t dropout_seed)
    : Module<T>(std::move(name)), rng_(dropout_seed) {
  const std::string w = describe("NF4LoRALinear", this->name());
  q.validate(w);
  if (q.shape.size() != 2)
    throw ShapeError(w + ": quantized weight must be 2-D [out, in], got shape " +
                     quant::detail::nf4_shape_str(q.shape));
  if (b.size() > 0) {
    check::shape("NF4LoRALinear", this->name(), "bias", 1, b.size(), 1, static_cast<Index>(q.rows()));
    bias = Parameter<T>(1, b.size(), false, true);
    bias.value = b;
  }
  q_ = std::move(q);
}

template <class T>
void AdaptedLinear<T>::check_base() const {
  if (!quantized() && weight.value.size() == 0) throw ConfigError(who() + ": has no weight (default-constructed)");
  if (quantized() && weight.trainable())
    throw ConfigError(who() + ": the NF4 base is frozen (4-bit codes get no gradient); `weight` must stay frozen");
}

template <class T>
void AdaptedLinear<T>::decode_tile(Index r0, Index n) {
  const Index cap = std::min(tile_rows_, out_features());
  if (tile_.rows() != cap || tile_.cols() != in_features()) tile_.resize(cap, in_features());
  quant::dequantize_nf4_range<T>(q_, static_cast<std::int64_t>(r0) * in_features(),
                                 static_cast<std::int64_t>(n) * in_features(), tile_.data());
}

template <class T>
void AdaptedLinear<T>::base_forward(const ConstMatrixRef<T>& x, Matrix<T>& y) {
  if (!quantized()) {
    gemm(y, x, weight.value.transpose());  // x Wᵀ   [rows, out]
    return;
  }
  const Index out = out_features();
  for (Index r0 = 0; r0 < out; r0 += tile_rows_) {
    const Index n = std::min(tile_rows_, out - r0);
    decode_tile(r0, n);                                          // W_t [n, in]
    gemm(y.middleCols(r0, n), x, tile_.topRows(n).transpose());  // y[:, t] = x W_tᵀ   [rows, n]
  }
}

template <class T>
void AdaptedLinear<T>::base_input_grad(const ConstMatrixRef<T>& e, Matrix<T>& dx) {
  if (!quantized()) {
    gemm(dx, e, weight.value);  // dX = E W   [rows, in]
    return;
  }
  const Index out = out_features();
  for (Index r0 = 0; r0 < out; r0 += tile_rows_) {
    const Index n = std::min(tile_rows_, out - r0);
    decode_tile(r0, n);                                             // W_t [n, in]
    gemm(dx, e.middleCols(r0, n), tile_.topRows(n), T(1), r0 > 0);  // dX (+)= E[:, t] W_t   [rows, in]
  }
}

template <class T>
const Matrix<T>& AdaptedLinear<T>::nf4_w0() {
  if (work_q_generation_ != generation_) {
    quant::dequantize_nf4_rows<T>(q_, 0, out_features(), work_q_);  // deq(Q)   [out, in]
    if (!merged_.empty()) recover_base(work_q_, nullptr);
    work_q_generation_ = generation_;
  }
  return work_q_;
}

template <class T>
void AdaptedLinear<T>::check_divisors(const Gains& g, const std::vector<std::size_t>& pending,
                                      const std::vector<MergeRecord<T>>& records) const {
  const T g_min = std::sqrt(std::numeric_limits<T>::epsilon());
  auto bad = [&](T d) { return !std::isfinite(d) || std::abs(d) < g_min; };
  T value = T(0);
  std::string where;
  if (g.has_row || g.has_col) {
    const Index rows = g.has_row ? g.row.size() : 1, cols = g.has_col ? g.col.size() : 1;
    for (Index j = 0; j < rows && where.empty(); ++j)
      for (Index k = 0; k < cols; ++k) {
        const T d = T(1) + (g.has_row ? g.row(j) : T(0)) + (g.has_col ? g.col(k) : T(0));
        if (bad(d)) {
          value = d;
          where = g.has_row && g.has_col ? "in row " + std::to_string(j) + ", column " + std::to_string(k)
                  : g.has_row            ? "in row " + std::to_string(j)
                                         : "in column " + std::to_string(k);
          break;
        }
      }
  }
  if (where.empty() && g.has_bias)
    for (Index j = 0; j < g.bias.size(); ++j)
      if (bad(T(1) + g.bias(j))) {
        value = T(1) + g.bias(j);
        where = "in bias entry " + std::to_string(j);
        break;
      }
  if (where.empty()) return;
  // The adapters with a gain, merged ones first.
  std::vector<std::size_t> scaled;
  std::string kinds;
  auto note = [&](std::size_t i, const MergeRecord<T>& r) {
    if (r.row_gain.size() == 0 && r.col_gain.size() == 0 && r.bias_gain.size() == 0) return;
    scaled.push_back(i);
    const std::string k = adapters_[i]->kind();
    if (kinds.empty())
      kinds = k;
    else if (kinds != k)
      kinds = "scaling";
  };
  for (const auto& e : merged_) note(e.adapter, e.record);
  for (std::size_t k = 0; k < pending.size(); ++k) note(pending[k], records[k]);
  std::string quoted;
  for (std::size_t i : scaled) quoted += (quoted.empty() ? "\"" : ", \"") + adapters_[i]->name() + "\"";
  const bool many = scaled.size() > 1;
  throw NumericError(who() + ": " + kinds + " adapter" + (many ? "s " : " ") + quoted + (many ? " have" : " has") +
                     " a zero or non-finite scale: 1 + Σ (scale − 1) is " + check::num(value) + " " + where +
                     " (|scale| < √ε = " + check::num(g_min) +
                     " counts as 0), so the weight with nothing merged could not be recovered and the merge could "
                     "not be undone; nothing was merged");
}

template <class T>
void AdaptedLinear<T>::forward_into(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache, bool keep_input,
                                    bool caller_keeps_input) {
  check_base();
  check::input_features(kind_name(), this->name(), x.cols(), in_features());
  const Index rows = x.rows();
  y.resize(rows, out_features());

  cache.rows = rows;
  cache.generation = generation_;
  cache.used = 0;
  const bool training = this->training();
  bool need_z = false, need_w = false, any = false, scales_input = false;
  if (!disabled_)
    for (std::size_t i : active_)
      if (!is_merged(i) && !adapters_[i]->switched_off()) {
        any = true;
        need_z = need_z || adapters_[i]->needs_base_output(training);
        need_w = need_w || adapters_[i]->needs_base_weight(training);
        if (adapters_[i]->scales_input()) {
          if (!scales_input) cache.h.setOnes(in_features());
          scales_input = true;
          adapters_[i]->add_input_gain(cache.h);  // h = 1 + Σ (h_i − 1)   [in]
        }
      }
  // Input gains ((IA)³ on inputs) fold into the base product, (x ⊙ h) Wᵀ, when W is W₀ (nothing
  // merged) and no adapter reads x W₀ᵀ (which would then be x ⊙ h W₀ᵀ): one product instead of one
  // more per such adapter, and as PEFT computes its IA3 layer.
  cache.folded = scales_input && !need_z && merged_.empty();
  if (cache.folded) {
    parallel_scale_columns<T>(cache.xs, x, cache.h);  // x ⊙ h   [rows, in]
    base_forward(cache.xs, y);                        // base: (x ⊙ h) Wᵀ   [rows, out]
  } else {
    base_forward(x, y);  // base: x Wᵀ   [rows, out] (tile-wise on an NF4 base)
  }
  // Unmerged adapters read W₀ and b₀: W and b unless something is merged, else recovered. On an
  // NF4 base, W₀ dense only when a method reads it or something is merged (then x W₀ᵀ needs it too).
  const Matrix<T>* w0 = quantized() ? nullptr : &weight.value;
  const Matrix<T>* b0 = has_bias() ? &bias.value : nullptr;
  if (any && !merged_.empty()) {
    if (quantized()) {
      w0 = &nf4_w0();
    } else {
      work_w0_ = weight.value;
      recover_base(work_w0_, nullptr);
      w0 = &work_w0_;
    }
    if (has_bias()) {
      work_b0_ = bias.value;
      const Gains g = merged_gains();
      if (g.has_bias) work_b0_.row(0).array() /= (g.bias.array() + T(1));  // b₀ = b ⊘ (1 + Σ (g − 1))
      b0 = &work_b0_;
    }
  } else if (any && need_w && quantized()) {
    w0 = &nf4_w0();
  }
  if (!need_z) {
    cache.z.resize(0, 0);
  } else if (merged_.empty()) {
    parallel_assign<T>(cache.z, y);  // x W₀ᵀ: the base product before the bias
  } else {
    cache.z.resize(rows, out_features());
    gemm(cache.z, x, w0->transpose());  // x W₀ᵀ   [rows, out]
  }
  if (has_bias()) parallel_add_to_rows<T>(y, bias.value);

  bool need_x = weight.trainable();
  if (any) {
    TermInput<T> in(x);
    in.z = need_z ? &cache.z : nullptr;
    in.w0 = w0;
    in.b0 = b0;
    in.training = training;
    in.rng = &rng_;
    in.input_folded = cache.folded;
    for (std::size_t i : active_) {
      if (is_merged(i) || adapters_[i]->switched_off()) continue;
      if (cache.slots.size() <= cache.used) cache.slots.emplace_back();
      Slot& slot = cache.slots[cache.used++];
      slot.adapter = i;
      slot.folded = cache.folded && adapters_[i]->scales_input();
      need_x = adapters_[i]->forward(in, y, &slot.state) || need_x;
      if (!slot.state) slot.state = std::make_unique<NoCache>();  // backward always gets a state (once per slot)
    }
  }
  cache.needs_input = need_x;
  cache.input_by_caller = caller_keeps_input;
  if (keep_input && need_x)
    parallel_assign<T>(cache.x, x);
  else
    cache.x.resize(0, 0);  // nothing to keep (frozen base, inference, the caller's), and a stale x cannot be reused
}

/// After forward_shared_input on sibling linears that read one input x: copies x into `kept` (the
/// parent's cache, handed to each sibling's backward) when any of them reads it, else empties it.
template <class T>
void keep_shared_input(const ConstMatrixRef<T>& x, Matrix<T>& kept,
                       std::initializer_list<const typename AdaptedLinear<T>::Cache*> siblings) {
  for (const auto* c : siblings)
    if (c->needs_input) {
      parallel_assign<T>(kept, x);
      return;
    }
  kept.resize(0, 0);
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class AdaptedLinear<float>;
extern template class AdaptedLinear<double>;
}  // namespace peft
#endif
