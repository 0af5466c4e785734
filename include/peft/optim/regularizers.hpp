#pragma once
// Regularizers against catastrophic forgetting during fine-tuning. Both add their value to the
// loss (returned) and their gradient into Parameter::grad (call after backward, before step).
//
// L2-SP (Li, Grandvalet & Davoine, 2018, "Explicit Inductive Bias for Transfer Learning with
// Convolutional Networks"): pull the weights towards the pretrained starting point θ₀,
//   R(θ) = λ/2 · Σ_p ‖θ_p − θ₀_p‖²,   ∂R/∂θ_p = λ (θ_p − θ₀_p)
// θ₀ is a snapshot taken at construction.
//
// EWC (Kirkpatrick et al., 2017, "Overcoming catastrophic forgetting in neural networks"):
// anchor each weight in proportion to how much the source task needs it,
//   R(θ) = λ/2 · Σ_p Σ_i F_pi (θ_pi − θ*_pi)²,   ∂R/∂θ_pi = λ F_pi (θ_pi − θ*_pi)
// with the diagonal Fisher estimated empirically as the mean of squared gradients over B batches
// of source data, F = (1/B) Σ_b g_b ⊙ g_b. The caller runs forward/backward on each batch (grads
// zeroed before each) and calls accumulate() after each backward, then finalize(). With batches of
// one example this is the per-example empirical Fisher; larger batches give a cheaper, smaller
// (batch-mean-gradient) estimate. θ* is the snapshot taken at construction (the source optimum).
//
// Values are accumulated in double. Gradients are added only to trainable parameters; a frozen
// parameter still contributes to the value (it is normally at its anchor, contributing 0).
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameters.hpp"

namespace peft {

namespace detail {
inline void check_lambda(const char* kind, double lambda) {
  if (!std::isfinite(lambda) || lambda < 0.0)
    throw ConfigError(std::string(kind) + ": lambda must be finite and >= 0, got " + check::num(lambda));
}

template <class T>
void check_anchor(const char* kind, const NamedParameter<T>& np, const Matrix<T>& anchor) {
  const Matrix<T>& v = np.param->value;
  if (v.rows() != anchor.rows() || v.cols() != anchor.cols())
    throw ShapeError(std::string(kind) + ": parameter \"" + np.name + "\" has shape " + shape_str(v.rows(), v.cols()) +
                     ", its anchor has shape " + shape_str(anchor.rows(), anchor.cols()));
}

/// A trainable parameter's gradient must have the anchor's shape.
template <class T>
void check_grad(const char* kind, const NamedParameter<T>& np, const Matrix<T>& anchor) {
  const Matrix<T>& g = np.param->grad;
  if (g.rows() != anchor.rows() || g.cols() != anchor.cols())
    throw ShapeError(std::string(kind) + ": parameter \"" + np.name + "\" has a gradient of shape " +
                     shape_str(g.rows(), g.cols()) + ", expected " + shape_str(anchor.rows(), anchor.cols()));
}

/// The diagonal quadratic penalty λ/2 Σ F (θ − θ*)² shared by EWC and online EWC (train/continual.hpp).
template <class T>
T fisher_penalty(const char* kind, const std::vector<NamedParameter<T>>& params, const std::vector<Matrix<T>>& anchors,
                 const std::vector<Matrix<T>>& fisher, double lambda) {
  double sum = 0.0;
  for (std::size_t i = 0; i < params.size(); ++i) {
    check_anchor(kind, params[i], anchors[i]);
    sum += static_cast<double>((fisher[i].array() * (params[i].param->value - anchors[i]).array().square()).sum());
  }
  return static_cast<T>(0.5 * lambda * sum);
}

/// Adds λF(θ − θ*) to the gradient of every trainable parameter (shapes checked before anything
/// changes); returns the penalty.
template <class T>
T add_fisher_penalty(const char* kind, const std::vector<NamedParameter<T>>& params,
                     const std::vector<Matrix<T>>& anchors, const std::vector<Matrix<T>>& fisher, double lambda) {
  for (std::size_t i = 0; i < params.size(); ++i) {
    check_anchor(kind, params[i], anchors[i]);
    if (params[i].param->trainable()) check_grad(kind, params[i], anchors[i]);
  }
  const T lam = static_cast<T>(lambda);
  double sum = 0.0;
  for (std::size_t i = 0; i < params.size(); ++i) {
    Parameter<T>& p = *params[i].param;
    sum += static_cast<double>((fisher[i].array() * (p.value - anchors[i]).array().square()).sum());
    if (p.trainable()) p.grad.array() += lam * fisher[i].array() * (p.value - anchors[i]).array();
  }
  return static_cast<T>(0.5 * lambda * sum);
}

template <class T>
void check_params(const char* kind, const std::vector<NamedParameter<T>>& params) {
  if (params.empty()) throw ConfigError(std::string(kind) + ": got no parameters");
  for (const auto& np : params)
    if (np.param == nullptr) throw ConfigError(std::string(kind) + ": parameter \"" + np.name + "\" is null");
}
}  // namespace detail

template <class T>
class L2SP {
 public:
  /// Snapshots θ₀ of every parameter in `params`.
  L2SP(std::vector<NamedParameter<T>> params, double lambda) : params_(std::move(params)), lambda_(lambda) {
    detail::check_lambda("L2SP", lambda_);
    detail::check_params("L2SP", params_);
    anchors_.reserve(params_.size());
    for (const auto& np : params_) anchors_.push_back(np.param->value);
  }

