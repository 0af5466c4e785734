#pragma once
// LoHa: low-rank Hadamard product adaptation (Hyeon-Woo, Ye-Bin & Oh, ICLR 2022, "FedPara:
// Low-Rank Hadamard Product for Communication-Efficient Federated Learning"; LyCORIS), as Hugging
// Face PEFT 0.21.2 implements it for nn.Linear.
//
//   W1 = w1_a w1_b,  W2 = w2_a w2_b          w*_a [out, r], w*_b [r, in]
//   ΔW = s · (W1 ⊙ W2)  [out, in],  s = float32(alpha / r)
//   forward:  y += x ΔWᵀ                    (PEFT builds ΔW, then F.linear; so do we, in a reused buffer)
//   merge:    W += ΔW;  unmerge: W −= ΔW;  rank(ΔW) ≤ r²
//   LoRA form (exact, rank r², Khatri–Rao): B' = w1_a •row w2_a [out, r²], A' = w1_b •col w2_b [r², in],
//             scaling s, since (P1 Q1) ⊙ (P2 Q2) = (P1 •row P2)(Q1 •col Q2)
//
// The scale is rounded to float32 even for float64 models, as PEFT does (torch.tensor(alpha / r)
// has torch's default dtype), so float64 results match PEFT's bit for bit.
//
// Init (PEFT, init_weights=true): w1_a, w1_b, w2_a kaiming-uniform(a=√5), w2_b = 0, so ΔW = 0;
// init_weights=false: all four kaiming-uniform.
//
// Training only (identity in eval): rank_dropout multiplies the rows of ΔW by a 0/1 mask divided
// by its mean; module_dropout skips the whole term with probability p.
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/common.hpp"
#include "peft/adapters/method.hpp"
#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/init.hpp"
#include "peft/core/rng.hpp"
#include "peft/merge/lora_factors.hpp"

namespace peft {

/// LoHaConfig for one module, with PEFT's option names (r and alpha after rank_pattern /
/// alpha_pattern have been resolved for the module).
struct LohaConfig {
  int r = 8;
  double alpha = 8.0;
  double rank_dropout = 0.0;          ///< training only: row mask on ΔW, rescaled by its mean
  double module_dropout = 0.0;        ///< training only: skip the term with this probability
  bool use_effective_conv2d = false;  ///< Conv layers only: no effect on Linear
  bool init_weights = true;           ///< true: w2_b = 0 (identity); false: all random

  /// s = float32(alpha / r), widened back to double (PEFT's rounding).
  double scaling() const { return static_cast<double>(static_cast<float>(alpha / static_cast<double>(r))); }
};

/// One layer's LoHa term on an [out, in] base.
template <class T>
class LohaAdapter {
 public:
  static constexpr const char* kPeftType = "LOHA";  ///< Hugging Face PEFT's peft_type
  static constexpr const char* kKind = "LoHa";

  /// What backward needs from one forward.
  struct Cache {
    Index rows = 0;
    bool skipped = false;  ///< module dropout skipped the term (backward adds nothing)
    Matrix<T> x;           ///< the input [rows, in] (dΔW = Gᵀ x)
    RowVector<T> mask;     ///< rank-dropout row mask [1, out]; empty when none
  };

  Parameter<T> w1_a;  ///< hada_w1_a [out, r]
  Parameter<T> w1_b;  ///< hada_w1_b [r, in]
  Parameter<T> w2_a;  ///< hada_w2_a [out, r]
  Parameter<T> w2_b;  ///< hada_w2_b [r, in]

  LohaAdapter(Index in, Index out, const LohaConfig& config, Rng& rng, std::string name = "");

  const LohaConfig& config() const { return config_; }
  const std::string& name() const { return name_; }
  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  int rank() const { return config_.r; }
  /// s = float32(alpha / r) (see the file comment).
  double scaling() const { return config_.scaling(); }

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool training() const { return training_; }

  /// (PEFT file key, model state name, parameter) for hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b.
  bool any_trainable() const { return w1_a.trainable() || w1_b.trainable() || w2_a.trainable() || w2_b.trainable(); }

