#pragma once
// LoRA and DoRA as kinds of adapter (adapters/method.hpp) on a linear layer [out, in]
// (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"; rsLoRA: Kalajdzievski,
// 2023; DoRA: Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation").
//
//   LoRA:  t(x) = s · (x̃ Aᵀ) Bᵀ,   x̃ = dropout(x) = x ⊙ keep,  keep ∈ {0, 1/(1−p)}
//          A [r, in], B [out, r], s = alpha/r, or alpha/√r with rsLoRA
//          backward: dB = s dYᵀ (x̃ Aᵀ),  G = dY B,  dA = s Gᵀ x̃,  dX += s (G A) ⊙ keep
//          merge: D = s·B·A (no gain)
//
//   DoRA (LoraConfig::use_dora), a variant of LoRA as in PEFT's LoraVariant, computed as PEFT does:
//     n = ‖W₀ + s·B·A‖_row  [out]   (the paper's column norm of the [in, out] weight), a constant in
//                                   backward (paper §4.3, PEFT's weight_norm.detach())
//     f = m / n            [out]   m = lora_magnitude_vector, initialised to n (so f = 1 at init)
//     t(x) = (f − 1) ⊙ (x̃ W₀ᵀ) + f ⊙ s (x̃ Aᵀ) Bᵀ      (⊙ scales output columns)
//   Without dropout (x̃ = x) the layer output is the paper's  y = f ⊙ (x W₀ᵀ + s x Aᵀ Bᵀ) + b; the
//   bias is never rescaled, and the (f − 1) ⊙ x W₀ᵀ term's gradients are folded into the host's base
//   GEMMs (add_base_gain). With dropout the base term stays on the undropped x and only the
//   correction uses x̃, exactly as PEFT does. n is computed from the factors without forming B·A:
//     n_j² = ‖W_j‖² + 2s·B_j·(A W_jᵀ) + s²·B_j (A Aᵀ) B_jᵀ.
//   merge: row gain f − 1 and D = f ⊙ s·B·A, f fixed at merge time (on W₀).
//
// Init (as Hugging Face PEFT): A kaiming-uniform(a=√5), B = 0, so the output equals the base
// exactly; "gaussian" draws A ~ N(0, (1/r)²) (PEFT: normal_(std=1/r)); "none" gives both
// nn.Linear's default init. A layer holding only plain LoRA adapters never runs a DoRA path and
// holds no DoRA buffer: DoRA is its own class.
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/method.hpp"
#include "peft/core/check.hpp"
#include "peft/core/gemm.hpp"
#include "peft/core/init.hpp"
#include "peft/core/warnings.hpp"

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
  /// normalizes each output row of W + s·B·A (see lora_linear.hpp).
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

/// Forward state of one LoRA adapter: keep, x̃, x̃ Aᵀ.
template <class T>
struct LoraCache : MethodCache {
  Matrix<T> keep;  ///< dropout multiplier (0 or 1/(1−p)) [rows, in]; empty without dropout
  Matrix<T> xd;    ///< dropout(x) [rows, in]; empty without dropout (x is used)
  Matrix<T> xa;    ///< dropout(x) Aᵀ [rows, r]
  std::unique_ptr<MethodCache> clone() const override { return std::make_unique<LoraCache>(*this); }
};

/// DoRA's forward state: LoRA's plus the norm and scale of this forward.
template <class T>
struct DoraCache : LoraCache<T> {
  RowVector<T> norm;   ///< n = ‖W₀ + s·B·A‖_row [out], the detached norm of this forward
  RowVector<T> scale;  ///< f = m / n [out]
  Matrix<T> xdw;       ///< dropout(x) W₀ᵀ [rows, out], with dropout only
  std::unique_ptr<MethodCache> clone() const override { return std::make_unique<DoraCache>(*this); }
};

