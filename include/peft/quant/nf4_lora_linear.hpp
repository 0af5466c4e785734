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
#include <initializer_list>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/layers/linear.hpp"
#include "peft/layers/lora_adapter_set.hpp"
#include "peft/quant/nf4.hpp"

namespace peft {

template <class T>
class NF4LoRALinear : public Module<T> {
 public:
  /// keep, xd = dropout(x), xa = dropout(x) Aᵀ of one active adapter (see LoraAdapterCache).
  using AdapterCache = LoraAdapterCache<T>;

  /// What backward needs: x (for dA) and, per active adapter, x·Aᵀ (for dB). Never x·Wᵀ, never W.
  using Cache = LoraForwardCache<T>;

  /// Statistics of merge_and_requantize().
  struct RequantizeReport {
    double added_error = 0.0;         ///< ‖deq(Q') − (deq(Q) + ΔW)‖_F
    double relative_error = 0.0;      ///< added_error / ‖deq(Q) + ΔW‖_F
    std::vector<std::string> merged;  ///< adapters folded into the base (and removed)
  };

  NF4LoRALinear() = default;

  /// Wraps a quantized weight [out, in] and an optional bias (frozen).
  explicit NF4LoRALinear(quant::NF4Tensor weight, const RowVector<T>& b = RowVector<T>(), std::string name = "",
                         std::uint64_t seed = 0x4f4)
      : Module<T>(std::move(name)), q_(std::move(weight)), set_("NF4LoRALinear", seed) {
    const std::string who = describe("NF4LoRALinear", this->name());
    q_.validate(who);
    if (q_.shape.size() != 2)
      throw ShapeError(who + ": quantized weight must be 2-D [out, in], got shape " +
                       quant::detail::nf4_shape_str(q_.shape));
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
      throw ConfigError(describe("NF4LoRALinear", this->name()) + ": tile_rows must be > 0, got " +
                        std::to_string(rows));
    tile_rows_ = rows;
  }
  Index tile_rows() const { return tile_rows_; }

  // ---- adapters -----------------------------------------------------------------------------

  /// Adds a trainable adapter (A, B initialized as LoRALinear does) and makes it the active one.
  LoraAdapter<T>& add_adapter(const std::string& adapter_name, const LoraConfig& config, Rng& rng);
  LoraAdapter<T>& add_adapter(const std::string& adapter_name, const LoraConfig& config = {}) {
    return add_adapter(adapter_name, config, set_.rng());
  }

  void set_active(const std::vector<std::string>& names) { set_.set_active(this->name(), names); }
  void set_active(const std::string& adapter_name) { set_active(std::vector<std::string>{adapter_name}); }
  /// `set_active({"a", "b"})` (as LoRALinear: avoids std::string's iterator-pair constructor).
  void set_active(std::initializer_list<std::string> names) { set_active(std::vector<std::string>(names)); }

  void delete_adapter(const std::string& adapter_name) { set_.erase(index_of(adapter_name)); }

  bool has_adapter(const std::string& adapter_name) const { return set_.find(adapter_name) != LoraAdapterSet<T>::npos; }
  LoraAdapter<T>& adapter(const std::string& adapter_name) { return set_[index_of(adapter_name)]; }
  const LoraAdapter<T>& adapter(const std::string& adapter_name) const { return set_[index_of(adapter_name)]; }
  LoraAdapterList<const LoraAdapter<T>> adapters() const { return set_.list(); }
  std::vector<std::string> active_adapters() const { return set_.names_of(set_.active()); }

  // ---- dense views and merging --------------------------------------------------------------

  /// deq(Q) [out, in] (dense; for inspection and merging, not used by forward/backward).
  Matrix<T> dequantized_weight() const { return quant::dequantize_nf4<T>(q_); }

  /// deq(Q) + Σ_active s·B·A [out, in].
  Matrix<T> merged_weight() const;

  /// The layout of the current base (block sizes, double quantization, dtype): what
  /// merge_and_requantize() keeps unless told otherwise.
  quant::NF4Options quant_options() const;

