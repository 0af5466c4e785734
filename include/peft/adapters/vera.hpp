#pragma once
// VeRA: Vector-based Random Matrix Adaptation (Kopiczko, Blankevoort & Asano, ICLR 2024,
// "VeRA: Vector-based Random Matrix Adaptation"), as Hugging Face PEFT 0.21.2 implements it for
// nn.Linear. One pair of frozen random projections is shared by every adapted layer of a model;
// each layer trains two scaling vectors only.
//
//   A_l = vera_A[:, :in]  [r, in],   B_l = vera_B[:out, :]  [out, r]      (frozen, shared)
//   λ_d [r], λ_b [out]                                                    (trainable)
//   forward:  x̃ = dropout(x);  u = x̃ A_lᵀ [rows, r];  v = u ⊙ λ_d;  w = v B_lᵀ [rows, out];
//             y += w ⊙ λ_b                          (no alpha, no scaling factor)
//   ΔW = diag(λ_b) B_l diag(λ_d) A_l  [out, in]      (merge: W += ΔW; unmerge: W −= ΔW)
//   LoRA form (exact, rank r, s = 1): B' = diag(λ_b) B_l,  A' = diag(λ_d) A_l
//
// Init (PEFT, init_weights=true): λ_b = 0, λ_d = d_initial, so the layer starts as the base;
// init_weights=false: λ_b = 1, λ_d ~ N(0, 1).
//
// Ownership of the projections: vera_A [r, in_max] and vera_B [out_max, r] (in_max / out_max over
// all targeted layers) belong to the model, once. Every adapter holds them through a
// std::shared_ptr<const VeraProjections<T>>: they are immutable and frozen, so copies of an
// adapter (or of a whole model) share the same pair without synchronisation, a move just moves
// the pointer, and the pair lives as long as any adapter uses it. Nothing ever writes to them;
// to change the projections, build a new VeraProjections and a new adapter. File keys:
// `base_model.vera_A` / `base_model.vera_B` (model state dict: `base_model.vera_A.<adapter>`).
//
// A file saved with save_projection=false holds no projections: PEFT regenerates them from
// torch's CPU generator, which cannot be reproduced faithfully here; check_vera_file refuses it.
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

/// VeraConfig, with PEFT's option names and defaults.
struct VeraConfig {
  int r = 256;
  double vera_dropout = 0.0;              ///< input dropout, training only
  double d_initial = 0.1;                 ///< initial λ_d (init only)
  bool init_weights = true;               ///< true: λ_b = 0, λ_d = d_initial; false: λ_b = 1, λ_d ~ N(0, 1)
  bool save_projection = true;            ///< false is refused: the projections must be in the file
  std::uint64_t projection_prng_key = 0;  ///< torch seed of PEFT's projections (informational)
  bool fan_in_fan_out = false;            ///< transformers Conv1D only: refused
  std::string bias = "none";              ///< "all" / "vera_only" replace base biases: refused
};

/// The shared frozen projections of a model: A [r, in_max], B [out_max, r].
template <class T>
struct VeraProjections {
  Matrix<T> A;  ///< vera_A [r, in_max]
  Matrix<T> B;  ///< vera_B [out_max, r]

  Index rank() const { return A.rows(); }
  Index in_max() const { return A.cols(); }
  Index out_max() const { return B.rows(); }

  /// Validated shared projections (e.g. read from `base_model.vera_A` / `base_model.vera_B`).
  static std::shared_ptr<const VeraProjections<T>> make(Matrix<T> A, Matrix<T> B) {
    if (A.rows() == 0 || A.cols() == 0 || B.rows() == 0 || A.rows() != B.cols())
      throw ShapeError("VeRA projections: vera_A has shape " + shape_str(A) + " and vera_B has shape " + shape_str(B) +
                       "; expected [r, in_max] and [out_max, r] with r >= 1");
    if (!A.allFinite() || !B.allFinite()) throw NumericError("VeRA projections: vera_A or vera_B contains NaN or Inf");
    auto p = std::make_shared<VeraProjections<T>>();
    p->A = std::move(A);
    p->B = std::move(B);
    return p;
  }

