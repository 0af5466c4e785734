#pragma once
// LoRALinear: a Linear layer with any number of named low-rank adapters (Hu et al., 2021,
// "LoRA: Low-Rank Adaptation of Large Language Models"; rsLoRA: Kalajdzievski, 2023; DoRA: Liu et
// al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").
//
//   LoRA:  y = x Wᵀ + b + Σ_active s_i · (x̃_i A_iᵀ) B_iᵀ,   x̃_i = dropout_i(x)
//   A_i [r, in], B_i [out, r], s_i = alpha/r, or alpha/√r with rsLoRA.
//
//   DoRA (LoraConfig::use_dora), per adapter, as Hugging Face PEFT computes it:
//     n = ‖W + s·B·A‖_row  [out]   (the paper's column norm of the [in, out] weight), treated as a
//                                   constant in backward (paper §4.3, PEFT's weight_norm.detach())
//     f = m / n            [out]   m = lora_magnitude_vector, initialised to n (so f = 1 at init)
//     contribution = (f − 1) ⊙ (x̃ Wᵀ) + f ⊙ s (x̃ Aᵀ) Bᵀ      (⊙ scales output columns)
//   Without dropout (x̃ = x) the layer output is the paper's  y = f ⊙ (x Wᵀ + s x Aᵀ Bᵀ) + b;
//   the bias is never rescaled. With dropout the base term x Wᵀ stays on the undropped x and only
//   the correction uses x̃, exactly as PEFT does. n is computed from the factors without forming
//   B·A:  n_j² = ‖W_j‖² + 2s·B_j·(A W_jᵀ) + s²·B_j (A Aᵀ) B_jᵀ.
//
// Init (as Hugging Face PEFT): A kaiming-uniform(a=√5), B = 0, so the output equals the base
// exactly; "gaussian" draws A ~ N(0, (1/r)²) (PEFT: normal_(std=1/r)); "none" gives both
// nn.Linear's default init.
//
// Several active adapters, W₀ the base weight with nothing merged, Δ_i = s_i·B_i·A_i:
//   y = x W₀ᵀ + b + Σ_LoRA x Δ_iᵀ + Σ_DoRA [(f_k − 1) ⊙ x W₀ᵀ + f_k ⊙ x Δ_kᵀ],  f_k = m_k / ‖W₀ + Δ_k‖_row
// a sum of independent terms: every DoRA norm is taken on W₀, whatever else is active. The same
// model as one weight is
//   W_eff = W₀ + Σ_i C_i,   C_i = Δ_i (LoRA),   C_k = (f_k − 1) ⊙ W₀ + f_k ⊙ Δ_k (DoRA)
// (⊙ scales rows), so merging any subset M, in any order and over any number of merge calls, is
// W ← W + Σ_{i∈M} C_i with every C_i computed on W₀, and the adapters left unmerged still see W₀ in
// forward. With M merged, W = diag(g) W₀ + Σ_{i∈M} f_i ⊙ Δ_i with g = 1 + Σ_{k∈M, DoRA} (f_k − 1)
// (f_i = 1 for LoRA), so
//   W₀ = diag(1/g) (W − Σ_{i∈M} f_i ⊙ Δ_i)
// which is how merge and forward recover W₀ and how unmerge restores it; the merge stack keeps the
// f_k used at merge time (a magnitude edited while merged cannot corrupt the inversion). A merge
// that would make a row of g zero (or any f non-finite) is refused: W₀ could not be recovered.
// Merged adapters are skipped in forward. Backward while anything is merged is refused: the
// gradients would be wrong.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/layers/linear.hpp"
#include "peft/layers/lora_adapter_set.hpp"

namespace peft {

template <class T>
class LoRALinear : public Module<T> {
 public:
  /// Per-adapter forward state: keep, xd, xa of the low-rank path (LoraAdapterCache), plus DoRA's.
  struct AdapterCache : LoraAdapterCache<T> {
    // DoRA only (empty otherwise):
    RowVector<T> norm;   ///< n = ‖W + s·B·A‖_row [out], the detached norm of this forward
    RowVector<T> scale;  ///< f = m / n [out]
    Matrix<T> xdw;       ///< dropout(x) Wᵀ [rows, out], with dropout only (dm and the base term need it)
  };

