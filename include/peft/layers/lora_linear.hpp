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
// nn.Linear's default init. Merge adds s·B·A into W (DoRA: W ← f ⊙ (W + s·B·A), keeping f so
// unmerge can invert it) and skips the adapter in forward; unmerge undoes merges last-first.
// Backward while anything is merged is refused: the gradients would be wrong.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/layers/linear.hpp"

namespace peft {

enum class LoraInit {
  KaimingUniform,  ///< A ~ kaiming_uniform(a=√5), B = 0 (identity at init; PEFT's default)
  Gaussian,        ///< A ~ N(0, (1/r)²), B = 0 (PEFT's init_lora_weights="gaussian")
  None,            ///< A and B keep nn.Linear's default init: NOT identity at init (for tests)
};

struct LoraConfig {
  int r = 8;
  double alpha = 8.0;
  double dropout = 0.0;
  bool use_rslora = false;
  LoraInit init = LoraInit::KaimingUniform;
  /// DoRA: adds a trainable magnitude vector m (`lora_magnitude_vector.<adapter>`) and
  /// normalizes each output row of W + s·B·A (see the file header).
  bool use_dora = false;

  /// s = alpha / r, or alpha / √r with rsLoRA.
  double scaling() const {
    return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
  }
};

template <class T>
struct LoraAdapter {
  LoraAdapter() = default;
  /// Keeps `LoraAdapter<T>{name, config, A, B}` working now that DoRA added a member.
  LoraAdapter(std::string name_, LoraConfig config_, Parameter<T> A_, Parameter<T> B_, Parameter<T> magnitude_ = {})
      : name(std::move(name_)), config(config_), A(std::move(A_)), B(std::move(B_)), magnitude(std::move(magnitude_)) {}

  std::string name;
  LoraConfig config;
  Parameter<T> A;  ///< [r, in]
  Parameter<T> B;  ///< [out, r]
  /// DoRA magnitude m [out] (stored [1, out]); empty unless config.use_dora.
  Parameter<T> magnitude;

  int rank() const { return config.r; }
  double scaling() const { return config.scaling(); }
  bool dora() const { return config.use_dora; }
};

template <class T>
class LoRALinear : public Module<T> {
 public:
  /// Per-adapter forward state.
  struct AdapterCache {
    std::size_t adapter = 0;  ///< index into adapters()
    Matrix<T> keep;           ///< dropout multiplier (0 or 1/(1−p)) [rows, in]; empty without dropout
    Matrix<T> xd;             ///< dropout(x) [rows, in]; empty without dropout (x is used)
    Matrix<T> xa;             ///< dropout(x) Aᵀ [rows, r]
    // DoRA only (empty otherwise):
    RowVector<T> norm;   ///< n = ‖W + s·B·A‖_row [out], the detached norm of this forward
    RowVector<T> scale;  ///< f = m / n [out]
    Matrix<T> xdw;       ///< dropout(x) Wᵀ [rows, out], with dropout only (dm and the base term need it)
  };

  /// What backward needs: x (for dW and dA) and, per active adapter, x·Aᵀ (for dB). Plain LoRA
  /// never keeps x·Wᵀ; DoRA does (dm = Σ_rows dY ⊙ (x Wᵀ + s x Aᵀ Bᵀ) / n needs it).
  struct Cache {
    Matrix<T> x;
    Matrix<T> xw;  ///< x Wᵀ [rows, out] when a DoRA adapter without dropout is active; else empty
    Index rows = 0;
    std::vector<AdapterCache> adapters;  ///< grows to the largest active set, then is reused
    std::size_t used = 0;                ///< entries of `adapters` filled by the last forward
    std::uint64_t generation = 0;        ///< layer state the cache was filled under
  };

  LoRALinear() = default;

  /// A fresh base with nn.Linear's init and no adapters. The base is drawn from `rng` first, then
  /// the dropout generator's seed (in this order on every compiler: the draws are sequenced in the
  /// body, not in an argument list whose evaluation order is unspecified).
  LoRALinear(Index in_features, Index out_features, Rng& rng, bool with_bias = true, std::string name = "")
      : Module<T>(std::move(name)) {
    Linear<T> base(in_features, out_features, rng, with_bias, this->name());
    weight = std::move(base.weight);
    bias = std::move(base.bias);
    dropout_rng_.reseed(rng.next_u64());
  }

