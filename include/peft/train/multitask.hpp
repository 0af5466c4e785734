#pragma once
// Multi-task learning over any parameter subset (full weights, adapters, heads): K task losses
// L_1..L_K share parameters θ, and the update combines their gradients g_k = ∇_θ L_k.
//
// Usage, per step: for each task k, zero the gradients, run its forward/backward, call
// capture(k) (copies the subset's gradients into row k of G [K, P]); then combine() writes the
// combined gradient back into Parameter::grad for the optimizer. Buffers are allocated once.
//
//   Summed / weighted:  g = Σ_k w_k g_k.
//   Conflict report:    cos(g_i, g_j) = g_i·g_j / (‖g_i‖‖g_j‖); a pair conflicts when cos < 0.
//   PCGrad (Yu et al., 2020, "Gradient Surgery for Multi-Task Learning", Alg. 1): for each task i,
//     g_i' = g_i, then over the other tasks j in random order: if g_i'·g_j < 0,
//     g_i' ← g_i' − (g_i'·g_j / ‖g_j‖²) g_j  (projected against the original g_j); g = Σ_i w_i g_i'.
//   Uncertainty weighting (Kendall, Gal & Cipolla, 2018, "Multi-Task Learning Using Uncertainty to
//     Weigh Losses", eq. 10 for classification, in the log-variance form s_k = log σ_k² that its
//     implementations train for stability):
//       L = Σ_k exp(−s_k) L_k + s_k,   ∂L/∂s_k = 1 − exp(−s_k) L_k,   ∂L/∂θ = Σ_k exp(−s_k) g_k
//     Eq. 10 itself reads 1/σ² L_k + log σ = exp(−s_k) L_k + s_k / 2, whose optimum is σ_k² = 2 L_k;
//     the form above (most implementations') has σ_k² = L_k. Both weight task k by ∝ 1 / L_k at the
//     stationary point. The s_k are a trainable Parameter [1, K].
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/parameters.hpp"
#include "peft/core/rng.hpp"
#include "peft/optim/regularizers.hpp"

namespace peft {

struct GradientConflicts {
  Matrix<double> cosine;      ///< [K, K] pairwise cosine similarities (1 on the diagonal)
  int pairs = 0;              ///< K(K−1)/2
  int conflicting = 0;        ///< pairs with cosine < 0
  double min_cosine = 1.0;    ///< over pairs
  double mean_cosine = 0.0;   ///< over pairs
  std::vector<double> norms;  ///< ‖g_k‖
};

template <class T>
class MultiTaskGradients {
 public:
  MultiTaskGradients(std::vector<NamedParameter<T>> params, int tasks) : params_(std::move(params)), tasks_(tasks) {
    detail::check_params("MultiTaskGradients", params_);
    if (tasks < 1) throw ConfigError("MultiTaskGradients: needs >= 1 task, got " + std::to_string(tasks));
    Index total = 0;
    for (const auto& np : params_) {
      if (!np.param->trainable())
        throw ConfigError("MultiTaskGradients: parameter \"" + np.name + "\" is frozen; the subset must be trainable");
      total += np.param->value.size();
    }
    g_.setZero(tasks, total);
    proj_.resize(1, total);
    sum_.resize(1, total);
    order_.resize(static_cast<std::size_t>(tasks));
  }

  int tasks() const { return tasks_; }
  Index size() const { return g_.cols(); }
  /// G [K, P]: row k is task k's captured gradient.
  const Matrix<T>& gradients() const { return g_; }

  /// Row k of G ← the subset's current gradients (flattened in parameter order, row-major).
  void capture(int k) {
    check_task(k);
    Index off = 0;
    for (const auto& np : params_) {
      const Matrix<T>& gr = np.param->grad;
      if (gr.rows() != np.param->value.rows() || gr.cols() != np.param->value.cols())
        throw ShapeError("MultiTaskGradients: parameter \"" + np.name + "\" has a gradient of shape " +
                         shape_str(gr.rows(), gr.cols()) + ", expected " +
                         shape_str(np.param->value.rows(), np.param->value.cols()));
      const Index n = gr.size();
      g_.row(k).segment(off, n) = Eigen::Map<const RowVector<T>>(gr.data(), n);
      off += n;
    }
  }

  /// Pairwise cosines of the captured gradients and their conflict statistics.
  GradientConflicts conflicts() const {
    GradientConflicts r;
    conflicts(r);
    return r;
  }

  /// Same, into `r` (its storage reused: no allocation once sized for K tasks). Dot products are
  /// accumulated in double.
  void conflicts(GradientConflicts& r) const {
    if (r.cosine.rows() != tasks_ || r.cosine.cols() != tasks_) r.cosine.resize(tasks_, tasks_);
    r.norms.resize(static_cast<std::size_t>(tasks_));
    for (int i = 0; i < tasks_; ++i) {
      r.norms[static_cast<std::size_t>(i)] = std::sqrt(dot(i, i));
      for (int j = 0; j <= i; ++j) r.cosine(i, j) = r.cosine(j, i) = dot(i, j);  // the Gram matrix first
    }
    r.pairs = 0;
    r.conflicting = 0;
    r.mean_cosine = 0.0;
    r.min_cosine = tasks_ > 1 ? 1.0 : 0.0;
    for (int i = 0; i < tasks_; ++i)
      for (int j = 0; j < tasks_; ++j) {
        const double d = r.norms[static_cast<std::size_t>(i)] * r.norms[static_cast<std::size_t>(j)];
        const double gram = r.cosine(i, j);
        r.cosine(i, j) = d > 0 ? gram / d : (i == j ? 1.0 : 0.0);
        if (j > i) {
          ++r.pairs;
          r.conflicting += r.cosine(i, j) < 0 ? 1 : 0;
          r.min_cosine = std::min(r.min_cosine, r.cosine(i, j));
          r.mean_cosine += r.cosine(i, j);
        }
      }
    if (r.pairs > 0) r.mean_cosine /= r.pairs;
  }