  /// What backward needs: x (for dW and dA) and, per active adapter, x·Aᵀ (for dB). Plain LoRA
  /// never keeps x·Wᵀ; DoRA does (dm = Σ_rows dY ⊙ (x Wᵀ + s x Aᵀ Bᵀ) / n needs it).
  struct Cache : LoraForwardCache<T, AdapterCache> {
    Matrix<T> xw;  ///< x Wᵀ [rows, out] when a DoRA adapter without dropout is active; else empty
  };

  LoRALinear() = default;

  /// A fresh base with nn.Linear's init and no adapters. The base is drawn from `rng` first, then
  /// the dropout generator's seed (in this order on every compiler: the draws are sequenced in the
  /// body, not in an argument list whose evaluation order is unspecified).
  LoRALinear(Index in_features, Index out_features, Rng& rng, bool with_bias = true, std::string name = "")
      : Module<T>(std::move(name)) {
    if (in_features <= 0 || out_features <= 0)
      throw ShapeError(describe("LoRALinear", this->name()) + ": features must be > 0, got in=" +
                       std::to_string(in_features) + ", out=" + std::to_string(out_features));
    Linear<T> base(in_features, out_features, rng, with_bias, this->name());
    weight = std::move(base.weight);
    bias = std::move(base.bias);
    set_.rng().reseed(rng.next_u64());
  }

  /// Wraps an existing Linear (weights moved in, trainable flags kept).
  explicit LoRALinear(Linear<T> base, std::string name = "", std::uint64_t dropout_seed = 0x10a)
      : Module<T>(std::move(name)),
        weight(std::move(base.weight)),
        bias(std::move(base.bias)),
        set_("LoRALinear", dropout_seed) {}

  Parameter<T> weight;  ///< W [out, in]
  Parameter<T> bias;    ///< b [out] (stored [1, out]); empty when the layer has no bias

  Index in_features() const { return weight.value.cols(); }
  Index out_features() const { return weight.value.rows(); }
  bool has_bias() const { return bias.size() > 0; }

  /// Freezes W and b (what get_peft_model does to every non-adapter weight).
  void freeze_base() {
    weight.set_trainable(false);
    if (has_bias()) bias.set_trainable(false);
  }

  // ---- adapter management -------------------------------------------------------------------

  /// Adds a trainable adapter and makes it active (alone, as PEFT's add_adapter + set_adapter).
  LoraAdapter<T>& add_adapter(const std::string& adapter_name, const LoraConfig& config, Rng& rng) {
    set_.check_new(this->name(), adapter_name, config, in_features(), out_features());
    if (config.use_dora && !merged_.empty())
      throw ConfigError(describe("LoRALinear", this->name()) + ": cannot add DoRA adapter \"" + adapter_name +
                        "\" while adapters are merged (" + set_.join_names(merged_) +
                        "); its magnitude would be taken from the merged weight");

    LoraAdapter<T> a = LoraAdapterSet<T>::create(adapter_name, config, in_features(), out_features(), rng);
    if (config.use_dora) {
      // m = ‖W + s·B·A‖_row, so that f = m / n = 1 and DoRA starts as plain LoRA (PEFT's
      // DoraLinearLayer.update_layer).
      a.magnitude = Parameter<T>(1, out_features(), true, true);
      RowVector<T> n;
      dora_weight_norm(weight.value, a, n);
      a.magnitude.value = n;
    }
    return set_.add(std::move(a));
  }

  /// Same, with a layer-owned generator (seeded at construction).
  LoraAdapter<T>& add_adapter(const std::string& adapter_name, const LoraConfig& config = {}) {
    return add_adapter(adapter_name, config, set_.rng());
  }

  /// Removes an adapter. Refused while it is merged.
  void delete_adapter(const std::string& adapter_name) {
    const std::size_t i = index_of(adapter_name);
    if (std::find(merged_.begin(), merged_.end(), i) != merged_.end())
      throw ConfigError(describe("LoRALinear", this->name()) + ": adapter \"" + adapter_name +
                        "\" is merged; unmerge before deleting it");
    set_.erase(i, &merged_);
  }

  /// Activates exactly these adapters; their outputs are summed. An empty list leaves the base alone.
  void set_active(const std::vector<std::string>& names) { set_.set_active(this->name(), names); }
  void set_active(const std::string& adapter_name) { set_active(std::vector<std::string>{adapter_name}); }
  /// `set_active({"a", "b"})`: without this overload the braces would also match std::string's
  /// iterator-pair constructor (two const char*), an ambiguous call at best.
  void set_active(std::initializer_list<std::string> names) { set_active(std::vector<std::string>(names)); }