  /// Wraps an existing Linear (weights moved in, trainable flags kept).
  explicit LoRALinear(Linear<T> base, std::string name = "", std::uint64_t dropout_seed = 0x10a)
      : Module<T>(std::move(name)),
        weight(std::move(base.weight)),
        bias(std::move(base.bias)),
        dropout_rng_(dropout_seed) {}

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
    const std::string who = describe("LoRALinear", this->name());
    if (adapter_name.empty()) throw ConfigError(who + ": adapter name must not be empty");
    if (adapter_name.find('.') != std::string::npos)
      throw ConfigError(who + ": adapter name \"" + adapter_name + "\" must not contain '.' (it is part of parameter names)");
    if (find(adapter_name) != npos)
      throw ConfigError(who + ": adapter \"" + adapter_name + "\" already exists");
    const Index max_rank = std::min(in_features(), out_features());
    if (config.r <= 0 || config.r > max_rank)
      throw ConfigError(who + ": rank r must be in [1, " + std::to_string(max_rank) + "] = [1, min(in, out)], got " +
                        std::to_string(config.r));
    check::positive("LoRALinear", this->name(), "lora_alpha", config.alpha);
    check::unit_interval_open("LoRALinear", this->name(), "lora_dropout", config.dropout);
    if (config.use_dora && !merged_.empty())
      throw ConfigError(who + ": cannot add DoRA adapter \"" + adapter_name + "\" while adapters are merged (" +
                        join_names(merged_) + "); its magnitude would be taken from the merged weight");

    LoraAdapter<T> a{adapter_name, config, Parameter<T>(config.r, in_features()),
                     Parameter<T>(out_features(), config.r)};
    switch (config.init) {
      case LoraInit::KaimingUniform:
        init::kaiming_uniform<T>(a.A.value, rng);
        break;
      case LoraInit::Gaussian:
        init::normal<T>(a.A.value, rng, 0.0, 1.0 / config.r);
        break;
      case LoraInit::None:
        init::kaiming_uniform<T>(a.A.value, rng);
        init::kaiming_uniform<T>(a.B.value, rng);
        break;
    }
    if (config.use_dora) {
      // m = ‖W + s·B·A‖_row, so that f = m / n = 1 and DoRA starts as plain LoRA (PEFT's
      // DoraLinearLayer.update_layer).
      a.magnitude = Parameter<T>(1, out_features(), true, true);
      RowVector<T> n;
      dora_weight_norm(weight.value, a, n);
      a.magnitude.value = n;
    }
    adapters_.push_back(std::move(a));
    active_ = {adapters_.size() - 1};
    ++generation_;
    return adapters_.back();
  }

  /// Same, with a layer-owned generator (seeded at construction).
  LoraAdapter<T>& add_adapter(const std::string& adapter_name, const LoraConfig& config = {}) {
    return add_adapter(adapter_name, config, dropout_rng_);
  }

  /// Removes an adapter. Refused while it is merged.
  void delete_adapter(const std::string& adapter_name) {
    const std::size_t i = index_of(adapter_name);
    if (std::find(merged_.begin(), merged_.end(), i) != merged_.end())
      throw ConfigError(describe("LoRALinear", this->name()) + ": adapter \"" + adapter_name +
                        "\" is merged; unmerge before deleting it");
    adapters_.erase(adapters_.begin() + static_cast<std::ptrdiff_t>(i));
    auto fix = [i](std::vector<std::size_t>& v) {
      v.erase(std::remove(v.begin(), v.end(), i), v.end());
      for (auto& k : v)
        if (k > i) --k;
    };
    fix(active_);
    fix(merged_);
    ++generation_;
  }