  double lambda() const { return lambda_; }
  void set_lambda(double lambda) {
    detail::check_lambda("L2SP", lambda);
    lambda_ = lambda;
  }

  /// λ/2 Σ ‖θ − θ₀‖².
  T value() const {
    double sum = 0.0;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      detail::check_anchor("L2SP", params_[i], anchors_[i]);
      sum += static_cast<double>((params_[i].param->value - anchors_[i]).squaredNorm());
    }
    return static_cast<T>(0.5 * lambda_ * sum);
  }

  /// Adds λ(θ − θ₀) to the gradient of every trainable parameter; returns value().
  T add_to_gradients() {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      detail::check_anchor("L2SP", params_[i], anchors_[i]);
      if (params_[i].param->trainable()) detail::check_grad("L2SP", params_[i], anchors_[i]);
    }
    const T lam = static_cast<T>(lambda_);
    double sum = 0.0;
    for (std::size_t i = 0; i < params_.size(); ++i) {
      Parameter<T>& p = *params_[i].param;
      sum += static_cast<double>((p.value - anchors_[i]).squaredNorm());
      if (p.trainable()) p.grad.noalias() += lam * (p.value - anchors_[i]);
    }
    return static_cast<T>(0.5 * lambda_ * sum);
  }

  /// θ₀ of the i-th parameter.
  const Matrix<T>& anchor(std::size_t i) const { return anchors_.at(i); }
  const std::vector<NamedParameter<T>>& parameters() const { return params_; }

 private:
  std::vector<NamedParameter<T>> params_;
  std::vector<Matrix<T>> anchors_;
  double lambda_;
};

template <class T>
class EWC {
 public:
  /// Snapshots θ* of every parameter in `params` and starts an empty Fisher estimate.
  EWC(std::vector<NamedParameter<T>> params, double lambda) : params_(std::move(params)), lambda_(lambda) {
    detail::check_lambda("EWC", lambda_);
    detail::check_params("EWC", params_);
    anchors_.reserve(params_.size());
    fisher_.reserve(params_.size());
    for (const auto& np : params_) {
      anchors_.push_back(np.param->value);
      fisher_.push_back(Matrix<T>::Zero(np.param->value.rows(), np.param->value.cols()));
    }
  }

  double lambda() const { return lambda_; }
  void set_lambda(double lambda) {
    detail::check_lambda("EWC", lambda);
    lambda_ = lambda;
  }

  /// F += g ⊙ g for the current gradients (call after each source-batch backward).
  void accumulate() {
    if (finalized_) throw ConfigError("EWC: accumulate() after finalize(); build a new EWC to re-estimate");
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const Parameter<T>& p = *params_[i].param;
      if (!p.trainable())
        throw ConfigError("EWC: parameter \"" + params_[i].name +
                          "\" has no gradient (frozen); every EWC parameter needs one while the Fisher is estimated");
      detail::check_grad("EWC", params_[i], fisher_[i]);
    }
    for (std::size_t i = 0; i < params_.size(); ++i) fisher_[i].array() += params_[i].param->grad.array().square();
    ++batches_;
  }

  /// F ← F / B. Needs at least one accumulate().
  void finalize() {
    if (finalized_) throw ConfigError("EWC: finalize() called twice");
    if (batches_ == 0) throw ConfigError("EWC: finalize() before any accumulate(); the Fisher needs >= 1 batch");
    const T inv = T(1) / static_cast<T>(batches_);
    for (auto& f : fisher_) f *= inv;
    finalized_ = true;
  }

  bool finalized() const { return finalized_; }
  std::int64_t batches() const { return batches_; }

  /// λ/2 Σ F (θ − θ*)².
  T value() const {
    require_finalized("value()");
    return detail::fisher_penalty("EWC", params_, anchors_, fisher_, lambda_);
  }

  /// Adds λF(θ − θ*) to the gradient of every trainable parameter; returns value().
  T add_to_gradients() {
    require_finalized("add_to_gradients()");
    return detail::add_fisher_penalty("EWC", params_, anchors_, fisher_, lambda_);
  }

  /// Diagonal Fisher of the i-th parameter (the running sum before finalize()).
  const Matrix<T>& fisher(std::size_t i) const { return fisher_.at(i); }
  /// θ* of the i-th parameter.
  const Matrix<T>& anchor(std::size_t i) const { return anchors_.at(i); }
  const std::vector<NamedParameter<T>>& parameters() const { return params_; }

 private:
  void require_finalized(const char* what) const {
    if (!finalized_)
      throw ConfigError(std::string("EWC: ") + what + " before finalize(); estimate the Fisher first (" +
                        std::to_string(batches_) + " batches accumulated)");
  }

  std::vector<NamedParameter<T>> params_;
  std::vector<Matrix<T>> anchors_;
  std::vector<Matrix<T>> fisher_;
  double lambda_;
  std::int64_t batches_ = 0;
  bool finalized_ = false;
};

}  // namespace peft