  /// While disabled, forward is the base layer alone (PEFT's disable_adapter()). Refused while merged.
  void disable_adapters(bool disabled = true) {
    if (disabled && !merged_.empty())
      throw ConfigError(describe("LoRALinear", this->name()) +
                        ": cannot disable adapters while some are merged; unmerge first");
    disabled_ = disabled;
    set_.touch();
  }
  bool adapters_disabled() const { return disabled_; }

  bool has_adapter(const std::string& adapter_name) const { return set_.find(adapter_name) != LoraAdapterSet<T>::npos; }
  LoraAdapter<T>& adapter(const std::string& adapter_name) { return set_[index_of(adapter_name)]; }
  const LoraAdapter<T>& adapter(const std::string& adapter_name) const { return set_[index_of(adapter_name)]; }
  LoraAdapterList<const LoraAdapter<T>> adapters() const { return set_.list(); }

  std::vector<std::string> active_adapters() const { return set_.names_of(set_.active()); }
  std::vector<std::string> merged_adapters() const { return set_.names_of(merged_); }
  bool merged() const { return !merged_.empty(); }

  // ---- merge / unmerge ----------------------------------------------------------------------

  /// W += C_i for each named adapter (default: the active ones not yet merged), C_i = s·B·A for LoRA
  /// and f ⊙ (W₀ + s·B·A) − W₀ for DoRA, with W₀ the weight with nothing merged (see the header).
  void merge(const std::vector<std::string>& names = {}) { merge_impl(names, false); }

  /// As merge, but computes the new W aside and refuses (NumericError) if any entry is NaN or Inf;
  /// W is left untouched on failure.
  void safe_merge(const std::vector<std::string>& names = {}) { merge_impl(names, true); }

  /// Undoes every merge: W ← W₀ = diag(1/g) (W − Σ_merged f_i ⊙ s_i·B_i·A_i) with the f stored at
  /// merge time (plain LoRA only: W −= s·B·A, last merged first).
  void unmerge() {
    if (merged_.empty()) return;
    remove_merged(weight.value);
    merged_.clear();
    merged_scale_.clear();
    set_.touch();
  }

  /// DoRA's row norm n = ‖W₀ + s·B·A‖_row of an adapter [1, out], W₀ the weight with nothing merged.
  RowVector<T> dora_weight_norm(const std::string& adapter_name) {
    const LoraAdapter<T>& a = adapter(adapter_name);
    RowVector<T> n;
    if (merged_.empty()) {
      dora_weight_norm(weight.value, a, n);
    } else {
      Matrix<T> w0 = weight.value;
      remove_merged(w0);
      dora_weight_norm(w0, a, n);
    }
    return n;
  }

  /// The dense LoRA update s·B·A of one adapter [out, in]. For a DoRA adapter the effective change
  /// of the weight is f ⊙ (W + s·B·A) − W (f = m / dora_weight_norm); this returns its low-rank part.
  Matrix<T> delta_weight(const std::string& adapter_name) const {
    const LoraAdapter<T>& a = adapter(adapter_name);
    Matrix<T> d(out_features(), in_features());
    d.noalias() = static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
    return d;
  }

  // ---- forward / backward -------------------------------------------------------------------

  /// y = x Wᵀ + b + Σ over active, unmerged adapters of  s·(x̃ Aᵀ) Bᵀ  (LoRA) or
  /// (f − 1) ⊙ x̃ Wᵀ + f ⊙ s·(x̃ Aᵀ) Bᵀ  (DoRA). Reuses `y`, `cache` and layer scratch, so repeated
  /// calls with the same shapes do not allocate.
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) { forward_into(x, y, cache, true); }

