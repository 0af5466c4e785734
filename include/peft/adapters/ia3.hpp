#pragma once
// (IA)³ as a kind of adapter on a linear layer (Liu et al., 2022, "Few-Shot Parameter-Efficient
// Fine-Tuning is Better and Cheaper than In-Context Learning"), as Hugging Face PEFT's IA3 Linear:
//
//   output scaling (is_feedforward = false):  y = (x W₀ᵀ + b₀) ⊙ l      l = ia3_l [out, 1]
//   input scaling  (is_feedforward = true):   y = (x ⊙ l) W₀ᵀ + b₀      l = ia3_l [1, in]
//
// As a term of the host's sum (adapters/method.hpp):
//   output:  t = (l − 1) ⊙ (x W₀ᵀ + b₀)      merge: row gain l − 1, bias gain l − 1
//   input:   t = (x ⊙ (l − 1)) W₀ᵀ           merge: column gain l − 1
// On a host whose base product can take the gain (AdaptedLinear, nothing merged, no adapter reading
// x W₀ᵀ) the input term costs no product of its own: the host multiplies (x ⊙ (1 + Σ (l − 1))) W₀ᵀ
// once, and in backward hands over P = dY W₀ from its own input-gradient product (scales_input).
// With one (IA)³ adapter active this is PEFT's layer exactly. PEFT multiplies the vectors of several
// active (IA)³ adapters (l₁ ⊙ l₂); here independent terms add (l₁ + l₂ − 1), like every method.
//
// Gradients: output: dl = Σ_rows dY ⊙ (x W₀ᵀ + b₀); the input gradient and dW of (l − 1) ⊙ x W₀ᵀ go
// through the host's base GEMMs (add_base_gain). Input: P = dY W₀ [rows, in], dl = Σ_rows x ⊙ P,
// dX += P ⊙ (l − 1), dW += dYᵀ (x ⊙ (l − 1)).
//
// Init: l = 1 (init_ia3_weights = true: the model is unchanged at init, exactly); false keeps
// random values, as PEFT keeps its torch.randn draw: l ~ N(0, 1) (values differ from torch's).
// The parameter is named `ia3_l.<adapter>` below the linear; its PEFT file key is
// `base_model.model.<module>.ia3_l`.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/method.hpp"
#include "peft/core/check.hpp"
#include "peft/core/gemm.hpp"
#include "peft/core/init.hpp"
#include "peft/core/parallel.hpp"

namespace peft {

/// IA3Config for one module (after target_modules / feedforward_modules were resolved).
struct IA3Config {
  bool feedforward = false;      ///< true: scale the input (PEFT's feedforward_modules); false: the output
  bool init_ia3_weights = true;  ///< true: l = 1 (identity); false: l ~ N(0, 1) (tests)
};

template <class T>
class IA3Method final : public AdapterMethod<T> {
 public:
  /// Output scaling stores l as [out, 1], input scaling as [1, in] (PEFT's shapes).
  IA3Method(std::string adapter_name, const IA3Config& config, Index in, Index out, Rng* rng = nullptr)
      : AdapterMethod<T>(std::move(adapter_name)), config_(config) {
    if (in <= 0 || out <= 0)
      throw ShapeError("(IA)^3 adapter \"" + this->name_ + "\": base shape " + shape_str(out, in) + " is empty");
    l = config.feedforward ? Parameter<T>(1, in, true) : Parameter<T>(out, 1, true);
    if (config.init_ia3_weights || rng == nullptr)
      l.value.setOnes();
    else
      init::normal<T>(l.value, *rng, 0.0, 1.0);
  }

  Parameter<T> l;  ///< ia3_l: [out, 1] (output scaling) or [1, in] (input scaling)

  const IA3Config& config() const { return config_; }
  bool feedforward() const { return config_.feedforward; }
  /// l as a [1, n] row (a view; the storage is contiguous in both shapes).
  Eigen::Map<const RowVector<T>> scales() const { return Eigen::Map<const RowVector<T>>(l.value.data(), l.size()); }

  std::unique_ptr<AdapterMethod<T>> clone() const override { return std::make_unique<IA3Method>(*this); }
  const char* peft_type() const override { return "IA3"; }
  const char* kind() const override { return "(IA)^3"; }

  bool needs_base_output(bool) const override { return !config_.feedforward; }
  bool needs_base_weight(bool) const override { return config_.feedforward; }  // (x ⊙ (l − 1)) W₀ᵀ, dY W₀