  std::vector<AdapterTensor<T>> tensors(const std::string& module_path, const std::string& adapter) {
    std::vector<AdapterTensor<T>> v;
    const std::pair<const char*, Parameter<T>*> ps[] = {
        {"hada_w1_a", &w1_a}, {"hada_w1_b", &w1_b}, {"hada_w2_a", &w2_a}, {"hada_w2_b", &w2_b}};
    for (const auto& p : ps)
      v.push_back({peft_file_key(module_path, p.first), peft_model_name(module_path, p.first, adapter), p.second});
    return v;
  }

  /// y += x ΔWᵀ (rows of ΔW masked in training with rank dropout); x [rows, in], y [rows, out].
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
    detail::check_io<T>("LoHa", name_, x, y, in_, out_);
    check_factors();
    cache.rows = x.rows();
    cache.skipped = training_ && detail::draw_module_skip(config_.module_dropout, rng_);
    if (cache.skipped) return;
    cache.x = x;
    if (training_ && config_.rank_dropout > 0.0)
      detail::draw_row_mask<T>(cache.mask, out_, config_.rank_dropout, true, rng_);
    else
      cache.mask.resize(0);
    build_delta();  // dw_ = ΔW   [out, in]
    if (cache.mask.size() > 0) {
      term_.resize(x.rows(), out_);
      term_.noalias() = x * dw_.transpose();                      // x ΔWᵀ   [rows, out]
      y.array() += term_.array().rowwise() * cache.mask.array();  // rows of ΔW ⊙ mask
    } else {
      y.noalias() += x * dw_.transpose();  // y += x ΔWᵀ   [rows, out]
    }
  }

  /// Accumulates the gradients of the trainable factors; adds dX into *dx ([rows, in]) when given.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
    detail::check_grad_io<T>("LoHa", name_, dy, dx, cache.rows, in_, out_);
    if (cache.skipped) return;
    check::shape("LoHa", name_, "cache x", cache.x.rows(), cache.x.cols(), cache.rows, in_);
    check_factors();
    const T s = static_cast<T>(scaling());
    const bool any_grad = w1_a.trainable() || w1_b.trainable() || w2_a.trainable() || w2_b.trainable();
    if (!any_grad && dx == nullptr) return;
    build_delta();  // w1_ = W1, w2_ = W2, dw_ = ΔW from the current factors
    g_.resize(cache.rows, out_);
    if (cache.mask.size() > 0)
      g_.array() = dy.array().rowwise() * cache.mask.array();  // G = dY ⊙ mask   [rows, out]
    else
      g_ = dy;                                     // G = dY   [rows, out]
    if (dx != nullptr) dx->noalias() += g_ * dw_;  // dX += G ΔW   [rows, in]
    if (!any_grad) return;
    d_.resize(out_, in_);
    d_.noalias() = g_.transpose() * cache.x;  // dΔW = Gᵀ x   [out, in]
    e_.resize(out_, in_);
    e_.array() = s * d_.array() * w2_.array();  // dW1 = s · dΔW ⊙ W2   [out, in]
    if (w1_a.trainable()) w1_a.accumulator().noalias() += e_ * w1_b.value.transpose();  // dw1_a = dW1 w1_bᵀ [out, r]
    if (w1_b.trainable()) w1_b.accumulator().noalias() += w1_a.value.transpose() * e_;  // dw1_b = w1_aᵀ dW1 [r, in]
    e_.array() = s * d_.array() * w1_.array();  // dW2 = s · dΔW ⊙ W1   [out, in]
    if (w2_a.trainable()) w2_a.accumulator().noalias() += e_ * w2_b.value.transpose();  // dw2_a = dW2 w2_bᵀ [out, r]
    if (w2_b.trainable()) w2_b.accumulator().noalias() += w2_a.value.transpose() * e_;  // dw2_b = w2_aᵀ dW2 [r, in]
  }

  /// dW = ΔW = s · (w1_a w1_b) ⊙ (w2_a w2_b)  [out, in] (resized if needed).
  void delta(Matrix<T>& dW) const {
    check_factors();
    Matrix<T> w2(out_, in_);
    dW.resize(out_, in_);
    dW.noalias() = w1_a.value * w1_b.value;
    w2.noalias() = w2_a.value * w2_b.value;
    dW.array() = (dW.array() * w2.array()) * static_cast<T>(scaling());
  }

  /// Exact LoRA form at rank r²: B' = w1_a •row w2_a [out, r²], A' = w1_b •col w2_b [r², in], scaling s.
  LoraFactors<T> to_factors() const {
    check_factors();
    LoraFactors<T> f;
    f.B = row_kron<T>(w1_a.value, w2_a.value);
    f.A = col_kron<T>(w1_b.value, w2_b.value);
    f.scaling = scaling();
    f.name = name_;
    return f;
  }

 private:
  void validate() const {
    const char* k = "LoHa";
    if (in_ <= 0 || out_ <= 0)
      throw ShapeError(describe(k, name_) + ": base shape " + shape_str(out_, in_) + " is empty");
    if (config_.r <= 0) throw ConfigError(describe(k, name_) + ": r must be >= 1, got " + std::to_string(config_.r));
    if (!std::isfinite(config_.alpha))
      throw ConfigError(describe(k, name_) + ": alpha must be finite, got " + check::num(config_.alpha));
    check::unit_interval_open(k, name_, "rank_dropout", config_.rank_dropout);
    check::unit_interval_open(k, name_, "module_dropout", config_.module_dropout);
  }

  /// The four factors have the shapes of r and (in, out) (a loader may have replaced them).
  void check_factors() const {
    const Index r = config_.r;
    check::shape("LoHa", name_, "hada_w1_a", w1_a.value.rows(), w1_a.value.cols(), out_, r);
    check::shape("LoHa", name_, "hada_w1_b", w1_b.value.rows(), w1_b.value.cols(), r, in_);
    check::shape("LoHa", name_, "hada_w2_a", w2_a.value.rows(), w2_a.value.cols(), out_, r);
    check::shape("LoHa", name_, "hada_w2_b", w2_b.value.rows(), w2_b.value.cols(), r, in_);
  }

  /// w1_ = W1, w2_ = W2, dw_ = s (W1 ⊙ W2), in buffers reused across calls. Same order of
  /// operations as PEFT: ((w1_a @ w1_b) * (w2_a @ w2_b)) * scale.
  void build_delta() {
    w1_.resize(out_, in_);
    w2_.resize(out_, in_);
    dw_.resize(out_, in_);
    w1_.noalias() = w1_a.value * w1_b.value;  // W1   [out, in]
    w2_.noalias() = w2_a.value * w2_b.value;  // W2   [out, in]
    dw_.array() = (w1_.array() * w2_.array()) * static_cast<T>(scaling());
  }

  LohaConfig config_;
  Index in_ = 0, out_ = 0;
  std::string name_;
  bool training_ = true;  // as Module: train mode until eval()
  Rng rng_;
  // Scratch reused across calls (backward rebuilds what it needs from the parameters).
  Matrix<T> w1_, w2_, dw_, term_, g_, d_, e_;
};