  /// Q ← quantize(deq(Q) + Σ_active s·B·A) in the current base's layout; the active adapters are
  /// removed (their update now lives in the base). Reports the error this second rounding adds.
  /// Refused (NumericError, nothing changed) when the merged weight is not finite.
  RequantizeReport merge_and_requantize() { return merge_and_requantize(quant_options()); }

  /// Same, re-quantized with `opt` (another block size, with or without double quantization).
  RequantizeReport merge_and_requantize(const quant::NF4Options& opt);

  // ---- forward / backward -------------------------------------------------------------------

  /// y = x deq(Q)ᵀ + b + Σ s·dropout(x) Aᵀ Bᵀ, decoding tile_rows output rows at a time.
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache);

  Matrix<T> forward(const ConstMatrixRef<T>& x, Cache& cache) {
    Matrix<T> y;
    forward(x, y, cache);
    return y;
  }

  /// Accumulates dA_i, dB_i (and db if unfrozen); writes dX into *dx unless dx is null.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx);

  Rng& rng() { return set_.rng(); }

 protected:
  /// Trainable tensors only: the quantized weight is not a Parameter (see quantized_weight()).
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    if (has_bias()) fn("bias", bias);
    for (auto& a : set_.list()) {
      fn("lora_A." + a.name + ".weight", a.A);
      fn("lora_B." + a.name + ".weight", a.B);
    }
  }

 private:
  std::size_t index_of(const std::string& n) const { return set_.index_of(this->name(), n); }

  quant::NF4Tensor q_;
  LoraAdapterSet<T> set_{"NF4LoRALinear", 0x4f4};  ///< adapters, active list, generation, dropout generator
  /// Decodes base rows [r0, r0 + n) into the first n rows of tile_. The buffer is sized once to
  /// min(tile_rows, out) rows, so a ragged last tile does not shrink it (and the next call regrow it).
  void decode_tile(Index r0, Index n) {
    const Index cap = std::min(tile_rows_, out_features());
    if (tile_.rows() != cap || tile_.cols() != in_features()) tile_.resize(cap, in_features());
    quant::dequantize_nf4_range<T>(q_, static_cast<std::int64_t>(r0) * in_features(),
                                   static_cast<std::int64_t>(n) * in_features(), tile_.data());
  }

  Index tile_rows_ = 256;
  Matrix<T> tile_;  ///< decoded rows of the base [tile_rows, in], reused by forward and backward
};

// ---- NF4LoRALinear members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
LoraAdapter<T>& NF4LoRALinear<T>::add_adapter(const std::string& adapter_name, const LoraConfig& config, Rng& rng) {
  if (config.use_dora)  // refused before check_new, which may warn about the rank
    throw ConfigError(describe("NF4LoRALinear", this->name()) +
                      ": DoRA adapters are not supported on an NF4 base (adapter \"" + adapter_name +
                      "\"); use a LoRALinear on the dequantized weight");
  set_.check_new(this->name(), adapter_name, config, in_features(), out_features());
  return set_.add(LoraAdapterSet<T>::create(adapter_name, config, in_features(), out_features(), rng));
}

template <class T>
Matrix<T> NF4LoRALinear<T>::merged_weight() const {
  Matrix<T> w = dequantized_weight();
  for (std::size_t i : set_.active()) {
    const LoraAdapter<T>& a = set_[i];
    w.noalias() += static_cast<T>(a.scaling()) * (a.B.value * a.A.value);
  }
  return w;
}

template <class T>
quant::NF4Options NF4LoRALinear<T>::quant_options() const {
  quant::NF4Options o;
  o.blocksize = q_.blocksize;
  o.double_quant = q_.nested;
  o.nested_blocksize = q_.nested_blocksize;
  o.dtype = q_.dtype == "float16" ? "float16" : q_.dtype == "bfloat16" ? "bfloat16" : "float32";
  return o;
}