  /// Fresh projections with PEFT's distribution (kaiming-uniform, gain √2, fan_in = dim 1:
  /// A ~ U(±√(6/in_max)), B ~ U(±√(6/r)), A drawn first) but from peft::Rng, not torch's
  /// generator: the values differ from PEFT's, so they must be saved with the adapter.
  static std::shared_ptr<const VeraProjections<T>> generate(Index r, Index in_max, Index out_max, Rng& rng) {
    if (r <= 0 || in_max <= 0 || out_max <= 0)
      throw ConfigError("VeRA projections: r, in_max and out_max must be >= 1, got r=" + std::to_string(r) +
                        ", in_max=" + std::to_string(in_max) + ", out_max=" + std::to_string(out_max));
    Matrix<T> A(r, in_max), B(out_max, r);
    init::kaiming_uniform<T>(A, rng, 0.0);
    init::kaiming_uniform<T>(B, rng, 0.0);
    return make(std::move(A), std::move(B));
  }
};

/// File keys of the shared projections.
inline std::string vera_A_file_key() { return "base_model.vera_A"; }
inline std::string vera_B_file_key() { return "base_model.vera_B"; }

/// Refuses what this library cannot load faithfully: options whose math this library does not compute
/// (fan_in_fan_out, bias != "none") and files without the projections (save_projection=false, or
/// either `base_model.vera_A` / `base_model.vera_B` missing among `tensor_names`). `label` names the
/// adapter directory in messages.
inline void check_vera_file(const VeraConfig& config, const std::vector<std::string>& tensor_names,
                            const std::string& label = "") {
  const std::string who = describe("VeRA adapter", label);
  if (config.fan_in_fan_out)
    throw ConfigError(who + ": fan_in_fan_out=true (transformers Conv1D weights stored [in, out]) is not supported");
  if (config.bias != "none")
    throw ConfigError(who + ": bias=\"" + config.bias +
                      "\" is not supported (the file would replace base biases); only bias=\"none\"");
  const std::string why =
      ": the shared projections vera_A / vera_B are generated by torch's CPU random generator "
      "(torch.Generator().manual_seed(projection_prng_key=" +
      std::to_string(config.projection_prng_key) +
      ")), and PEFT regenerates them on load instead of reading them from the file; their values depend on "
      "torch's Mersenne Twister and uniform_ conversion and on which layers were targeted, so such a file cannot be "
      "loaded faithfully. Save the adapter with save_projection=True";
  if (!config.save_projection) throw ConfigError(who + ": save_projection=false" + why);
  bool has_a = false, has_b = false;
  for (const std::string& n : tensor_names) {
    has_a = has_a || n == vera_A_file_key();
    has_b = has_b || n == vera_B_file_key();
  }
  if (!has_a || !has_b)
    throw ConfigError(who + ": the file has no " + (has_a ? vera_B_file_key() : vera_A_file_key()) +
                      " although save_projection=true" + why);
}

/// One layer's VeRA term on an [out, in] base.
template <class T>
class VeraAdapter {
 public:
  static constexpr const char* kPeftType = "VERA";  ///< Hugging Face PEFT's peft_type
  static constexpr const char* kKind = "VeRA";

  /// What backward needs from one forward.
  struct Cache {
    Index rows = 0;
    Matrix<T> keep;  ///< dropout multiplier (0 or 1/(1−p)) [rows, in]; empty without dropout
    Matrix<T> xd;    ///< dropout(x) [rows, in]; empty without dropout (backward does not need x)
    Matrix<T> u;     ///< x̃ A_lᵀ [rows, r]
  };

  Parameter<T> lambda_b;  ///< vera_lambda_b [out] (stored [1, out])
  Parameter<T> lambda_d;  ///< vera_lambda_d [r] (stored [1, r])

  /// Validates the config and the projections against (in, out) and initializes as PEFT; `rng`
  /// draws λ_d when init_weights=false and seeds the dropout generator.
  VeraAdapter(Index in, Index out, const VeraConfig& config, std::shared_ptr<const VeraProjections<T>> projections,
              Rng& rng, std::string name = "");

  const VeraConfig& config() const { return config_; }
  const std::string& name() const { return name_; }
  Index in_features() const { return in_; }
  Index out_features() const { return out_; }
  Index rank() const { return config_.r; }
  const std::shared_ptr<const VeraProjections<T>>& projections() const { return proj_; }

  /// A_l = vera_A[:, :in]  [r, in] and B_l = vera_B[:out, :]  [out, r]: views into the shared pair.
  Eigen::Block<const Matrix<T>> A_l() const { return proj_->A.block(0, 0, proj_->A.rows(), in_); }
  Eigen::Block<const Matrix<T>> B_l() const { return proj_->B.block(0, 0, out_, proj_->B.cols()); }

  void train(bool on = true) { training_ = on; }
  void eval() { training_ = false; }
  bool training() const { return training_; }

  /// (PEFT file key, model state name, parameter) for the trainable vectors of this layer; the
  /// shared projections are model-level tensors (vera_A_file_key(), vera_B_file_key()).
  bool any_trainable() const { return lambda_b.trainable() || lambda_d.trainable(); }