  bool forward(const TermInput<T>& in, Matrix<T>& y, std::unique_ptr<MethodCache>*) override {
    lm1_ = scales().array() - T(1);  // l − 1
    if (!config_.feedforward) {
      parallel_add_scaled_columns<T>(y, *in.z, lm1_);  // + (l − 1) ⊙ x W₀ᵀ
      if (in.b0 != nullptr) {
        gb_ = (in.b0->row(0).array() * lm1_.array()).matrix();  // (l − 1) ⊙ b₀ [1, out]: no temporary per call
        parallel_add_to_rows<T>(y, gb_);                        // + (l − 1) ⊙ b₀
      }
      return false;
    }
    if (in.input_folded) return true;            // the host's base product ran on x ⊙ (1 + Σ (l − 1)); dl reads x
    parallel_scale_columns<T>(xs_, in.x, lm1_);  // x ⊙ (l − 1)   [rows, in]
    gemm(y, xs_, in.w0->transpose(), T(1), true);  // + (x ⊙ (l − 1)) W₀ᵀ
    return true;                                   // dl = Σ x ⊙ (dY W₀), dW needs x ⊙ (l − 1)
  }

  void add_base_gain(const MethodCache&, BaseGain<T>& gain) const override {
    if (config_.feedforward) return;
    if (!gain.has_z) gain.z.setZero(l.size());
    if (!gain.has_b) gain.b.setZero(l.size());
    gain.has_z = gain.has_b = true;
    gain.z.array() += scales().array() - T(1);
    gain.b.array() += scales().array() - T(1);
  }

  bool scales_input() const override { return config_.feedforward; }
  void add_input_gain(RowVector<T>& gain) const override {
    if (config_.feedforward) gain.array() += scales().array() - T(1);
  }

  void backward(const GradInput<T>& in, const MethodCache&, const ConstMatrixRef<T>& dy, Matrix<T>* dx) override {
    if (config_.feedforward && in.input_folded) {  // the host did dX and dW; P = dY W₀ is its product
      if (l.trainable() && in.p != nullptr)
        add_column_product_sums<T>(*in.x, *in.p, l.accumulator().data());  // dl = Σ_rows x ⊙ P
      return;
    }
    if (!config_.feedforward) {
      if (!l.trainable()) return;
      // dl_j = Σ_rows dY_ij (x W₀ᵀ + b₀)_ij
      add_column_product_sums<T>(dy, *in.z, l.accumulator().data());
      if (in.b0 != nullptr) add_column_sums<T>(dy, l.accumulator().data(), in.b0->data());  // + b₀_j Σ_rows dY_ij
      return;
    }
    lm1_ = scales().array() - T(1);
    if (l.trainable() || dx != nullptr) {
      gemm(p_, dy, *in.w0);  // P = dY W₀   [rows, in] (peft::gemm: kept packing space, no heap per call)
      if (l.trainable()) add_column_product_sums<T>(*in.x, p_, l.accumulator().data());  // dl = Σ_rows x ⊙ P
      if (dx != nullptr) parallel_add_scaled_columns<T>(*dx, p_, lm1_);                  // dX += P ⊙ (l − 1)
    }
    if (in.dw != nullptr) {
      parallel_scale_columns<T>(xs_, *in.x, lm1_);    // x ⊙ (l − 1)
      gemm(*in.dw, dy.transpose(), xs_, T(1), true);  // dW += dYᵀ (x ⊙ (l − 1))   [out, in]
    }
  }

  void merge_record(const Matrix<T>&, const Matrix<T>*, MergeRecord<T>& rec) override {
    if (!scales().allFinite())
      throw NumericError("(IA)^3 adapter \"" + this->name_ + "\": ia3_l contains NaN or Inf; nothing was merged");
    if (config_.feedforward) {
      rec.col_gain = scales().array() - T(1);
    } else {
      rec.row_gain = scales().array() - T(1);
      rec.bias_gain = rec.row_gain;
    }
  }

  void add_delta(const MergeRecord<T>&, T, Matrix<T>&) override {}  // gains only

  void visit_parameters(const typename AdapterMethod<T>::ParameterVisitor& fn) override {
    fn("ia3_l." + this->name_, l);
  }
  bool any_trainable() override { return l.trainable(); }

  std::vector<AdapterTensor<T>> tensors(const std::string& module_path) override {
    return {{peft_file_key(module_path, "ia3_l"), peft_model_name(module_path, "ia3_l", this->name_), &l}};
  }

 private:
  IA3Config config_;
  RowVector<T> lm1_;  ///< l − 1
  Matrix<T> gb_;      ///< (l − 1) ⊙ b₀ [1, out]
  Matrix<T> xs_;      ///< x ⊙ (l − 1) [rows, in] (input scaling)
  Matrix<T> p_;       ///< dY W₀ [rows, in] (input scaling)
};

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class IA3Method<float>;
extern template class IA3Method<double>;
}  // namespace peft
#endif