/// Checks a LoRA config against an [out, in] base: r ≥ 1, alpha > 0, dropout in [0, 1).
/// r > min(in, out) is legal, as in Hugging Face PEFT: the update s·B·A then has rank at most
/// min(in, out), so the extra rank only costs parameters and compute. It is accepted and reported
/// through the warning sink (core/warnings.hpp).
inline void check_lora_config(const char* kind, const std::string& layer, const LoraConfig& config, Index in,
                              Index out) {
  if (config.r <= 0)
    throw ConfigError(describe(kind, layer) + ": rank r must be >= 1, got " + std::to_string(config.r));
  check::positive(kind, layer, "lora_alpha", config.alpha);
  check::unit_interval_open(kind, layer, "lora_dropout", config.dropout);
  const Index max_rank = std::min(in, out);
  if (config.r > max_rank)
    warn(describe(kind, layer) + ": rank r = " + std::to_string(config.r) + " exceeds min(in, out) = min(" +
         std::to_string(in) + ", " + std::to_string(out) + ") = " + std::to_string(max_rank) +
         "; s·B·A has rank at most " + std::to_string(max_rank) + ", so the extra rank only costs parameters");
}

namespace detail {

/// keep [rows, cols] with entries 0 (probability p) or 1/(1−p), drawn row-major from rng.
template <class T>
void fill_dropout_mask(Matrix<T>& keep, Index rows, Index cols, double p, Rng& rng) {
  keep.resize(rows, cols);
  const T kept = static_cast<T>(1.0 / (1.0 - p));
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) keep(i, j) = rng.uniform() < p ? T(0) : kept;
}

}  // namespace detail

/// A plain LoRA adapter.
template <class T>
class LoraMethod : public AdapterMethod<T> {
 public:
  explicit LoraMethod(LoraAdapter<T> a) : AdapterMethod<T>(a.name), a_(std::move(a)) {}

  /// A fresh adapter [r, in] / [out, r] initialised per config.init, drawing from `rng` (A first,
  /// then B for LoraInit::None).
  static LoraAdapter<T> create(const std::string& adapter_name, const LoraConfig& config, Index in, Index out,
                               Rng& rng) {
    LoraAdapter<T> a{adapter_name, config, Parameter<T>(config.r, in), Parameter<T>(out, config.r)};
    switch (config.init) {
      case LoraInit::KaimingUniform: init::kaiming_uniform<T>(a.A.value, rng); break;
      case LoraInit::Gaussian: init::normal<T>(a.A.value, rng, 0.0, 1.0 / config.r); break;
      case LoraInit::None:
        init::kaiming_uniform<T>(a.A.value, rng);
        init::kaiming_uniform<T>(a.B.value, rng);
        break;
    }
    return a;
  }

  std::unique_ptr<AdapterMethod<T>> clone() const override { return std::make_unique<LoraMethod>(*this); }
  const char* peft_type() const override { return "LORA"; }
  const char* kind() const override { return "LoRA"; }
  Index rank() const override { return a_.rank(); }

  LoraAdapter<T>& adapter() { return a_; }
  const LoraAdapter<T>& adapter() const { return a_; }

  bool forward(const TermInput<T>& in, Matrix<T>& y, std::unique_ptr<MethodCache>* cache) override {
    LoraCache<T>& c = cache != nullptr ? cache_as<LoraCache<T>>(*cache) : scratch_;
    const bool drop = project(in, c);
    gemm(y, c.xa, a_.B.value.transpose(), static_cast<T>(a_.scaling()), true);  // + s (x̃ Aᵀ) Bᵀ   [rows, out]
    return !drop && a_.A.trainable();
  }

  void backward(const GradInput<T>& in, const MethodCache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) override {
    const auto& c = static_cast<const LoraCache<T>&>(cache);
    if (c.keep.size() == 0) require_input(in, dy.rows());
    backward_lora(c, c.keep.size() > 0 ? c.xd : *in.x, dy, dx);
  }

  void add_delta(const MergeRecord<T>&, T sign, Matrix<T>& acc) override {
    acc.noalias() += (sign * static_cast<T>(a_.scaling())) * (a_.B.value * a_.A.value);  // ± s·B·A   [out, in]
  }