template <class T>
LohaAdapter<T>::LohaAdapter(Index in, Index out, const LohaConfig& config, Rng& rng, std::string name)
    : config_(config), in_(in), out_(out), name_(std::move(name)) {
  validate();
  const int r = config.r;
  w1_a = Parameter<T>(out, r);
  w1_b = Parameter<T>(r, in);
  w2_a = Parameter<T>(out, r);
  w2_b = Parameter<T>(r, in);
  init::kaiming_uniform<T>(w1_a.value, rng);
  init::kaiming_uniform<T>(w1_b.value, rng);
  init::kaiming_uniform<T>(w2_a.value, rng);
  if (config.init_weights)
    w2_b.value.setZero();
  else
    init::kaiming_uniform<T>(w2_b.value, rng);
  rng_.reseed(rng.next_u64());
}

/// The adapter as a kind of adapter for AdaptedLinear::add_adapter (`layer` names the host in messages).
template <class T>
std::unique_ptr<AdapterMethod<T>> make_loha(const std::string& adapter_name, Index in, Index out,
                                            const LohaConfig& config, Rng& rng, const std::string& layer = "") {
  return std::make_unique<KernelMethod<T, LohaAdapter<T>>>(adapter_name, LohaAdapter<T>(in, out, config, rng, layer));
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class LohaAdapter<float>;
extern template class LohaAdapter<double>;
extern template class KernelMethod<float, LohaAdapter<float>>;
extern template class KernelMethod<double, LohaAdapter<double>>;
}  // namespace peft
#endif