  std::vector<AdapterTensor<T>> tensors(const std::string& module_path, const std::string& adapter) {
    return {{peft_file_key(module_path, "vera_lambda_b"), peft_model_name(module_path, "vera_lambda_b", adapter),
             &lambda_b, true},
            {peft_file_key(module_path, "vera_lambda_d"), peft_model_name(module_path, "vera_lambda_d", adapter),
             &lambda_d, true}};
  }

  /// y += ((x̃ A_lᵀ) ⊙ λ_d) B_lᵀ ⊙ λ_b;  x [rows, in], y [rows, out] (holds the base output).
  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
    detail::check_io<T>("VeRA", name_, x, y, in_, out_);
    check_vectors();
    cache.rows = x.rows();
    cache.u.resize(x.rows(), rank());
    if (training_ && config_.vera_dropout > 0.0) {
      fill_keep(cache.keep, x.rows(), in_);
      cache.xd.resize(x.rows(), in_);
      cache.xd.array() = x.array() * cache.keep.array();
      cache.u.noalias() = cache.xd * A_l().transpose();  // x̃ A_lᵀ   [rows, r]
    } else {
      cache.keep.resize(0, 0);
      cache.xd.resize(0, 0);
      cache.u.noalias() = x * A_l().transpose();  // x A_lᵀ   [rows, r]
    }
    v_.resize(x.rows(), rank());
    v_.array() = cache.u.array().rowwise() * lambda_d.value.row(0).array();  // v = u ⊙ λ_d   [rows, r]
    w_.resize(x.rows(), out_);
    w_.noalias() = v_ * B_l().transpose();                              // w = v B_lᵀ   [rows, out]
    y.array() += w_.array().rowwise() * lambda_b.value.row(0).array();  // y += w ⊙ λ_b
  }

  /// Accumulates dλ_b, dλ_d (those trainable); adds dX into *dx ([rows, in]) when given.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
    detail::check_grad_io<T>("VeRA", name_, dy, dx, cache.rows, in_, out_);
    check::shape("VeRA", name_, "cache u", cache.u.rows(), cache.u.cols(), cache.rows, rank());
    const bool need_dd = lambda_d.trainable() || dx != nullptr;
    if (lambda_b.trainable()) {
      v_.resize(cache.rows, rank());
      v_.array() = cache.u.array().rowwise() * lambda_d.value.row(0).array();  // v = u ⊙ λ_d   [rows, r]
      w_.resize(cache.rows, out_);
      w_.noalias() = v_ * B_l().transpose();  // w = v B_lᵀ   [rows, out]
      // dλ_b = Σ_rows dY ⊙ w   [1, out]
      lambda_b.accumulator().row(0) += (dy.array() * w_.array()).colwise().sum().matrix();
    }
    if (!need_dd) return;
    gw_.resize(cache.rows, out_);
    gw_.array() = dy.array().rowwise() * lambda_b.value.row(0).array();  // dw = dY ⊙ λ_b   [rows, out]
    dv_.resize(cache.rows, rank());
    dv_.noalias() = gw_ * B_l();  // dv = dw B_l   [rows, r]
    // dλ_d = Σ_rows dv ⊙ u   [1, r]
    if (lambda_d.trainable()) lambda_d.accumulator().row(0) += (dv_.array() * cache.u.array()).colwise().sum().matrix();
    if (dx == nullptr) return;
    dv_.array().rowwise() *= lambda_d.value.row(0).array();  // du = dv ⊙ λ_d   [rows, r]
    if (cache.keep.size() > 0) {
      gx_.resize(cache.rows, in_);
      gx_.noalias() = dv_ * A_l();                      // dx̃ = du A_l   [rows, in]
      dx->array() += gx_.array() * cache.keep.array();  // dX += dx̃ ⊙ keep (dropout backward)
    } else {
      dx->noalias() += dv_ * A_l();  // dX += du A_l   [rows, in]
    }
  }

  /// dW = ΔW = diag(λ_b) B_l diag(λ_d) A_l  [out, in] (resized if needed).
  void delta(Matrix<T>& dW) const {
    check_vectors();
    dW.resize(out_, in_);
    dW.noalias() = (lambda_b.value.row(0).transpose().asDiagonal() * B_l()) *
                   (lambda_d.value.row(0).transpose().asDiagonal() * A_l());
  }

  /// Exact LoRA form at rank r, scaling 1: B' = diag(λ_b) B_l, A' = diag(λ_d) A_l.
  LoraFactors<T> to_factors() const {
    check_vectors();
    LoraFactors<T> f;
    f.A = lambda_d.value.row(0).transpose().asDiagonal() * A_l();
    f.B = lambda_b.value.row(0).transpose().asDiagonal() * B_l();
    f.scaling = 1.0;
    f.name = name_;
    return f;
  }

 private:
  void validate() const {
    const char* k = "VeRA";
    if (config_.r <= 0) throw ConfigError(describe(k, name_) + ": r must be >= 1, got " + std::to_string(config_.r));
    if (in_ <= 0 || out_ <= 0)
      throw ShapeError(describe(k, name_) + ": base shape " + shape_str(out_, in_) + " is empty");
    check::unit_interval_open(k, name_, "vera_dropout", config_.vera_dropout);
    if (!std::isfinite(config_.d_initial))
      throw ConfigError(describe(k, name_) + ": d_initial must be finite, got " + check::num(config_.d_initial));
    check_vera_file(config_, {vera_A_file_key(), vera_B_file_key()}, name_);  // fan_in_fan_out, bias, save_projection
    if (!proj_) throw ConfigError(describe(k, name_) + ": no shared projections given");
    if (proj_->rank() != config_.r)
      throw ShapeError(describe(k, name_) + ": projections have rank " + std::to_string(proj_->rank()) + " (vera_A " +
                       shape_str(proj_->A) + "), config r is " + std::to_string(config_.r));
    if (in_ > proj_->in_max() || out_ > proj_->out_max())
      throw ShapeError(describe(k, name_) + ": base [out, in] = " + shape_str(out_, in_) +
                       " does not fit the shared projections (vera_A " + shape_str(proj_->A) + ", vera_B " +
                       shape_str(proj_->B) + "): need in <= vera_A columns and out <= vera_B rows");
  }

  /// λ_b [1, out] and λ_d [1, r] (a loader may have replaced them).
  void check_vectors() const {
    check::shape("VeRA", name_, "vera_lambda_b", lambda_b.value.rows(), lambda_b.value.cols(), 1, out_);
    check::shape("VeRA", name_, "vera_lambda_d", lambda_d.value.rows(), lambda_d.value.cols(), 1, rank());
  }

  void fill_keep(Matrix<T>& keep, Index rows, Index cols) {
    keep.resize(rows, cols);
    const double p = config_.vera_dropout;
    const T kept = static_cast<T>(1.0 / (1.0 - p));
    for (Index i = 0; i < rows; ++i)
      for (Index j = 0; j < cols; ++j) keep(i, j) = rng_.uniform() < p ? T(0) : kept;
  }

  VeraConfig config_;
  std::shared_ptr<const VeraProjections<T>> proj_;
  Index in_ = 0, out_ = 0;
  std::string name_;
  bool training_ = true;  // as Module: train mode until eval()
  Rng rng_;
  // Scratch reused across calls (no state between forward and backward lives here).
  Matrix<T> v_, w_, gw_, dv_, gx_;
};