  void visit_parameters(const typename AdapterMethod<T>::ParameterVisitor& fn) override {
    fn("lora_A." + a_.name + ".weight", a_.A);
    fn("lora_B." + a_.name + ".weight", a_.B);
  }
  bool any_trainable() override { return a_.A.trainable() || a_.B.trainable(); }

  std::vector<AdapterTensor<T>> tensors(const std::string& module_path) override {
    return {{peft_file_key(module_path, "lora_A.weight"), peft_model_name(module_path, "lora_A", a_.name) + ".weight",
             &a_.A},
            {peft_file_key(module_path, "lora_B.weight"), peft_model_name(module_path, "lora_B", a_.name) + ".weight",
             &a_.B}};
  }

  bool has_factors() const override { return true; }
  LoraFactors<T> to_factors() const override { return LoraFactors<T>{a_.A.value, a_.B.value, a_.scaling(), a_.name}; }

 protected:
  /// keep, x̃ and x̃ Aᵀ into c (a fresh mask from in.rng in train mode with dropout); returns
  /// whether dropout was applied.
  bool project(const TermInput<T>& in, LoraCache<T>& c) {
    const bool drop = in.training && a_.config.dropout > 0.0;
    c.xa.resize(in.x.rows(), a_.rank());
    if (drop) {
      detail::fill_dropout_mask<T>(c.keep, in.x.rows(), in.x.cols(), a_.config.dropout, *in.rng);
      c.xd.resize(in.x.rows(), in.x.cols());
      c.xd.array() = in.x.array() * c.keep.array();
      gemm(c.xa, c.xd, a_.A.value.transpose());  // x̃ Aᵀ   [rows, r]
    } else {
      c.keep.resize(0, 0);
      c.xd.resize(0, 0);
      gemm(c.xa, in.x, a_.A.value.transpose());  // x Aᵀ   [rows, r]
    }
    return drop;
  }

  /// ShapeError unless the cached input is there when A trains on the undropped x (A frozen at
  /// forward and unfrozen before backward leaves no x: caught instead of read).
  void require_input(const GradInput<T>& in, Index rows) const {
    if (a_.A.trainable())
      check::shape("LoRA", a_.name, "cached input (was a parameter unfrozen after forward?)", in.x->rows(),
                   in.x->cols(), rows, a_.A.value.cols());
  }

  /// Backward of s·(x̃ Aᵀ) Bᵀ; `xt` is x̃ (only read when A is trainable).
  void backward_lora(const LoraCache<T>& c, const Matrix<T>& xt, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
    const T s = static_cast<T>(a_.scaling());
    if (a_.B.trainable()) gemm(a_.B.accumulator(), dy.transpose(), c.xa, s, true);  // dB += s dYᵀ (x̃ Aᵀ)   [out, r]
    if (!a_.A.trainable() && dx == nullptr) return;
    g_.resize(dy.rows(), a_.rank());
    gemm(g_, dy, a_.B.value);                                                     // G = dY B   [rows, r]
    if (a_.A.trainable()) gemm(a_.A.accumulator(), g_.transpose(), xt, s, true);  // dA += s Gᵀ x̃   [r, in]
    if (dx == nullptr) return;
    if (c.keep.size() > 0) {
      t_.resize(dy.rows(), a_.A.value.cols());
      gemm(t_, g_, a_.A.value, s);                 // s G A   [rows, in]
      dx->array() += t_.array() * c.keep.array();  // dropout backward: ⊙ keep
    } else {
      gemm(*dx, g_, a_.A.value, s, true);  // dX += s G A   [rows, in]
    }
  }

  LoraAdapter<T> a_;
  LoraCache<T> scratch_;  ///< inference forward's x̃ Aᵀ (no state between calls)
  Matrix<T> g_, t_;       ///< backward scratch: G = dY B [rows, r], s G A [rows, in] (dropout only)
};

/// A DoRA adapter: LoRA plus a magnitude vector (see the file comment).
template <class T>
class DoraMethod final : public LoraMethod<T> {
  using LoraMethod<T>::a_;

 public:
  /// `a` must carry its magnitude [1, out].
  explicit DoraMethod(LoraAdapter<T> a) : LoraMethod<T>(std::move(a)) {}