  /// Parameter::grad ← Σ_k w_k g_k (empty weights: all 1).
  void combine_weighted(const std::vector<double>& weights = {}) {
    check_weights(weights);
    sum_.setZero();
    for (int k = 0; k < tasks_; ++k) sum_.noalias() += static_cast<T>(weight(weights, k)) * g_.row(k);
    scatter();
  }

  /// Parameter::grad ← Σ_i w_i g_i' with PCGrad's projections (the other tasks in an order drawn
  /// from `rng` for each i); returns the number of projections made.
  int combine_pcgrad(Rng& rng, const std::vector<double>& weights = {}) {
    check_weights(weights);
    sum_.setZero();
    int projections = 0;
    for (int i = 0; i < tasks_; ++i) {
      proj_ = g_.row(i);
      for (int k = 0; k < tasks_; ++k) order_[static_cast<std::size_t>(k)] = k;
      for (std::size_t k = order_.size(); k > 1; --k)
        std::swap(order_[k - 1], order_[static_cast<std::size_t>(rng.uniform_int(k))]);
      for (int j : order_) {
        if (j == i) continue;
        const double dot = static_cast<double>(proj_.dot(g_.row(j)));
        const double nn = static_cast<double>(g_.row(j).squaredNorm());
        if (dot < 0 && nn > 0) {  // g_i' ← g_i' − (g_i'·g_j / ‖g_j‖²) g_j
          proj_.noalias() -= static_cast<T>(dot / nn) * g_.row(j);
          ++projections;
        }
      }
      sum_.noalias() += static_cast<T>(weight(weights, i)) * proj_;
    }
    scatter();
    return projections;
  }

  const std::vector<NamedParameter<T>>& parameters() const { return params_; }

 private:
  void check_task(int k) const {
    if (k < 0 || k >= tasks_)
      throw ConfigError("MultiTaskGradients: task " + std::to_string(k) + " is outside [0, " + std::to_string(tasks_) +
                        ")");
  }
  void check_weights(const std::vector<double>& w) const {
    if (!w.empty() && static_cast<int>(w.size()) != tasks_)
      throw ConfigError("MultiTaskGradients: " + std::to_string(w.size()) + " weights for " + std::to_string(tasks_) +
                        " tasks");
    for (double v : w)
      if (!std::isfinite(v)) throw ConfigError("MultiTaskGradients: weight " + check::num(v) + " is not finite");
  }
  double dot(int i, int j) const {
    double acc = 0.0;
    for (Index c = 0; c < g_.cols(); ++c) acc += static_cast<double>(g_(i, c)) * static_cast<double>(g_(j, c));
    return acc;
  }
  static double weight(const std::vector<double>& w, int k) { return w.empty() ? 1.0 : w[static_cast<std::size_t>(k)]; }
  void scatter() {
    Index off = 0;
    for (const auto& np : params_) {
      Matrix<T>& gr = np.param->grad;
      const Index n = gr.size();
      Eigen::Map<RowVector<T>>(gr.data(), n) = sum_.segment(off, n);
      off += n;
    }
  }

  std::vector<NamedParameter<T>> params_;
  int tasks_;
  Matrix<T> g_;
  RowVector<T> proj_, sum_;
  std::vector<int> order_;
};

/// Kendall et al.'s task weighting: trainable log-variances s [1, K] (named "log_vars").
template <class T>
class UncertaintyWeighting {
 public:
  explicit UncertaintyWeighting(int tasks) : log_vars(1, tasks, true, true) {
    if (tasks < 1) throw ConfigError("UncertaintyWeighting: needs >= 1 task, got " + std::to_string(tasks));
    log_vars.value.setZero();
    weights_.resize(static_cast<std::size_t>(tasks));
  }

  Parameter<T> log_vars;

  int tasks() const { return static_cast<int>(log_vars.value.cols()); }
  /// w_k = exp(−s_k), the factors of the task gradients.
  const std::vector<double>& weights() {
    for (int k = 0; k < tasks(); ++k)
      weights_[static_cast<std::size_t>(k)] = std::exp(-static_cast<double>(log_vars.value(0, k)));
    return weights_;
  }

  /// L = Σ exp(−s_k) L_k + s_k; accumulates ∂L/∂s_k = 1 − exp(−s_k) L_k into log_vars.grad.
  T loss(const std::vector<double>& task_losses) {
    if (static_cast<int>(task_losses.size()) != tasks())
      throw ConfigError("UncertaintyWeighting: " + std::to_string(task_losses.size()) + " losses for " +
                        std::to_string(tasks()) + " tasks");
    double total = 0.0;
    for (int k = 0; k < tasks(); ++k) {
      const double s = static_cast<double>(log_vars.value(0, k));
      const double l = task_losses[static_cast<std::size_t>(k)];
      if (!std::isfinite(l))
        throw NumericError("UncertaintyWeighting: loss of task " + std::to_string(k) + " is " + check::num(l));
      total += std::exp(-s) * l + s;
      if (log_vars.trainable()) log_vars.grad(0, k) += static_cast<T>(1.0 - std::exp(-s) * l);
    }
    return static_cast<T>(total);
  }

 private:
  std::vector<double> weights_;
};

}  // namespace peft