  /// Activates exactly these adapters; their outputs are summed. An empty list leaves the base alone.
  void set_active(const std::vector<std::string>& names) {
    std::vector<std::size_t> next;
    for (const auto& n : names) {
      const std::size_t i = index_of(n);
      if (std::find(next.begin(), next.end(), i) == next.end()) next.push_back(i);
    }
    active_ = std::move(next);
    ++generation_;
  }
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
    ++generation_;
  }
  bool adapters_disabled() const { return disabled_; }

  bool has_adapter(const std::string& adapter_name) const { return find(adapter_name) != npos; }
  LoraAdapter<T>& adapter(const std::string& adapter_name) { return adapters_[index_of(adapter_name)]; }
  const LoraAdapter<T>& adapter(const std::string& adapter_name) const {
    return adapters_[index_of(adapter_name)];
  }
  const std::vector<LoraAdapter<T>>& adapters() const { return adapters_; }

  std::vector<std::string> active_adapters() const { return names_of(active_); }
  std::vector<std::string> merged_adapters() const { return names_of(merged_); }
  bool merged() const { return !merged_.empty(); }

  // ---- merge / unmerge ----------------------------------------------------------------------

  /// W += s·B·A for each named adapter (default: the active ones not yet merged).
  void merge(const std::vector<std::string>& names = {}) { merge_impl(names, false); }

  /// As merge, but computes the new W aside and refuses (NumericError) if any entry is NaN or Inf;
  /// W is left untouched on failure.
  void safe_merge(const std::vector<std::string>& names = {}) { merge_impl(names, true); }

  /// Undoes every merge, last merged first: W −= s·B·A; DoRA: W ← W / f − s·B·A with the f
  /// stored at merge time (so a magnitude edited while merged cannot corrupt the inversion).
  void unmerge() {
    while (!merged_.empty()) unmerge_last();
    ++generation_;
  }

  /// DoRA's row norm n = ‖W + s·B·A‖_row of an adapter, from the current W [1, out].
  RowVector<T> dora_weight_norm(const std::string& adapter_name) {
    RowVector<T> n;
    dora_weight_norm(weight.value, adapter(adapter_name), n);
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
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
    check::input_features("LoRALinear", this->name(), x.cols(), in_features());
    const Index rows = x.rows(), out = out_features();
    y.resize(rows, out);
    y.noalias() = x * weight.value.transpose();  // base: x Wᵀ   [rows, out]

    cache.rows = rows;
    cache.generation = generation_;
    cache.used = 0;
    // DoRA without dropout rescales x Wᵀ itself, so keep it (before bias and adapters).
    bool need_xw = false;
    if (!disabled_)
      for (std::size_t i : active_)
        if (!is_merged(i) && adapters_[i].dora() && !dropout_active(adapters_[i])) need_xw = true;
    if (need_xw)
      cache.xw = y;
    else
      cache.xw.resize(0, 0);
    if (has_bias()) y.rowwise() += bias.value.row(0);

    bool need_x = weight.trainable();
    if (!disabled_) {
      for (std::size_t i : active_) {
        if (is_merged(i)) continue;
        const LoraAdapter<T>& a = adapters_[i];
        if (cache.adapters.size() <= cache.used) cache.adapters.emplace_back();
        AdapterCache& ac = cache.adapters[cache.used++];
        ac.adapter = i;
        const T s = static_cast<T>(a.scaling());
        const bool drop = dropout_active(a);
        ac.xa.resize(rows, a.rank());
        if (drop) {
          fill_dropout_mask(ac.keep, rows, in_features(), a.config.dropout);
          ac.xd.resize(rows, in_features());
          ac.xd.array() = x.array() * ac.keep.array();
          ac.xa.noalias() = ac.xd * a.A.value.transpose();  // x̃ Aᵀ   [rows, r]
        } else {
          ac.keep.resize(0, 0);
          ac.xd.resize(0, 0);
          ac.xa.noalias() = x * a.A.value.transpose();  // x Aᵀ   [rows, r]
          need_x = need_x || a.A.trainable();
        }
        if (!a.dora()) {
          ac.norm.resize(0);
          ac.scale.resize(0);
          ac.xdw.resize(0, 0);
          y.noalias() += s * ac.xa * a.B.value.transpose();  // + s (x̃ Aᵀ) Bᵀ   [rows, out]
          continue;
        }
        // DoRA: f = m / n (n detached), then y += f ⊙ (z̃ + s x̃ Aᵀ Bᵀ) − z̃ with z̃ = x̃ Wᵀ. With
        // B = 0 and m = n this adds exactly zero, so the zero-init output is the base bit for bit.
        dora_weight_norm(weight.value, a, ac.norm);
        ac.scale.resize(out);
        ac.scale.array() = a.magnitude.value.row(0).array() / ac.norm.array();  // f = m / n   [out]
        if (drop) {
          ac.xdw.resize(rows, out);
          ac.xdw.noalias() = ac.xd * weight.value.transpose();  // z̃ = x̃ Wᵀ   [rows, out]
        } else {
          ac.xdw.resize(0, 0);
        }
        const Matrix<T>& z = drop ? ac.xdw : cache.xw;
        work_y_.resize(rows, out);
        work_y_.noalias() = s * ac.xa * a.B.value.transpose();  // s x̃ Aᵀ Bᵀ   [rows, out]
        work_y_ += z;                                            // u = z̃ + s x̃ Aᵀ Bᵀ
        y.array() += work_y_.array().rowwise() * ac.scale.array() - z.array();  // + f ⊙ u − z̃
      }
    }
    if (need_x)
      cache.x = x;
    else
      cache.x.resize(0, 0);  // a frozen base keeps no activation (and a stale x cannot be reused)
  }

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
                        join_names(merged_) + "); unmerge first");
    if (cache.generation != generation_)
      throw ConfigError(describe("LoRALinear", this->name()) +
                        ": adapters were added, removed, (un)merged or switched between forward and backward; run "
                        "forward again");
    check::shape("LoRALinear", this->name(), "output gradient", dy.rows(), dy.cols(), cache.rows, out_features());

    bool needs_x = weight.trainable();
    bool base_scaled = false;  // a DoRA adapter without dropout rescales the x Wᵀ path
    for (std::size_t k = 0; k < cache.used; ++k) {
      const AdapterCache& ac = cache.adapters[k];
      const bool dropped = ac.keep.size() > 0;
      if (!dropped && adapters_[ac.adapter].A.trainable()) needs_x = true;
      if (!dropped && adapters_[ac.adapter].dora()) base_scaled = true;
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
        if (ac.keep.size() == 0 && adapters_[ac.adapter].dora()) {
          // f − 1 into a buffer first: a replicated expression would be evaluated into a temporary.
          work_fm1_ = ac.scale.array() - T(1);
          work_e_.array() += dy.array().rowwise() * work_fm1_.array();  // + dY ⊙ (f − 1)
        }
      }
      backward_base(work_e_, cache, dx);
    } else {
      backward_base(dy, cache, dx);
    }
    if (has_bias() && bias.trainable()) bias.accumulator().row(0) += dy.colwise().sum();  // db = Σ_rows dY (never rescaled)

    for (std::size_t k = 0; k < cache.used; ++k) {
      const AdapterCache& ac = cache.adapters[k];
      LoraAdapter<T>& a = adapters_[ac.adapter];
      const T s = static_cast<T>(a.scaling());
      const bool dropped = ac.keep.size() > 0;
      const Matrix<T>& xt = dropped ? ac.xd : cache.x;  // x̃, the input the adapter saw
      if (a.dora()) {
        backward_dora(cache, ac, a, dy, dx);
        continue;
      }
      if (a.B.trainable()) a.B.accumulator().noalias() += s * dy.transpose() * ac.xa;  // dB = s dYᵀ (x̃ Aᵀ)   [out, r]
      if (!a.A.trainable() && dx == nullptr) continue;
      // Adapters of different ranks share one scratch buffer sized to the largest rank seen, so
      // alternating ranks never reallocate.
      Eigen::Block<Matrix<T>> G = scratch(work_g_, dy.rows(), a.rank());
      G.noalias() = dy * a.B.value;  // G = dY B   [rows, r]
      if (a.A.trainable()) a.A.accumulator().noalias() += s * G.transpose() * xt;  // dA = s Gᵀ x̃   [r, in]
      if (dx != nullptr) {
        if (dropped) {
          work_dx_.resize(dy.rows(), in_features());
          work_dx_.noalias() = s * G * a.A.value;             // s G A   [rows, in]
          dx->array() += work_dx_.array() * ac.keep.array();  // dropout backward: ⊙ keep
        } else {
          dx->noalias() += s * G * a.A.value;  // dX += s G A   [rows, in]
        }
      }
    }
  }

  /// Generator used for dropout masks (and by add_adapter without an explicit one); checkpointable.
  Rng& rng() { return dropout_rng_; }

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    fn("weight", weight);
    if (has_bias()) fn("bias", bias);
    for (auto& a : adapters_) {
      fn("lora_A." + a.name + ".weight", a.A);
      fn("lora_B." + a.name + ".weight", a.B);
      if (a.dora()) fn("lora_magnitude_vector." + a.name, a.magnitude);  // PEFT's file key
    }
  }

 private:
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);

  std::size_t find(const std::string& n) const {
    for (std::size_t i = 0; i < adapters_.size(); ++i)
      if (adapters_[i].name == n) return i;
    return npos;
  }

  std::size_t index_of(const std::string& n) const {
    const std::size_t i = find(n);
    if (i == npos) {
      std::string have;
      for (const auto& a : adapters_) have += (have.empty() ? "" : ", ") + a.name;
      throw ConfigError(describe("LoRALinear", this->name()) + ": unknown adapter \"" + n + "\"; available: [" +
                        have + "]");
    }
    return i;
  }

  bool is_merged(std::size_t i) const { return std::find(merged_.begin(), merged_.end(), i) != merged_.end(); }

  std::vector<std::string> names_of(const std::vector<std::size_t>& idx) const {
    std::vector<std::string> out;
    for (std::size_t i : idx) out.push_back(adapters_[i].name);
    return out;
  }

  std::string join_names(const std::vector<std::size_t>& idx) const {
    std::string s;
    for (std::size_t i : idx) s += (s.empty() ? "" : ", ") + adapters_[i].name;
    return s;
  }

  void merge_impl(const std::vector<std::string>& names, bool safe) {
    const std::string who = describe("LoRALinear", this->name());
    if (disabled_)
      throw ConfigError(who + ": adapters are disabled; enable them before merging (a merged adapter cannot be disabled)");
    std::vector<std::size_t> todo;
    if (names.empty()) {
      for (std::size_t i : active_)
        if (!is_merged(i)) todo.push_back(i);
    } else {
      for (const auto& n : names) {
        const std::size_t i = index_of(n);
        if (is_merged(i) || std::find(todo.begin(), todo.end(), i) != todo.end())
          throw ConfigError(who + ": adapter \"" + n + "\" is already merged");
        todo.push_back(i);
      }
    }
    // Safe: build the merged weight aside and swap it in only if every step succeeded. Plain: merge
    // in place; a DoRA step that cannot be merged is detected before W changes, and the steps
    // already done in this call are undone, so both leave no partial merge behind.
    Matrix<T> aside;
    if (safe) aside = weight.value;
    Matrix<T>& w = safe ? aside : weight.value;
    std::size_t done = 0;
    try {
      for (std::size_t i : todo) {
        const LoraAdapter<T>& a = adapters_[i];
        RowVector<T> f;
        if (a.dora()) {
          RowVector<T> n;
          dora_weight_norm(w, a, n);
          f = a.magnitude.value.row(0).array() / n.array();  // f = m / ‖W + s·B·A‖_row
          if (!f.allFinite() || (f.array() == T(0)).any())
            throw NumericError(who + ": DoRA adapter \"" + a.name +
                               "\" has a zero or non-finite scale m / ‖W + s·B·A‖; its merge could not be undone; "
                               "nothing was merged");
        }
        w.noalias() += static_cast<T>(a.scaling()) * (a.B.value * a.A.value);  // W + s·B·A
        if (a.dora()) w.array().colwise() *= f.transpose().array();             // DoRA: f ⊙ (W + s·B·A)
        if (safe && !w.allFinite())
          throw NumericError(who + ": merging adapter \"" + a.name + "\" gives NaN or Inf in the weight; nothing was merged");
        merged_.push_back(i);
        merged_scale_.push_back(std::move(f));
        ++done;
      }
    } catch (...) {
      for (; done > 0; --done) {
        if (safe) {
          merged_.pop_back();
          merged_scale_.pop_back();
        } else {
          unmerge_last();
        }
      }
      ++generation_;
      throw;
    }
    if (safe) weight.value.swap(aside);
    ++generation_;
  }

  /// Undoes the most recent merge: W −= s·B·A; DoRA: W ← W / f − s·B·A.
  void unmerge_last() {
    const LoraAdapter<T>& a = adapters_[merged_.back()];
    if (a.dora()) weight.value.array().colwise() /= merged_scale_.back().transpose().array();
    weight.value.noalias() -= static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
    merged_.pop_back();
    merged_scale_.pop_back();
  }

  void fill_dropout_mask(Matrix<T>& keep, Index rows, Index cols, double p) {
    keep.resize(rows, cols);
    const T kept = static_cast<T>(1.0 / (1.0 - p));
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) keep(i, j) = dropout_rng_.uniform() < p ? T(0) : kept;
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
    const Matrix<T>& xt = dropped ? ac.xd : cache.x;   // x̃   [rows, in]
    const Matrix<T>& zt = dropped ? ac.xdw : cache.xw;  // z̃ = x̃ Wᵀ   [rows, out]
    const Index out = out_features(), r = a.rank();

    if (a.B.trainable() || a.magnitude.trainable()) {
      Eigen::Block<Matrix<T>> P = scratch(work_db_, out, r);
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
    Eigen::Block<Matrix<T>> BF = scratch(work_bf_, out, r);
    BF = a.B.value.array().colwise() * ac.scale.transpose().array();  // diag(f) B   [out, r]
    Eigen::Block<Matrix<T>> G = scratch(work_g_, dy.rows(), r);
    G.noalias() = dy * BF;  // G = (dY ⊙ f) B   [rows, r]
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
      work_dx_.resize(dy.rows(), in_features());
      work_dx_.noalias() = work_f_ * weight.value;         // D W   [rows, in]
      work_dx_.noalias() += s * G * a.A.value;             // + s G A
      dx->array() += work_dx_.array() * ac.keep.array();  // dropout backward: ⊙ keep
    }
  }

  /// n = ‖w + s·B·A‖ per row, from the factors and without forming B·A:
  ///   n_j² = ‖w_j‖² + 2s·B_j·(A w_jᵀ) + s²·B_j (A Aᵀ) B_jᵀ,
  /// using the products w Aᵀ [out, r] and A Aᵀ [r, r] (O(out·in·r + in·r²) flops, O(out·r) memory).
  void dora_weight_norm(const Matrix<T>& w, const LoraAdapter<T>& a, RowVector<T>& n) {
    const Index out = w.rows(), r = a.rank();
    const T s = static_cast<T>(a.scaling());
    Eigen::Block<Matrix<T>> WAt = scratch(work_wa_, out, r);
    WAt.noalias() = w * a.A.value.transpose();  // w Aᵀ   [out, r]: row j is A w_jᵀ
    Eigen::Block<Matrix<T>> AAt = scratch_square(work_aa_, r);
    AAt.noalias() = a.A.value * a.A.value.transpose();  // A Aᵀ   [r, r]
    Eigen::Block<Matrix<T>> BQ = scratch(work_bq_, out, r);
    BQ.noalias() = a.B.value * AAt;  // B (A Aᵀ)   [out, r]
    n.resize(out);
    for (Index j = 0; j < out; ++j) {
      const T sq = w.row(j).squaredNorm() + T(2) * s * a.B.value.row(j).dot(WAt.row(j)) +
                   s * s * a.B.value.row(j).dot(BQ.row(j));
      n(j) = std::sqrt(std::max(sq, T(0)));  // rounding can push an exact zero slightly below 0
    }
  }

  /// The leading [n, n] block of `buf`, growing it only when n exceeds its size.
  static Eigen::Block<Matrix<T>> scratch_square(Matrix<T>& buf, Index n) {
    if (buf.rows() < n || buf.cols() < n) buf.resize(n, n);
    return buf.topLeftCorner(n, n);
  }

  /// The leading [rows, cols] block of `buf`, growing it only when rows change or cols exceed
  /// its width: no allocation once it has seen the largest shape.
  static Eigen::Block<Matrix<T>> scratch(Matrix<T>& buf, Index rows, Index cols) {
    if (buf.rows() != rows || buf.cols() < cols) buf.resize(rows, std::max(cols, buf.rows() == rows ? buf.cols() : cols));
    return buf.leftCols(cols);
  }

  std::vector<LoraAdapter<T>> adapters_;
  std::vector<std::size_t> active_;  ///< indices into adapters_, in activation order
  std::vector<std::size_t> merged_;  ///< merge order; unmerge pops from the back
  bool disabled_ = false;
  std::uint64_t generation_ = 1;
  Rng dropout_rng_{0x10a};
  std::vector<RowVector<T>> merged_scale_;  ///< DoRA f used by each merge (empty for LoRA); parallel to merged_
  // Scratch, reused across calls (never part of a call's state: that lives in Cache).
  Matrix<T> work_g_;   ///< backward [rows, ≥ r]
  Matrix<T> work_dx_;  ///< backward [rows, in] (dropout only)
  Matrix<T> work_y_;   ///< DoRA forward [rows, out]
  Matrix<T> work_e_;   ///< DoRA backward E [rows, out]
  Matrix<T> work_f_;   ///< DoRA backward D [rows, out] (dropout only)
  Matrix<T> work_db_;  ///< DoRA backward dYᵀ x̃Aᵀ [out, ≥ r]
  Matrix<T> work_bf_;  ///< DoRA backward diag(f) B [out, ≥ r]
  Matrix<T> work_wa_;  ///< DoRA norm W Aᵀ [out, ≥ r]
  Matrix<T> work_aa_;  ///< DoRA norm A Aᵀ [≥ r, ≥ r]
  Matrix<T> work_bq_;  ///< DoRA norm B A Aᵀ [out, ≥ r]
  RowVector<T> work_m_;    ///< DoRA backward Σ_rows dY ⊙ z̃ [out]
  RowVector<T> work_fm1_;  ///< DoRA backward f − 1 [out]
};

}  // namespace peft