  std::unique_ptr<AdapterMethod<T>> clone() const override { return std::make_unique<DoraMethod>(*this); }
  const char* kind() const override { return "DoRA"; }

  bool needs_base_output(bool training) const override { return !dropout(training); }
  bool needs_base_weight(bool) const override { return true; }  // ‖W₀ + s·B·A‖_row; D W₀ with dropout

  bool forward(const TermInput<T>& in, Matrix<T>& y, std::unique_ptr<MethodCache>* cache) override {
    DoraCache<T>& c = cache != nullptr ? cache_as<DoraCache<T>>(*cache) : scratch_;
    const bool drop = this->project(in, c);  // keep, x̃, x̃ Aᵀ
    const Index rows = in.x.rows(), out = a_.B.value.rows();
    weight_norm(*in.w0, c.norm);
    c.scale.resize(out);
    c.scale.array() = a_.magnitude.value.row(0).array() / c.norm.array();  // f = m / n   [out]
    if (drop) {
      c.xdw.resize(rows, out);
      c.xdw.noalias() = c.xd * in.w0->transpose();  // z̃ = x̃ W₀ᵀ   [rows, out]
    } else {
      c.xdw.resize(0, 0);
    }
    const Matrix<T>& z = drop ? c.xdw : *in.z;
    // y += f ⊙ (z̃ + s x̃ Aᵀ Bᵀ) − z̃. With B = 0 and m = n this adds exactly zero, so the zero-init
    // output is the base bit for bit.
    u_.resize(rows, out);
    u_.noalias() = static_cast<T>(a_.scaling()) * c.xa * a_.B.value.transpose();  // s x̃ Aᵀ Bᵀ   [rows, out]
    u_ += z;                                                                      // u = z̃ + s x̃ Aᵀ Bᵀ
    y.array() += u_.array().rowwise() * c.scale.array() - z.array();              // + f ⊙ u − z̃
    return !drop && a_.A.trainable();
  }

  void add_base_gain(const MethodCache& cache, BaseGain<T>& gain) const override {
    const auto& c = static_cast<const DoraCache<T>&>(cache);
    if (c.keep.size() > 0) return;  // with dropout the (f − 1) ⊙ x̃ W₀ᵀ term is handled in backward
    if (!gain.has_z) gain.z.setZero(c.scale.size());
    gain.has_z = true;
    gain.z.array() += c.scale.array() - T(1);
  }