  /// The same output with nothing kept for backward (no copy of x): serving and evaluation. Uses a
  /// cache inside the layer, so it allocates nothing after the first call either.
  void forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y) { forward_into(x, y, inference_cache_, false); }

  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }

  /// Accumulates dW, db, dA_i, dB_i, dm_i (those trainable) and writes dX into *dx unless dx is
  /// null. DoRA's norm n is a constant here (the paper's §4.3 and PEFT's detach()).
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
    if (cache.generation == 0)
      throw ConfigError(describe("LoRALinear", this->name()) + ": backward called with a cache that no forward filled");
    if (!merged_.empty())
      throw ConfigError(describe("LoRALinear", this->name()) + ": cannot train while adapters are merged (" +
                        set_.join_names(merged_) + "); unmerge first");
    if (cache.generation != set_.generation())
      throw ConfigError(describe("LoRALinear", this->name()) +
                        ": adapters were added, removed, (un)merged or switched between forward and backward; run "
                        "forward again");
    check::shape("LoRALinear", this->name(), "output gradient", dy.rows(), dy.cols(), cache.rows, out_features());

    bool needs_x = weight.trainable();
    bool base_scaled = false;  // a DoRA adapter without dropout rescales the x Wᵀ path
    for (std::size_t k = 0; k < cache.used; ++k) {
      const AdapterCache& ac = cache.adapters[k];
      const bool dropped = ac.keep.size() > 0;
      if (!dropped && set_[ac.adapter].A.trainable()) needs_x = true;
      if (!dropped && set_[ac.adapter].dora()) base_scaled = true;
    }
    if (needs_x)
      check::shape("LoRALinear", this->name(), "cached input (was a parameter unfrozen after forward?)", cache.x.rows(),
                   cache.x.cols(), cache.rows, in_features());
    if (base_scaled)
      check::shape("LoRALinear", this->name(), "cached x Wᵀ", cache.xw.rows(), cache.xw.cols(), cache.rows,
                   out_features());

    // Base path. Through x Wᵀ flows E = dY ⊙ (1 + Σ_i (f_i − 1)) over DoRA adapters without
    // dropout (E = dY otherwise):  dW = Eᵀ X [out, in],  dX = E W [rows, in].
    if (base_scaled) {
      work_e_ = dy;
      for (std::size_t k = 0; k < cache.used; ++k) {
        const AdapterCache& ac = cache.adapters[k];
        if (ac.keep.size() == 0 && set_[ac.adapter].dora()) {
          // f − 1 into a buffer first: a replicated expression would be evaluated into a temporary.
          work_fm1_ = ac.scale.array() - T(1);
          work_e_.array() += dy.array().rowwise() * work_fm1_.array();  // + dY ⊙ (f − 1)
        }
      }
      backward_base(work_e_, cache, dx);
    } else {
      backward_base(dy, cache, dx);
    }
    if (has_bias() && bias.trainable())
      bias.accumulator().row(0) += dy.colwise().sum();  // db = Σ_rows dY (never rescaled)

    for (std::size_t k = 0; k < cache.used; ++k) {
      const AdapterCache& ac = cache.adapters[k];
      LoraAdapter<T>& a = set_[ac.adapter];
      if (a.dora())
        backward_dora(cache, ac, a, dy, dx);
      else
        set_.backward_lora(a, ac, ac.keep.size() > 0 ? ac.xd : cache.x, dy, dx);  // x̃: the input the adapter saw
    }
  }

  /// Generator used for dropout masks (and by add_adapter without an explicit one); checkpointable.
  Rng& rng() { return set_.rng(); }

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    fn("weight", weight);
    if (has_bias()) fn("bias", bias);
    for (auto& a : set_.list()) {
      fn("lora_A." + a.name + ".weight", a.A);
      fn("lora_B." + a.name + ".weight", a.B);
      if (a.dora()) fn("lora_magnitude_vector." + a.name, a.magnitude);  // PEFT's file key
    }
  }

 private:
  std::size_t index_of(const std::string& n) const { return set_.index_of(this->name(), n); }

  bool is_merged(std::size_t i) const { return std::find(merged_.begin(), merged_.end(), i) != merged_.end(); }

  void merge_impl(const std::vector<std::string>& names, bool safe) {
    const std::string who = describe("LoRALinear", this->name());
    if (disabled_)
      throw ConfigError(who +
                        ": adapters are disabled; enable them before merging (a merged adapter cannot be disabled)");
    std::vector<std::size_t> pending;
    if (names.empty()) {
      for (std::size_t i : set_.active())
        if (!is_merged(i)) pending.push_back(i);
    } else {
      for (const auto& n : names) {
        const std::size_t i = index_of(n);
        if (is_merged(i) || std::find(pending.begin(), pending.end(), i) != pending.end())
          throw ConfigError(who + ": adapter \"" + n + "\" is already merged");
        pending.push_back(i);
      }
    }
    bool dora_pending = false;
    for (std::size_t i : pending) dora_pending = dora_pending || set_[i].dora();

    // Every DoRA term is computed on W₀ (nothing merged): recovered from W when something is.
    Matrix<T> w0_store;
    const Matrix<T>* w0 = &weight.value;
    if (dora_pending && !merged_.empty()) {
      w0_store = weight.value;
      remove_merged(w0_store);
      w0 = &w0_store;
    }
    // All checks before W changes: f finite, and the row scale g' = 1 + Σ_{merged ∪ pending DoRA}
    // (f − 1) finite and non-zero, so that W₀ stays recoverable (unmerge, later DoRA merges).
    std::vector<RowVector<T>> scales(pending.size());
    RowVector<T> g;
    bool any_dora = merged_gain(g);
    for (std::size_t k = 0; k < pending.size(); ++k) {
      const LoraAdapter<T>& a = set_[pending[k]];
      if (!a.dora()) continue;
      RowVector<T> n;
      dora_weight_norm(*w0, a, n);
      scales[k] = a.magnitude.value.row(0).array() / n.array();  // f = m / ‖W₀ + s·B·A‖_row
      if (!scales[k].allFinite())
        throw NumericError(
            who + ": DoRA adapter \"" + a.name +
            "\" has a zero or non-finite scale m / ‖W + s·B·A‖ (a zero row norm or a non-finite magnitude); "
            "nothing was merged");
      if (!any_dora) g = RowVector<T>::Ones(out_features());
      any_dora = true;
      g.array() += scales[k].array() - T(1);
    }
    // Recovering W₀ divides row j by g_j, which amplifies the rounding of that row by 1/|g_j|:
    // |g_j| < √ε would leave fewer than half the digits of W₀, so it counts as zero.
    const T g_min = std::sqrt(std::numeric_limits<T>::epsilon());
    if (dora_pending)
      for (Index j = 0; j < g.size(); ++j)
        if (!std::isfinite(g(j)) || std::abs(g(j)) < g_min) {
          std::vector<std::size_t> dora;
          for (std::size_t i : merged_)
            if (set_[i].dora()) dora.push_back(i);
          for (std::size_t i : pending)
            if (set_[i].dora()) dora.push_back(i);
          throw NumericError(who + ": DoRA adapter" + (dora.size() > 1 ? "s " : " ") + quoted_names(dora) +
                             (dora.size() > 1 ? " have" : " has") +
                             " a zero or non-finite scale: 1 + Σ (m / ‖W + s·B·A‖ − 1) is " + check::num(g(j)) +
                             " in row " + std::to_string(j) + " (|scale| < √ε = " + check::num(g_min) +
                             " counts as 0)" +
                             ", so the weight with nothing merged could not be recovered and the merge could not be "
                             "undone; nothing was merged");
        }

    // Safe: W + C_1 + C_2 + … built aside, checked after each adapter, swapped in at the end.
    // Plain: U = Σ C_i built aside (every allocation happens here), then W += U, which cannot fail:
    // both leave no partial merge behind.
    Matrix<T> acc;
    if (safe)
      acc = weight.value;
    else
      acc = Matrix<T>::Zero(out_features(), in_features());
    for (std::size_t k = 0; k < pending.size(); ++k) {
      const LoraAdapter<T>& a = set_[pending[k]];
      add_contribution(a, scales[k], *w0, acc);
      if (safe && !all_finite(acc))
        throw NumericError(who + ": merging adapter \"" + a.name +
                           "\" gives NaN or Inf in the weight; nothing was merged");
    }
    if (safe)
      weight.value.swap(acc);
    else
      weight.value += acc;
    for (std::size_t k = 0; k < pending.size(); ++k) {
      merged_.push_back(pending[k]);
      merged_scale_.push_back(std::move(scales[k]));
    }
    set_.touch();
  }

  /// acc += C = s·B·A (LoRA, f empty) or (f − 1) ⊙ W₀ + f ⊙ s·B·A (DoRA).
  void add_contribution(const LoraAdapter<T>& a, const RowVector<T>& f, const Matrix<T>& w0, Matrix<T>& acc) {
    const T s = static_cast<T>(a.scaling());
    if (!a.dora()) {
      acc.noalias() += s * (a.B.value * a.A.value);  // + s·B·A   [out, in]
      return;
    }
    Eigen::Block<Matrix<T>> BF = detail::lora_scratch<T>(work_bf_, out_features(), a.rank());
    BF = a.B.value.array().colwise() * f.transpose().array();  // diag(f) B   [out, r]
    acc.noalias() += s * (BF * a.A.value);                     // + f ⊙ s·B·A
    work_fm1_ = f.array() - T(1);
    acc.array() += w0.array().colwise() * work_fm1_.transpose().array();  // + (f − 1) ⊙ W₀
  }

  /// g = 1 + Σ over merged DoRA adapters of (f − 1) [out]; false (g untouched) when none is merged.
  bool merged_gain(RowVector<T>& g) const {
    bool any = false;
    for (std::size_t k = 0; k < merged_.size(); ++k) {
      if (!set_[merged_[k]].dora()) continue;
      if (!any) g = RowVector<T>::Ones(out_features());
      any = true;
      g.array() += merged_scale_[k].array() - T(1);
    }
    return any;
  }

  /// w holds the current W on entry and W₀ = diag(1/g) (W − Σ_merged f_i ⊙ s_i·B_i·A_i) on exit.
  void remove_merged(Matrix<T>& w) {
    for (std::size_t k = merged_.size(); k-- > 0;) {  // last merged first
      const LoraAdapter<T>& a = set_[merged_[k]];
      const T s = static_cast<T>(a.scaling());
      if (!a.dora()) {
        w.noalias() -= s * (a.B.value * a.A.value);  // − s·B·A
        continue;
      }
      Eigen::Block<Matrix<T>> BF = detail::lora_scratch<T>(work_bf_, out_features(), a.rank());
      BF = a.B.value.array().colwise() * merged_scale_[k].transpose().array();  // diag(f) B   [out, r]
      w.noalias() -= s * (BF * a.A.value);                                      // − f ⊙ s·B·A
    }
    if (merged_gain(work_g_)) w.array().colwise() /= work_g_.transpose().array();  // diag(1/g)
  }

  /// "\"a\", \"b\"" for messages.
  std::string quoted_names(const std::vector<std::size_t>& idx) const {
    std::string s;
    for (std::size_t i : idx) s += (s.empty() ? "\"" : ", \"") + set_[i].name + "\"";
    return s;
  }

  bool dropout_active(const LoraAdapter<T>& a) const { return this->training() && a.config.dropout > 0.0; }

  /// dW = Eᵀ X and dX = E W for the base path (E = dY, or dY rescaled by DoRA).
  void backward_base(const ConstMatrixRef<T>& e, const Cache& cache, Matrix<T>* dx) {
    if (weight.trainable()) weight.accumulator().noalias() += e.transpose() * cache.x;  // dW = Eᵀ X   [out, in]
    if (dx != nullptr) {
      dx->resize(e.rows(), in_features());
      dx->noalias() = e * weight.value;  // dX = E W   [rows, in]
    }
  }

  /// Backward of one DoRA adapter's contribution  c = (f − 1) ⊙ z̃ + f ⊙ s·(x̃ Aᵀ) Bᵀ,  f = m / n,
  /// z̃ = x̃ Wᵀ, with n constant. Without dropout the (f − 1) ⊙ z̃ term was folded into the base
  /// path (E); with dropout it is handled here.
  void backward_dora(const Cache& cache, const AdapterCache& ac, LoraAdapter<T>& a, const ConstMatrixRef<T>& dy,
                     Matrix<T>* dx) {
    const T s = static_cast<T>(a.scaling());
    const bool dropped = ac.keep.size() > 0;
    const Matrix<T>& xt = dropped ? ac.xd : cache.x;    // x̃   [rows, in]
    const Matrix<T>& zt = dropped ? ac.xdw : cache.xw;  // z̃ = x̃ Wᵀ   [rows, out]
    const Index out = out_features(), r = a.rank();

    if (a.B.trainable() || a.magnitude.trainable()) {
      Eigen::Block<Matrix<T>> P = detail::lora_scratch<T>(work_db_, out, r);
      P.noalias() = dy.transpose() * ac.xa;  // P = dYᵀ (x̃ Aᵀ)   [out, r]
      if (a.magnitude.trainable()) {
        // dm_j = Σ_rows dY_ij (z̃_ij + s (x̃ Aᵀ Bᵀ)_ij) / n_j, where Σ_rows dY_ij (x̃ Aᵀ Bᵀ)_ij = B_j · P_j.
        work_m_.resize(out);
        work_m_ = (dy.array() * zt.array()).colwise().sum();  // Σ_rows dY ⊙ z̃   [out]
        Matrix<T>& gm = a.magnitude.accumulator();
        for (Index j = 0; j < out; ++j) gm(0, j) += (work_m_(j) + s * a.B.value.row(j).dot(P.row(j))) / ac.norm(j);
      }
      if (a.B.trainable())  // dB = s diag(f) dYᵀ (x̃ Aᵀ)   [out, r]
        a.B.accumulator().array() += s * (P.array().colwise() * ac.scale.transpose().array());
    }
    if (!a.A.trainable() && dx == nullptr && !(dropped && weight.trainable())) return;
    Eigen::Block<Matrix<T>> BF = detail::lora_scratch<T>(work_bf_, out, r);
    BF = a.B.value.array().colwise() * ac.scale.transpose().array();  // diag(f) B   [out, r]
    Eigen::Block<Matrix<T>> G = set_.scratch_g(dy.rows(), r);
    G.noalias() = dy * BF;                                                       // G = (dY ⊙ f) B   [rows, r]
    if (a.A.trainable()) a.A.accumulator().noalias() += s * G.transpose() * xt;  // dA = s Gᵀ x̃   [r, in]
    if (!dropped) {
      if (dx != nullptr) dx->noalias() += s * G * a.A.value;  // dX += s G A (the W path went through E)
      return;
    }
    // Dropout: the (f − 1) ⊙ x̃ Wᵀ term, D = dY ⊙ (f − 1)   [rows, out].
    work_f_.resize(dy.rows(), out);
    work_fm1_ = ac.scale.array() - T(1);
    work_f_.array() = dy.array().rowwise() * work_fm1_.array();
    if (weight.trainable()) weight.accumulator().noalias() += work_f_.transpose() * xt;  // dW += Dᵀ x̃   [out, in]
    if (dx != nullptr) {
      Matrix<T>& t = set_.scratch_dx(dy.rows(), in_features());
      t.noalias() = work_f_ * weight.value;        // D W   [rows, in]
      t.noalias() += s * G * a.A.value;            // + s G A
      dx->array() += t.array() * ac.keep.array();  // dropout backward: ⊙ keep
    }
  }

  /// n = ‖w + s·B·A‖ per row, from the factors and without forming B·A:
  ///   n_j² = ‖w_j‖² + 2s·B_j·(A w_jᵀ) + s²·B_j (A Aᵀ) B_jᵀ,
  /// using the products w Aᵀ [out, r] and A Aᵀ [r, r] (O(out·in·r + in·r²) flops, O(out·r) memory).
  void dora_weight_norm(const Matrix<T>& w, const LoraAdapter<T>& a, RowVector<T>& n) {
    const Index out = w.rows(), r = a.rank();
    const T s = static_cast<T>(a.scaling());
    Eigen::Block<Matrix<T>> WAt = detail::lora_scratch<T>(work_wa_, out, r);
    WAt.noalias() = w * a.A.value.transpose();  // w Aᵀ   [out, r]: row j is A w_jᵀ
    Eigen::Block<Matrix<T>> AAt = detail::lora_scratch_square<T>(work_aa_, r);
    AAt.noalias() = a.A.value * a.A.value.transpose();  // A Aᵀ   [r, r]
    Eigen::Block<Matrix<T>> BQ = detail::lora_scratch<T>(work_bq_, out, r);
    BQ.noalias() = a.B.value * AAt;  // B (A Aᵀ)   [out, r]
    n.resize(out);
    for (Index j = 0; j < out; ++j) {
      const T sq = w.row(j).squaredNorm() + T(2) * s * a.B.value.row(j).dot(WAt.row(j)) +
                   s * s * a.B.value.row(j).dot(BQ.row(j));
      n(j) = std::sqrt(std::max(sq, T(0)));  // rounding can push an exact zero slightly below 0
    }
  }

  /// forward() and forward_inference(): `keep_input` = whether backward will read x.
  void forward_into(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache, bool keep_input) {
    check::input_features("LoRALinear", this->name(), x.cols(), in_features());
    const Index rows = x.rows(), out = out_features();
    y.resize(rows, out);
    y.noalias() = x * weight.value.transpose();  // base: x Wᵀ   [rows, out]

    cache.rows = rows;
    cache.generation = set_.generation();
    cache.used = 0;
    // DoRA without dropout rescales x W₀ᵀ itself, so keep it (before bias and adapters). W₀ is W
    // unless adapters are merged; then it is recovered (see the header) for the unmerged DoRA terms.
    bool need_xw = false, any_dora = false;
    if (!disabled_)
      for (std::size_t i : set_.active())
        if (!is_merged(i) && set_[i].dora()) {
          any_dora = true;
          if (!dropout_active(set_[i])) need_xw = true;
        }
    const Matrix<T>* w0 = &weight.value;
    if (any_dora && !merged_.empty()) {
      work_w0_ = weight.value;
      remove_merged(work_w0_);
      w0 = &work_w0_;
    }
    if (!need_xw) {
      cache.xw.resize(0, 0);
    } else if (w0 == &weight.value) {
      cache.xw = y;
    } else {
      cache.xw.resize(rows, out);
      cache.xw.noalias() = x * w0->transpose();  // x W₀ᵀ   [rows, out]
    }
    if (has_bias()) y.rowwise() += bias.value.row(0);

    bool need_x = weight.trainable();
    if (!disabled_) {
      for (std::size_t i : set_.active()) {
        if (is_merged(i)) continue;
        const LoraAdapter<T>& a = set_[i];
        AdapterCache& ac = LoraAdapterSet<T>::next_slot(cache.adapters, cache.used, i);
        const T s = static_cast<T>(a.scaling());
        const bool drop = dropout_active(a);
        set_.project(x, a, drop, ac);  // keep, x̃, x̃ Aᵀ
        if (!drop) need_x = need_x || a.A.trainable();
        if (!a.dora()) {
          ac.norm.resize(0);
          ac.scale.resize(0);
          ac.xdw.resize(0, 0);
          y.noalias() += s * ac.xa * a.B.value.transpose();  // + s (x̃ Aᵀ) Bᵀ   [rows, out]
          continue;
        }
        // DoRA: f = m / n (n detached), then y += f ⊙ (z̃ + s x̃ Aᵀ Bᵀ) − z̃ with z̃ = x̃ W₀ᵀ. With
        // B = 0 and m = n this adds exactly zero, so the zero-init output is the base bit for bit.
        dora_weight_norm(*w0, a, ac.norm);
        ac.scale.resize(out);
        ac.scale.array() = a.magnitude.value.row(0).array() / ac.norm.array();  // f = m / n   [out]
        if (drop) {
          ac.xdw.resize(rows, out);
          ac.xdw.noalias() = ac.xd * w0->transpose();  // z̃ = x̃ W₀ᵀ   [rows, out]
        } else {
          ac.xdw.resize(0, 0);
        }
        const Matrix<T>& z = drop ? ac.xdw : cache.xw;
        work_y_.resize(rows, out);
        work_y_.noalias() = s * ac.xa * a.B.value.transpose();                  // s x̃ Aᵀ Bᵀ   [rows, out]
        work_y_ += z;                                                           // u = z̃ + s x̃ Aᵀ Bᵀ
        y.array() += work_y_.array().rowwise() * ac.scale.array() - z.array();  // + f ⊙ u − z̃
      }
    }
    if (keep_input && need_x)
      cache.x = x;
    else
      cache.x.resize(0, 0);  // nothing to keep (frozen base, inference), and a stale x cannot be reused
  }

  LoraAdapterSet<T> set_{"LoRALinear", 0x10a};  ///< adapters, active list, generation, dropout generator
  Cache inference_cache_;            ///< forward_inference's buffers (x·Aᵀ per adapter); never read by backward
  std::vector<std::size_t> merged_;  ///< merge order; unmerge pops from the back
  bool disabled_ = false;
  std::vector<RowVector<T>> merged_scale_;  ///< DoRA f (on W₀) of each merge (empty for LoRA); parallel to merged_
  // Scratch, reused across calls (never part of a call's state: that lives in Cache).
  Matrix<T> work_y_;       ///< DoRA forward [rows, out]
  Matrix<T> work_e_;       ///< DoRA backward E [rows, out]
  Matrix<T> work_f_;       ///< DoRA backward D [rows, out] (dropout only)
  Matrix<T> work_db_;      ///< DoRA backward dYᵀ x̃Aᵀ [out, ≥ r]
  Matrix<T> work_bf_;      ///< DoRA backward diag(f) B [out, ≥ r]
  Matrix<T> work_wa_;      ///< DoRA norm W Aᵀ [out, ≥ r]
  Matrix<T> work_aa_;      ///< DoRA norm A Aᵀ [≥ r, ≥ r]
  Matrix<T> work_bq_;      ///< DoRA norm B A Aᵀ [out, ≥ r]
  RowVector<T> work_m_;    ///< DoRA backward Σ_rows dY ⊙ z̃ [out]
  RowVector<T> work_fm1_;  ///< DoRA backward and merge: f − 1 [out]
  RowVector<T> work_g_;    ///< merged DoRA row scale g = 1 + Σ (f − 1) [out]
  Matrix<T> work_w0_;      ///< W₀ recovered for forward while adapters are merged [out, in]
};

}  // namespace peft