template <class T>
VeraAdapter<T>::VeraAdapter(Index in, Index out, const VeraConfig& config,
                            std::shared_ptr<const VeraProjections<T>> projections, Rng& rng, std::string name)
    : config_(config), proj_(std::move(projections)), in_(in), out_(out), name_(std::move(name)) {
  validate();
  lambda_b = Parameter<T>(1, out, true, true);
  lambda_d = Parameter<T>(1, config.r, true, true);
  if (config.init_weights) {
    lambda_b.value.setZero();
    lambda_d.value.setConstant(static_cast<T>(config.d_initial));
  } else {
    lambda_b.value.setOnes();
    init::normal<T>(lambda_d.value, rng, 0.0, 1.0);
  }
  rng_.reseed(rng.next_u64());
}

/// The adapter as a kind of adapter for AdaptedLinear::add_adapter (`layer` names the host in messages).
template <class T>
std::unique_ptr<AdapterMethod<T>> make_vera(const std::string& adapter_name, Index in, Index out,
                                            const VeraConfig& config,
                                            std::shared_ptr<const VeraProjections<T>> projections, Rng& rng,
                                            const std::string& layer = "") {
  return std::make_unique<KernelMethod<T, VeraAdapter<T>>>(
      adapter_name, VeraAdapter<T>(in, out, config, std::move(projections), rng, layer));
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class VeraAdapter<float>;
extern template class VeraAdapter<double>;
extern template class KernelMethod<float, VeraAdapter<float>>;
extern template class KernelMethod<double, VeraAdapter<double>>;
}  // namespace peft
#endif