  /// Backward of t = (f − 1) ⊙ z̃ + f ⊙ s·(x̃ Aᵀ) Bᵀ with n constant. Without dropout the (f − 1) ⊙ z̃
  /// term went to the host (add_base_gain); with dropout it is handled here.
  void backward(const GradInput<T>& in, const MethodCache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) override {
    const auto& c = static_cast<const DoraCache<T>&>(cache);
    const T s = static_cast<T>(a_.scaling());
    const bool dropped = c.keep.size() > 0;
    if (!dropped) this->require_input(in, dy.rows());
    const Matrix<T>& xt = dropped ? c.xd : *in.x;   // x̃   [rows, in]
    const Matrix<T>& zt = dropped ? c.xdw : *in.z;  // z̃ = x̃ W₀ᵀ   [rows, out]
    const Index out = a_.B.value.rows(), r = a_.rank();

    if (a_.B.trainable() || a_.magnitude.trainable()) {
      p_.resize(out, r);
      p_.noalias() = dy.transpose() * c.xa;  // P = dYᵀ (x̃ Aᵀ)   [out, r]
      if (a_.magnitude.trainable()) {
        // dm_j = Σ_rows dY_ij (z̃_ij + s (x̃ Aᵀ Bᵀ)_ij) / n_j, where Σ_rows dY_ij (x̃ Aᵀ Bᵀ)_ij = B_j · P_j.
        m_.resize(out);
        m_ = (dy.array() * zt.array()).colwise().sum();  // Σ_rows dY ⊙ z̃   [out]
        Matrix<T>& gm = a_.magnitude.accumulator();
        for (Index j = 0; j < out; ++j) gm(0, j) += (m_(j) + s * a_.B.value.row(j).dot(p_.row(j))) / c.norm(j);
      }
      if (a_.B.trainable())  // dB = s diag(f) dYᵀ (x̃ Aᵀ)   [out, r]
        a_.B.accumulator().array() += s * (p_.array().colwise() * c.scale.transpose().array());
    }
    if (!a_.A.trainable() && dx == nullptr && !(dropped && in.dw != nullptr)) return;
    bf_.resize(out, r);
    bf_ = a_.B.value.array().colwise() * c.scale.transpose().array();  // diag(f) B   [out, r]
    this->g_.resize(dy.rows(), r);
    this->g_.noalias() = dy * bf_;  // G = (dY ⊙ f) B   [rows, r]
    if (a_.A.trainable()) a_.A.accumulator().noalias() += s * this->g_.transpose() * xt;  // dA = s Gᵀ x̃   [r, in]
    if (!dropped) {
      if (dx != nullptr) dx->noalias() += s * this->g_ * a_.A.value;  // dX += s G A (the W₀ path went to the host)
      return;
    }
    // Dropout: the (f − 1) ⊙ x̃ W₀ᵀ term, D = dY ⊙ (f − 1)   [rows, out].
    fm1_ = c.scale.array() - T(1);
    d_.resize(dy.rows(), out);
    d_.array() = dy.array().rowwise() * fm1_.array();
    if (in.dw != nullptr) in.dw->noalias() += d_.transpose() * xt;  // dW += Dᵀ x̃   [out, in]
    if (dx != nullptr) {
      this->t_.resize(dy.rows(), in.w0->cols());
      this->t_.noalias() = d_ * *in.w0;                  // D W₀   [rows, in]
      this->t_.noalias() += s * this->g_ * a_.A.value;   // + s G A
      dx->array() += this->t_.array() * c.keep.array();  // dropout backward: ⊙ keep
    }
  }

  bool merge_needs_base() const override { return true; }

  /// f = m / ‖W₀ + s·B·A‖_row fixed now: row gain f − 1, data f. NumericError if f is not finite.
  void merge_record(const Matrix<T>& w0, const Matrix<T>*, MergeRecord<T>& rec) override {
    RowVector<T> n;
    weight_norm(w0, n);
    rec.data = a_.magnitude.value.row(0).array() / n.array();
    if (!rec.data.allFinite())
      throw NumericError("DoRA adapter \"" + a_.name +
                         "\" has a zero or non-finite scale m / ‖W + s·B·A‖ (a zero row norm or a non-finite "
                         "magnitude); nothing was merged");
    rec.row_gain = rec.data.array() - T(1);
  }

  /// acc += sign · f ⊙ s·B·A.
  void add_delta(const MergeRecord<T>& rec, T sign, Matrix<T>& acc) override {
    bf_.resize(a_.B.value.rows(), a_.rank());
    bf_ = a_.B.value.array().colwise() * rec.data.transpose().array();            // diag(f) B   [out, r]
    acc.noalias() += (sign * static_cast<T>(a_.scaling())) * (bf_ * a_.A.value);  // ± f ⊙ s·B·A
  }

  void visit_parameters(const typename AdapterMethod<T>::ParameterVisitor& fn) override {
    LoraMethod<T>::visit_parameters(fn);
    fn("lora_magnitude_vector." + a_.name, a_.magnitude);  // PEFT's state-dict name (without ".weight")
  }
  bool any_trainable() override { return LoraMethod<T>::any_trainable() || a_.magnitude.trainable(); }

  std::vector<AdapterTensor<T>> tensors(const std::string& module_path) override {
    std::vector<AdapterTensor<T>> v = LoraMethod<T>::tensors(module_path);
    v.push_back({peft_file_key(module_path, "lora_magnitude_vector"),
                 peft_model_name(module_path, "lora_magnitude_vector", a_.name), &a_.magnitude});
    return v;
  }

  bool has_factors() const override { return false; }  // the magnitude rescales rows: not s·B·A

