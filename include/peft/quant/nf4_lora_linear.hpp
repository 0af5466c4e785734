#pragma once
// NF4LoRALinear: LoRA on a frozen 4-bit NF4 base — the QLoRA layer (Dettmers et al. 2023, "QLoRA:
// Efficient Finetuning of Quantized LLMs"; LoRA: Hu et al. 2021).
//
//   y = x · deq(Q)ᵀ + b + Σ_active s_i · (dropout_i(x) A_iᵀ) B_iᵀ,   s_i = alpha/r (or alpha/√r)
//   Q: NF4Tensor of W [out, in];  A_i [r, in], B_i [out, r] trainable;  b [out] frozen by default.
//
// The dense fp32 weight is never formed: forward and backward decode `tile_rows` output rows at a
// time into one reused [tile, in] buffer and multiply,
//   y[:, t]  = x · W_tᵀ          (forward, per tile t of output rows)
//   dX      += dY[:, t] · W_t     (backward, the input gradient through the frozen base)
// so the extra memory is tile·in scalars whatever the layer size. The base gets no gradient (it is
// quantized and frozen, as in QLoRA); dA, dB are those of LoRALinear, exactly:
//   dB = s · dYᵀ (x̃ Aᵀ),   dA = s · (dY B)ᵀ x̃,   dX += s · (dY B) A (⊙ dropout mask).
// Merging cannot add a dense delta to 4-bit codes exactly: merged_weight() returns the dense
// deq(Q) + Σ s·B·A, and merge_and_requantize() re-quantizes it in place, reporting the error the
// second rounding adds, ‖deq(Q') − (deq(Q) + Σ s·B·A)‖_F.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/layers/linear.hpp"
#include "peft/layers/lora_linear.hpp"
#include "peft/quant/nf4.hpp"

namespace peft {

template <class T>
class NF4LoRALinear : public Module<T> {
 public:
  struct AdapterCache {
    std::size_t adapter = 0;  ///< index into adapters()
    Matrix<T> keep;           ///< dropout multiplier (0 or 1/(1−p)) [rows, in]; empty without dropout
    Matrix<T> xd;             ///< dropout(x) [rows, in]; empty without dropout
    Matrix<T> xa;             ///< dropout(x) Aᵀ [rows, r]
  };

  /// What backward needs: x (for dA) and, per active adapter, x·Aᵀ (for dB). Never x·Wᵀ, never W.
  struct Cache {
    Matrix<T> x;
    Index rows = 0;
    std::vector<AdapterCache> adapters;
    std::size_t used = 0;
    std::uint64_t generation = 0;
  };

  /// Statistics of merge_and_requantize().
  struct RequantizeReport {
    double added_error = 0.0;     ///< ‖deq(Q') − (deq(Q) + ΔW)‖_F
    double relative_error = 0.0;  ///< added_error / ‖deq(Q) + ΔW‖_F
    std::vector<std::string> merged;  ///< adapters folded into the base (and removed)
  };

  NF4LoRALinear() = default;

  /// Wraps a quantized weight [out, in] and an optional bias (frozen).
  explicit NF4LoRALinear(quant::NF4Tensor weight, const RowVector<T>& b = RowVector<T>(), std::string name = "",
                         std::uint64_t seed = 0x4f4)
      : Module<T>(std::move(name)), q_(std::move(weight)), rng_(seed) {
    const std::string who = describe("NF4LoRALinear", this->name());
    q_.validate(who);
    if (q_.shape.size() != 2)
      throw ShapeError(who + ": quantized weight must be 2-D [out, in], got shape " + quant::detail::nf4_shape_str(q_.shape));
    if (b.size() > 0) {
      check::shape("NF4LoRALinear", this->name(), "bias", 1, b.size(), 1, out_features());
      bias = Parameter<T>(1, b.size(), false, true);
      bias.value = b;
    }
  }

  /// Quantizes a dense Linear (what bitsandbytes' Linear4bit does when a model is loaded in 4 bit).
  static NF4LoRALinear from_linear(const Linear<T>& base, const quant::NF4Options& opt = {}, std::string name = "") {
    RowVector<T> b;
    if (base.has_bias()) b = base.bias.value.row(0);
    return NF4LoRALinear(quant::quantize_nf4<T>(base.weight.value, opt), b, std::move(name));
  }

  Parameter<T> bias;  ///< b [out] (stored [1, out]); frozen unless the caller unfreezes it

  const quant::NF4Tensor& quantized_weight() const { return q_; }
  Index in_features() const { return static_cast<Index>(q_.cols()); }
  Index out_features() const { return static_cast<Index>(q_.rows()); }
  bool has_bias() const { return bias.size() > 0; }

  /// Output rows decoded per tile (default 256: one GEMM per tile stays efficient, and at in = 4096 the
  /// buffer is 4 MiB of fp32, 1/16 of the dense weight). Memory: tile_rows · in scalars.
  void set_tile_rows(Index rows) {
    if (rows <= 0)
      throw ConfigError(describe("NF4LoRALinear", this->name()) + ": tile_rows must be > 0, got " + std::to_string(rows));
    tile_rows_ = rows;
  }
  Index tile_rows() const { return tile_rows_; }