template <class T>
typename NF4LoRALinear<T>::RequantizeReport NF4LoRALinear<T>::merge_and_requantize(const quant::NF4Options& opt) {
  const std::string who = describe("NF4LoRALinear", this->name());
  if (set_.active().empty()) throw ConfigError(who + ": no active adapter to merge");
  const Matrix<T> w = merged_weight();
  if (!all_finite(w)) throw NumericError(who + ": the merged weight has NaN or Inf; nothing was merged");
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

template <class T>
void NF4LoRALinear<T>::forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
  if (q_.shape.empty())
    throw ConfigError(describe("NF4LoRALinear", this->name()) + ": has no quantized weight (default-constructed)");
  check::input_features("NF4LoRALinear", this->name(), x.cols(), in_features());
  const Index rows = x.rows();
  const Index out = out_features();
  y.resize(rows, out);
  for (Index r0 = 0; r0 < out; r0 += tile_rows_) {
    const Index n = std::min(tile_rows_, out - r0);
    decode_tile(r0, n);                                                // W_t [n, in]
    y.middleCols(r0, n).noalias() = x * tile_.topRows(n).transpose();  // y[:, t] = x W_tᵀ   [rows, n]
  }
  if (has_bias()) y.rowwise() += bias.value.row(0);

  cache.rows = rows;
  cache.generation = set_.generation();
  cache.used = 0;
  bool need_x = false;
  for (std::size_t i : set_.active()) {
    const LoraAdapter<T>& a = set_[i];
    AdapterCache& ac = LoraAdapterSet<T>::next_slot(cache.adapters, cache.used, i);
    const T s = static_cast<T>(a.scaling());
    const bool drop = this->training() && a.config.dropout > 0.0;
    set_.project(x, a, drop, ac);  // keep, x̃, x̃ Aᵀ
    if (!drop) need_x = need_x || a.A.trainable();
    y.noalias() += s * ac.xa * a.B.value.transpose();  // + s (x̃ Aᵀ) Bᵀ   [rows, out]
  }
  if (need_x)
    cache.x = x;
  else
    cache.x.resize(0, 0);  // nothing to keep, and a stale x must not pass backward's shape check
}

template <class T>
void NF4LoRALinear<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
  const std::string& nm = this->name();
  if (cache.generation == 0)
    throw ConfigError(describe("NF4LoRALinear", nm) + ": backward called with a cache that no forward filled");
  if (cache.generation != set_.generation())
    throw ConfigError(
        describe("NF4LoRALinear", nm) +
        ": adapters were added, removed, merged or switched between forward and backward; run forward again");
  check::shape("NF4LoRALinear", nm, "output gradient", dy.rows(), dy.cols(), cache.rows, out_features());
  if (has_bias() && bias.trainable()) bias.accumulator().row(0) += dy.colwise().sum();  // db = Σ_rows dY
  if (dx != nullptr) {
    dx->resize(dy.rows(), in_features());
    const Index out = out_features();
    for (Index r0 = 0; r0 < out; r0 += tile_rows_) {
      const Index n = std::min(tile_rows_, out - r0);
      decode_tile(r0, n);  // W_t [n, in]
      if (r0 == 0)
        dx->noalias() = dy.middleCols(r0, n) * tile_.topRows(n);  // dX = dY[:, t] W_t   [rows, in]
      else
        dx->noalias() += dy.middleCols(r0, n) * tile_.topRows(n);
    }
  }
  for (std::size_t k = 0; k < cache.used; ++k) {
    const AdapterCache& ac = cache.adapters[k];
    LoraAdapter<T>& a = set_[ac.adapter];
    const bool dropped = ac.keep.size() > 0;
    if (!dropped && a.A.trainable())
      check::shape("NF4LoRALinear", nm, "cached input (was A unfrozen after forward?)", cache.x.rows(), cache.x.cols(),
                   cache.rows, in_features());
    set_.backward_lora(a, ac, dropped ? ac.xd : cache.x, dy, dx);  // x̃: the input the adapter saw
  }
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.cpp); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class NF4LoRALinear<float>;
extern template class NF4LoRALinear<double>;
}  // namespace peft
#endif