  /// n = ‖w + s·B·A‖ per row [out], from the factors and without forming B·A:
  ///   n_j² = ‖w_j‖² + 2s·B_j·(A w_jᵀ) + s²·B_j (A Aᵀ) B_jᵀ,
  /// using w Aᵀ [out, r] and A Aᵀ [r, r] (O(out·in·r + in·r²) flops, O(out·r) memory).
  void weight_norm(const Matrix<T>& w, RowVector<T>& n) {
    const Index out = w.rows(), r = a_.rank();
    const T s = static_cast<T>(a_.scaling());
    wa_.resize(out, r);
    wa_.noalias() = w * a_.A.value.transpose();  // w Aᵀ   [out, r]: row j is A w_jᵀ
    aa_.resize(r, r);
    aa_.noalias() = a_.A.value * a_.A.value.transpose();  // A Aᵀ   [r, r]
    bq_.resize(out, r);
    bq_.noalias() = a_.B.value * aa_;  // B (A Aᵀ)   [out, r]
    n.resize(out);
    for (Index j = 0; j < out; ++j) {
      const T sq = w.row(j).squaredNorm() + T(2) * s * a_.B.value.row(j).dot(wa_.row(j)) +
                   s * s * a_.B.value.row(j).dot(bq_.row(j));
      n(j) = std::sqrt(std::max(sq, T(0)));  // rounding can push an exact zero slightly below 0
    }
  }

 private:
  bool dropout(bool training) const { return training && a_.config.dropout > 0.0; }

  DoraCache<T> scratch_;  ///< inference forward's state
  Matrix<T> u_;           ///< forward z̃ + s x̃ Aᵀ Bᵀ [rows, out]
  Matrix<T> p_;           ///< backward dYᵀ x̃Aᵀ [out, r]
  Matrix<T> bf_;          ///< diag(f) B [out, r]
  Matrix<T> d_;           ///< backward dY ⊙ (f − 1) [rows, out] (dropout only)
  Matrix<T> wa_, aa_, bq_;
  RowVector<T> m_, fm1_;
};

/// A LoRA or DoRA adapter per config (DoRA's magnitude initialised to ‖w0 + s·B·A‖_row, so the
/// adapter starts as plain LoRA, as PEFT's DoraLinearLayer.update_layer). `layer` names the host in
/// messages.
template <class T>
std::unique_ptr<LoraMethod<T>> make_lora(const std::string& adapter_name, const LoraConfig& config, const Matrix<T>& w0,
                                         Rng& rng, const char* kind = "LoRALinear", const std::string& layer = "") {
  const Index out = w0.rows(), in = w0.cols();
  check_lora_config(kind, layer, config, in, out);
  LoraAdapter<T> a = LoraMethod<T>::create(adapter_name, config, in, out, rng);
  if (!config.use_dora) return std::make_unique<LoraMethod<T>>(std::move(a));
  a.magnitude = Parameter<T>(1, out, true, true);
  auto d = std::make_unique<DoraMethod<T>>(std::move(a));
  RowVector<T> n;
  d->weight_norm(w0, n);
  d->adapter().magnitude.value = n;
  return d;
}

/// A plain LoRA adapter for an [out, in] base that the caller does not hold densely (an NF4 base):
/// DoRA needs W₀ (use the overload above).
template <class T>
std::unique_ptr<LoraMethod<T>> make_lora(const std::string& adapter_name, const LoraConfig& config, Index in, Index out,
                                         Rng& rng, const char* kind = "LoRALinear", const std::string& layer = "") {
  if (config.use_dora)
    throw ConfigError(describe(kind, layer) + ": DoRA adapter \"" + adapter_name +
                      "\" needs the base weight W₀ (its magnitude starts at ‖W₀ + s·B·A‖_row)");
  check_lora_config(kind, layer, config, in, out);
  return std::make_unique<LoraMethod<T>>(LoraMethod<T>::create(adapter_name, config, in, out, rng));
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class LoraMethod<float>;
extern template class LoraMethod<double>;
extern template class DoraMethod<float>;
extern template class DoraMethod<double>;
}  // namespace peft
#endif