  // ---- adapters -----------------------------------------------------------------------------

  /// Adds a trainable adapter (A, B initialized as LoRALinear does) and makes it the active one.
  LoraAdapter<T>& add_adapter(const std::string& adapter_name, const LoraConfig& config, Rng& rng) {
    const std::string who = describe("NF4LoRALinear", this->name());
    if (adapter_name.empty()) throw ConfigError(who + ": adapter name must not be empty");
    if (find(adapter_name) != npos) throw ConfigError(who + ": adapter \"" + adapter_name + "\" already exists");
    const Index max_rank = std::min(in_features(), out_features());
    if (config.r <= 0 || config.r > max_rank)
      throw ConfigError(who + ": rank r must be in [1, " + std::to_string(max_rank) + "] = [1, min(in, out)], got " +
                        std::to_string(config.r));
    check::positive("NF4LoRALinear", this->name(), "lora_alpha", config.alpha);
    check::unit_interval_open("NF4LoRALinear", this->name(), "lora_dropout", config.dropout);
    if (config.use_dora)
      throw ConfigError(who + ": DoRA adapters are not supported on an NF4 base (adapter \"" + adapter_name +
                        "\"); use a LoRALinear on the dequantized weight");
    LoraAdapter<T> a{adapter_name, config, Parameter<T>(config.r, in_features()), Parameter<T>(out_features(), config.r)};
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
  LoraAdapter<T>& add_adapter(const std::string& adapter_name, const LoraConfig& config = {}) {
    return add_adapter(adapter_name, config, rng_);
  }

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

  void delete_adapter(const std::string& adapter_name) {
    const std::size_t i = index_of(adapter_name);
    adapters_.erase(adapters_.begin() + static_cast<std::ptrdiff_t>(i));
    active_.erase(std::remove(active_.begin(), active_.end(), i), active_.end());
    for (auto& k : active_)
      if (k > i) --k;
    ++generation_;
  }

  bool has_adapter(const std::string& adapter_name) const { return find(adapter_name) != npos; }
  LoraAdapter<T>& adapter(const std::string& adapter_name) { return adapters_[index_of(adapter_name)]; }
  const LoraAdapter<T>& adapter(const std::string& adapter_name) const { return adapters_[index_of(adapter_name)]; }
  const std::vector<LoraAdapter<T>>& adapters() const { return adapters_; }
  std::vector<std::string> active_adapters() const {
    std::vector<std::string> out;
    for (std::size_t i : active_) out.push_back(adapters_[i].name);
    return out;
  }

  // ---- dense views and merging --------------------------------------------------------------

  /// deq(Q) [out, in] (dense; for inspection and merging, not used by forward/backward).
  Matrix<T> dequantized_weight() const { return quant::dequantize_nf4<T>(q_); }

  /// deq(Q) + Σ_active s·B·A [out, in].
  Matrix<T> merged_weight() const {
    Matrix<T> w = dequantized_weight();
    for (std::size_t i : active_) {
      const LoraAdapter<T>& a = adapters_[i];
      w.noalias() += static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
    }
    return w;
  }

  /// Q ← quantize(deq(Q) + Σ_active s·B·A) with `opt`; the active adapters are removed (their update
  /// now lives in the base). Reports the error this second rounding adds. Refused (NumericError,
  /// nothing changed) when the merged weight is not finite.
  RequantizeReport merge_and_requantize(const quant::NF4Options& opt = {}) {
    const std::string who = describe("NF4LoRALinear", this->name());
    if (active_.empty()) throw ConfigError(who + ": no active adapter to merge");
    const Matrix<T> w = merged_weight();
    if (!w.allFinite()) throw NumericError(who + ": the merged weight has NaN or Inf; nothing was merged");
    quant::NF4Tensor next = quant::quantize_nf4<T>(w, opt);
    const Matrix<T> back = quant::dequantize_nf4<T>(next);
    RequantizeReport rep;
    rep.added_error = (back - w).template cast<double>().norm();
    const double wn = w.template cast<double>().norm();
    rep.relative_error = wn > 0.0 ? rep.added_error / wn : rep.added_error;
    rep.merged = active_adapters();
    q_ = std::move(next);
    for (const auto& n : rep.merged) delete_adapter(n);
    return rep;
  }

  // ---- forward / backward -------------------------------------------------------------------

  /// y = x deq(Q)ᵀ + b + Σ s·dropout(x) Aᵀ Bᵀ, decoding tile_rows output rows at a time.
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
    check::input_features("NF4LoRALinear", this->name(), x.cols(), in_features());
    const Index rows = x.rows();
    const Index out = out_features();
    y.resize(rows, out);
    for (Index r0 = 0; r0 < out; r0 += tile_rows_) {
      const Index n = std::min(tile_rows_, out - r0);
      quant::dequantize_nf4_rows<T>(q_, r0, n, tile_);       // W_t [n, in]
      y.middleCols(r0, n).noalias() = x * tile_.transpose();  // y[:, t] = x W_tᵀ   [rows, n]
    }
    if (has_bias()) y.rowwise() += bias.value.row(0);

    cache.rows = rows;
    cache.generation = generation_;
    cache.used = 0;
    bool need_x = false;
    for (std::size_t i : active_) {
      const LoraAdapter<T>& a = adapters_[i];
      if (cache.adapters.size() <= cache.used) cache.adapters.emplace_back();
      AdapterCache& ac = cache.adapters[cache.used++];
      ac.adapter = i;
      const T s = static_cast<T>(a.scaling());
      ac.xa.resize(rows, a.rank());
      if (this->training() && a.config.dropout > 0.0) {
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
      y.noalias() += s * ac.xa * a.B.value.transpose();  // + s (x Aᵀ) Bᵀ   [rows, out]
    }
    if (need_x) cache.x = x;
  }

  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }

