#pragma once
// LoRALinear: a Linear layer with any number of named low-rank adapters (Hu et al., 2021,
// "LoRA: Low-Rank Adaptation of Large Language Models"; rsLoRA: Kalajdzievski, 2023).
//
//   y = x Wᵀ + b + Σ_active s_i · (dropout_i(x) A_iᵀ) B_iᵀ
//   A_i [r, in], B_i [out, r], s_i = alpha/r, or alpha/√r with rsLoRA.
//
// Init (as Hugging Face PEFT): A kaiming-uniform(a=√5), B = 0, so the output equals the base
// exactly; "gaussian" draws A ~ N(0, (1/r)²); "none" leaves both with nn.Linear's default init.
// Merge adds s·B·A into W (and skips the adapter in forward); unmerge subtracts it again, last
// merged first. Backward while anything is merged is refused: the gradients would be wrong.
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

  /// s = alpha / r, or alpha / √r with rsLoRA.
  double scaling() const {
    return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
  }
};

template <class T>
struct LoraAdapter {
  std::string name;
  LoraConfig config;
  Parameter<T> A;  ///< [r, in]
  Parameter<T> B;  ///< [out, r]

  int rank() const { return config.r; }
  double scaling() const { return config.scaling(); }
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
  };

  /// What backward needs: x (for dW and dA) and, per active adapter, x·Aᵀ (for dB). Never x·Wᵀ.
  struct Cache {
    Matrix<T> x;
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

  /// W −= s·B·A for every merged adapter, last merged first.
  void unmerge() {
    while (!merged_.empty()) {
      const LoraAdapter<T>& a = adapters_[merged_.back()];
      weight.value.noalias() -= static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
      merged_.pop_back();
    }
    ++generation_;
  }

  /// The dense update s·B·A of one adapter [out, in].
  Matrix<T> delta_weight(const std::string& adapter_name) const {
    const LoraAdapter<T>& a = adapter(adapter_name);
    Matrix<T> d(out_features(), in_features());
    d.noalias() = static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
    return d;
  }

  // ---- forward / backward -------------------------------------------------------------------

  /// y = x Wᵀ + b + Σ s·dropout(x) Aᵀ Bᵀ over active, unmerged adapters. Reuses `y` and `cache`
  /// buffers, so repeated calls with the same shapes do not allocate.
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
    check::input_features("LoRALinear", this->name(), x.cols(), in_features());
    const Index rows = x.rows();
    y.resize(rows, out_features());
    y.noalias() = x * weight.value.transpose();  // base: x Wᵀ   [rows, out]
    if (has_bias()) y.rowwise() += bias.value.row(0);

    cache.rows = rows;
    cache.generation = generation_;
    cache.used = 0;
    bool need_x = weight.trainable();
    if (!disabled_) {
      for (std::size_t i : active_) {
        if (is_merged(i)) continue;
        const LoraAdapter<T>& a = adapters_[i];
        if (cache.adapters.size() <= cache.used) cache.adapters.emplace_back();
        AdapterCache& ac = cache.adapters[cache.used++];
        ac.adapter = i;
        const T s = static_cast<T>(a.scaling());
        const bool drop = this->training() && a.config.dropout > 0.0;
        ac.xa.resize(rows, a.rank());
        if (drop) {
          fill_dropout_mask(ac.keep, rows, in_features(), a.config.dropout);
          ac.xd.resize(rows, in_features());
          ac.xd.array() = x.array() * ac.keep.array();
          ac.xa.noalias() = ac.xd * a.A.value.transpose();  // dropout(x) Aᵀ   [rows, r]
        } else {
          ac.keep.resize(0, 0);
          ac.xd.resize(0, 0);
          ac.xa.noalias() = x * a.A.value.transpose();  // x Aᵀ   [rows, r]
          need_x = need_x || a.A.trainable();
        }
        y.noalias() += s * ac.xa * a.B.value.transpose();  // + s (x Aᵀ) Bᵀ   [rows, out]
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

  /// Accumulates dW, db, dA_i, dB_i (those trainable) and writes dX into *dx unless dx is null.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
    if (cache.generation == 0)
      throw ConfigError(describe("LoRALinear", this->name()) + ": backward called with a cache that no forward filled");
    if (!merged_.empty())
      throw ConfigError(describe("LoRALinear", this->name()) + ": cannot train while adapters are merged (" + join_names(merged_) +
                        "); unmerge first");
    if (cache.generation != generation_)
      throw ConfigError(describe("LoRALinear", this->name()) + ": adapters were added, removed, (un)merged or switched between forward and "
                              "backward; run forward again");
    check::shape("LoRALinear", this->name(), "output gradient", dy.rows(), dy.cols(), cache.rows, out_features());

    const bool needs_x = weight.trainable() || std::any_of(cache.adapters.begin(), cache.adapters.begin() + static_cast<std::ptrdiff_t>(cache.used), [&](const AdapterCache& ac) {
      return ac.keep.size() == 0 && adapters_[ac.adapter].A.trainable();
    });
    if (needs_x)
      check::shape("LoRALinear", this->name(), "cached input (was a parameter unfrozen after forward?)", cache.x.rows(),
                   cache.x.cols(), cache.rows, in_features());
    if (weight.trainable()) weight.accumulator().noalias() += dy.transpose() * cache.x;  // dW = dYᵀ X   [out, in]
    if (has_bias() && bias.trainable()) bias.accumulator().row(0) += dy.colwise().sum();  // db = Σ_rows dY
    if (dx != nullptr) {
      dx->resize(dy.rows(), in_features());
      dx->noalias() = dy * weight.value;  // dX = dY W   [rows, in]
    }
    for (std::size_t k = 0; k < cache.used; ++k) {
      const AdapterCache& ac = cache.adapters[k];
      LoraAdapter<T>& a = adapters_[ac.adapter];
      const T s = static_cast<T>(a.scaling());
      const bool dropped = ac.keep.size() > 0;
      if (a.B.trainable()) a.B.accumulator().noalias() += s * dy.transpose() * ac.xa;  // dB = s dYᵀ (x̃ Aᵀ)   [out, r]
      if (!a.A.trainable() && dx == nullptr) continue;
      // Adapters of different ranks share one scratch buffer sized to the largest rank seen, so
      // alternating ranks never reallocate.
      Eigen::Block<Matrix<T>> G = scratch(work_g_, dy.rows(), a.rank());
      G.noalias() = dy * a.B.value;  // G = dY B   [rows, r]
      if (a.A.trainable()) {
        if (dropped)
          a.A.accumulator().noalias() += s * G.transpose() * ac.xd;  // dA = s Gᵀ x̃   [r, in]
        else
          a.A.accumulator().noalias() += s * G.transpose() * cache.x;  // dA = s Gᵀ X   [r, in]
      }
      if (dx != nullptr) {
        if (dropped) {
          work_dx_.resize(dy.rows(), in_features());
          work_dx_.noalias() = s * G * a.A.value;  // s G A   [rows, in]
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
    std::vector<std::size_t> todo;
    if (disabled_)
      throw ConfigError(describe("LoRALinear", this->name()) +
                        ": adapters are disabled; enable them before merging (a merged adapter cannot be disabled)");
    if (names.empty()) {
      for (std::size_t i : active_)
        if (!is_merged(i)) todo.push_back(i);
    } else {
      for (const auto& n : names) {
        const std::size_t i = index_of(n);
        if (is_merged(i))
          throw ConfigError(describe("LoRALinear", this->name()) + ": adapter \"" + n + "\" is already merged");
        todo.push_back(i);
      }
    }
    if (safe) {
      Matrix<T> w = weight.value;
      for (std::size_t i : todo) {
        const LoraAdapter<T>& a = adapters_[i];
        w.noalias() += static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
        if (!w.allFinite())
          throw NumericError(describe("LoRALinear", this->name()) + ": merging adapter \"" + a.name +
                             "\" gives NaN or Inf in the weight; nothing was merged");
      }
      weight.value.swap(w);
    } else {
      for (std::size_t i : todo) {
        const LoraAdapter<T>& a = adapters_[i];
        weight.value.noalias() += static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
      }
    }
    merged_.insert(merged_.end(), todo.begin(), todo.end());
    ++generation_;
  }

  void fill_dropout_mask(Matrix<T>& keep, Index rows, Index cols, double p) {
    keep.resize(rows, cols);
    const T kept = static_cast<T>(1.0 / (1.0 - p));
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) keep(i, j) = dropout_rng_.uniform() < p ? T(0) : kept;
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
  Matrix<T> work_g_;   ///< backward scratch [rows, ≥ r]
  Matrix<T> work_dx_;  ///< backward scratch [rows, in] (dropout only)
};

}  // namespace peft