  /// Accumulates dA_i, dB_i (and db if unfrozen); writes dX into *dx unless dx is null.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
    const std::string& nm = this->name();
    if (cache.generation != generation_)
      throw ConfigError(describe("NF4LoRALinear", nm) +
                        ": adapters were added, removed, merged or switched between forward and backward; run forward again");
    check::shape("NF4LoRALinear", nm, "output gradient", dy.rows(), dy.cols(), cache.rows, out_features());
    if (has_bias() && bias.trainable()) bias.grad.row(0) += dy.colwise().sum();  // db = Σ_rows dY
    if (dx != nullptr) {
      dx->resize(dy.rows(), in_features());
      const Index out = out_features();
      for (Index r0 = 0; r0 < out; r0 += tile_rows_) {
        const Index n = std::min(tile_rows_, out - r0);
        quant::dequantize_nf4_rows<T>(q_, r0, n, tile_);  // W_t [n, in]
        if (r0 == 0)
          dx->noalias() = dy.middleCols(r0, n) * tile_;  // dX = dY[:, t] W_t   [rows, in]
        else
          dx->noalias() += dy.middleCols(r0, n) * tile_;
      }
    }
    for (std::size_t k = 0; k < cache.used; ++k) {
      const AdapterCache& ac = cache.adapters[k];
      LoraAdapter<T>& a = adapters_[ac.adapter];
      const T s = static_cast<T>(a.scaling());
      const bool dropped = ac.keep.size() > 0;
      if (a.B.trainable()) a.B.grad.noalias() += s * dy.transpose() * ac.xa;  // dB = s dYᵀ (x̃ Aᵀ)   [out, r]
      if (!a.A.trainable() && dx == nullptr) continue;
      work_g_.resize(dy.rows(), a.rank());
      work_g_.noalias() = dy * a.B.value;  // G = dY B   [rows, r]
      if (a.A.trainable()) {
        if (dropped) {
          a.A.grad.noalias() += s * work_g_.transpose() * ac.xd;  // dA = s Gᵀ x̃   [r, in]
        } else {
          check::shape("NF4LoRALinear", nm, "cached input (was A unfrozen after forward?)", cache.x.rows(),
                       cache.x.cols(), cache.rows, in_features());
          a.A.grad.noalias() += s * work_g_.transpose() * cache.x;  // dA = s Gᵀ X   [r, in]
        }
      }
      if (dx != nullptr) {
        if (dropped) {
          work_dx_.resize(dy.rows(), in_features());
          work_dx_.noalias() = s * work_g_ * a.A.value;           // s G A   [rows, in]
          dx->array() += work_dx_.array() * ac.keep.array();       // dropout backward: ⊙ keep
        } else {
          dx->noalias() += s * work_g_ * a.A.value;  // dX += s G A   [rows, in]
        }
      }
    }
  }

  Rng& rng() { return rng_; }

 protected:
  /// Trainable tensors only: the quantized weight is not a Parameter (see quantized_weight()).
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
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
      throw ConfigError(describe("NF4LoRALinear", this->name()) + ": unknown adapter \"" + n + "\"; available: [" +
                        have + "]");
    }
    return i;
  }

  void fill_dropout_mask(Matrix<T>& keep, Index rows, Index cols, double p) {
    keep.resize(rows, cols);
    const T kept = static_cast<T>(1.0 / (1.0 - p));
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) keep(i, j) = rng_.uniform() < p ? T(0) : kept;
  }

  quant::NF4Tensor q_;
  std::vector<LoraAdapter<T>> adapters_;
  std::vector<std::size_t> active_;
  std::uint64_t generation_ = 1;
  Index tile_rows_ = 256;
  Rng rng_{0x4f4};
  Matrix<T> tile_;     ///< decoded rows of the base [tile_rows, in], reused by forward and backward
  Matrix<T> work_g_;   ///< backward scratch [rows, r]
  Matrix<T> work_dx_;  ///< backward scratch [rows, in] (dropout only)
};

}  // namespace peft
