#pragma once
// Gradient-based meta-learning over any subset θ of a model's parameters (full weights, only the
// LoRA adapters, only a head): MAML, first-order MAML and Reptile.
//
// A task 𝒯 has a support loss L_s and a query loss L_q. Its inner loop adapts θ on the support set,
//   θ₀ = θ,   θ_{i+1} = θ_i − α ∇L_s(θ_i)   (i < k; SGD, or any optimizer for the first-order forms)
// and the meta-objective is L_q(θ_k) averaged over a batch of tasks.
// - MAML (Finn et al., 2017, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks"):
//   ∇_θ L_q(θ_k) = (I − αH₀)(I − αH₁)…(I − αH_{k−1}) ∇L_q(θ_k),  H_i = ∇²L_s(θ_i),
//   computed backwards: g ← ∇L_q(θ_k); for i = k−1 … 0: g ← g − α H_i g.
//   There is no autograd here: each Hessian-vector product is a central difference of the exact
//   manual gradient,  H v ≈ (∇L_s(θ + εv) − ∇L_s(θ − εv)) / 2ε,  with
//   ε = ∛(machine ε of T) · (1 + ‖θ‖_∞) / ‖v‖_∞  (the step that balances the O(ε²) truncation error
//   against the O(u/ε) rounding error, scaled so the perturbation is relative to θ), error O(ε²).
//   This second-order form is for the plain SGD inner loop written above (learning rate α, no
//   momentum or weight decay); with any other inner optimizer use the first-order forms below.
//   Cost per task: k + 1 gradients for the forward pass, 2k for the products.
// - First-order MAML (same paper, §5.2): drop the Hessians, meta-gradient ∇L_q(θ_k); the inner loop
//   may use any optimizer of the library (SGD with momentum, Adam, …).
// - Reptile (Nichol, Achiam & Schulman, 2018, "On First-Order Meta-Learning Algorithms"): no query
//   loss; meta-gradient θ − θ_k after k inner steps on the support loss with any optimizer, so an
//   outer SGD step of size β is θ ← θ + β(θ_k − θ); another outer optimizer (Adam) may take it too.
// The outer optimizer (any of the library's) steps θ with the mean meta-gradient of the tasks added
// since the last outer_step().
//
// The model stays the caller's: a task is a callable `T loss(MetaSplit split)` that runs forward and
// backward on the split's data at the parameters' current values, *accumulates* (+=) the gradient into
// Parameter::grad, as every backward of the library does, and returns the loss. It must be
// deterministic (dropout off): the products difference two of its gradients. The learner zeroes the
// subset's gradients before each call. Parameters outside the subset should be frozen (their
// gradients would accumulate, unread); the inner and outer optimizers must be built over exactly the
// subset. After a task the subset's values are restored to θ exactly. The learner's buffers are sized
// on the first task; later tasks allocate nothing in the learner.
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameters.hpp"
#include "peft/core/types.hpp"
#include "peft/optim/optimizer.hpp"

namespace peft {

/// Which data of a task a loss call runs on.
enum class MetaSplit { support, query };

template <class T>
class MetaLearner {
 public:
  using Flat = ColVector<T>;

  /// Meta-learns the parameters `params` (all trainable, distinct) with the outer optimizer
  /// `outer`, which must hold exactly these parameters and outlive the learner.
  MetaLearner(std::vector<NamedParameter<T>> params, Optimizer<T>& outer) : MetaLearner(std::move(params)) {
    outer_ = &outer;
  }
  /// Without an outer optimizer: for adapt() / restore() and the per-task gradients only (evaluating
  /// a fine-tuning baseline, or a meta-learned initialisation, episode by episode).
  explicit MetaLearner(std::vector<NamedParameter<T>> params) : params_(std::move(params)) {
    if (params_.empty()) throw ConfigError("MetaLearner: got no parameters to meta-learn");
    for (std::size_t i = 0; i < params_.size(); ++i) {
      const NamedParameter<T>& p = params_[i];
      if (p.param == nullptr) throw ConfigError("MetaLearner: parameter \"" + p.name + "\" is null");
      if (!p.param->trainable())
        throw ConfigError("MetaLearner: parameter \"" + p.name +
                          "\" is frozen, expected every meta-learned parameter trainable");
      for (std::size_t j = 0; j < i; ++j)
        if (params_[j].param == p.param)
          throw ConfigError("MetaLearner: parameter \"" + p.name + "\" is listed twice (also as \"" + params_[j].name +
                            "\")");
      size_ += p.param->value.size();
    }
    meta_grad_.setZero(size_);
  }

  /// Number of scalars meta-learned.
  Index size() const { return size_; }
  const std::vector<NamedParameter<T>>& parameters() const { return params_; }
  /// Tasks added since the last outer_step().
  Index pending_tasks() const { return pending_; }

  // ---- one task's meta-gradient (θ restored afterwards) ----

  /// Second-order MAML meta-gradient of one task into `g` [size()] for k = `steps` SGD inner steps
  /// of learning rate `inner_lr`; returns the query loss L_q(θ_k).
  template <class LossFn>
  T maml_gradient(LossFn&& loss, double inner_lr, int steps, Flat& g);
  /// First-order MAML: ∇L_q(θ_k) after `steps` steps of `inner` (reset first); returns L_q(θ_k).
  template <class LossFn>
  T fomaml_gradient(LossFn&& loss, Optimizer<T>& inner, int steps, Flat& g);
  /// Reptile: θ − θ_k after `steps` steps of `inner` on the support loss (reset first); returns the
  /// last support loss.
  template <class LossFn>
  T reptile_gradient(LossFn&& loss, Optimizer<T>& inner, int steps, Flat& g);

  // ---- meta-training: add tasks, then take an outer step ----

  template <class LossFn>
  T add_maml_task(LossFn&& loss, double inner_lr, int steps) {
    const T l = maml_gradient(loss, inner_lr, steps, task_grad_);
    accumulate();
    return l;
  }
  template <class LossFn>
  T add_fomaml_task(LossFn&& loss, Optimizer<T>& inner, int steps) {
    const T l = fomaml_gradient(loss, inner, steps, task_grad_);
    accumulate();
    return l;
  }
  template <class LossFn>
  T add_reptile_task(LossFn&& loss, Optimizer<T>& inner, int steps) {
    const T l = reptile_gradient(loss, inner, steps, task_grad_);
    accumulate();
    return l;
  }

  /// Writes the mean meta-gradient of the pending tasks into the parameters' gradients and steps the
  /// outer optimizer.
  void outer_step() {
    if (outer_ == nullptr) throw ConfigError("MetaLearner: outer_step() on a learner built without an outer optimizer");
    if (pending_ == 0) throw ConfigError("MetaLearner: outer_step() with no task added since the last one");
    task_grad_ = meta_grad_ / static_cast<T>(pending_);
    scatter_grad(task_grad_);
    outer_->step();
    meta_grad_.setZero();
    pending_ = 0;
  }

  // ---- meta-testing: adapt to a task, evaluate, restore ----

  /// Keeps θ, then runs `steps` steps of `inner` (reset first) on the support loss, leaving the
  /// parameters adapted; returns the last support loss. restore() puts θ back.
  template <class LossFn>
  T adapt(LossFn&& loss, Optimizer<T>& inner, int steps) {
    check_steps(steps, "adapt");
    gather_values(saved_);
    has_saved_ = true;
    return run_inner(loss, inner, steps);
  }
  /// The same with MAML's plain SGD inner loop of learning rate `inner_lr`.
  template <class LossFn>
  T adapt_sgd(LossFn&& loss, double inner_lr, int steps) {
    check_steps(steps, "adapt_sgd");
    gather_values(saved_);
    has_saved_ = true;
    T l = T(0);
    for (int i = 0; i < steps; ++i) {
      l = gradient_at(loss, MetaSplit::support, grad_);
      gather_values(work_);
      work_.noalias() -= static_cast<T>(inner_lr) * grad_;
      scatter_values(work_);
    }
    return l;
  }
  /// Puts back the values adapt() kept.
  void restore() {
    if (!has_saved_) throw ConfigError("MetaLearner: restore() without a preceding adapt()");
    scatter_values(saved_);
    has_saved_ = false;
  }

  /// H v for the support loss at the current values, by central differences of its gradient (see the
  /// top of this file); the values are restored exactly. H v = 0 when v = 0.
  template <class LossFn>
  void hessian_vector_product(LossFn&& loss, const Flat& v, Flat& hv) {
    check_flat(v, "hessian_vector_product: v");
    gather_values(hvp_theta_);
    hvp_at(loss, hvp_theta_, v, hv);
    scatter_values(hvp_theta_);
  }

  // ---- flat views of the subset, in parameter order, each row-major ----

  void gather_values(Flat& out) const {
    out.resize(size_);
    Index o = 0;
    for (const NamedParameter<T>& p : params_) {
      const Matrix<T>& m = p.param->value;
      out.segment(o, m.size()) = Eigen::Map<const Flat>(m.data(), m.size());
      o += m.size();
    }
  }
  void scatter_values(const Flat& in) {
    Index o = 0;
    for (NamedParameter<T>& p : params_) {
      Matrix<T>& m = p.param->value;
      Eigen::Map<Flat>(m.data(), m.size()) = in.segment(o, m.size());
      o += m.size();
    }
  }
  void gather_grad(Flat& out) const {
    out.resize(size_);
    Index o = 0;
    for (const NamedParameter<T>& p : params_) {
      const Matrix<T>& m = p.param->grad;
      out.segment(o, m.size()) = Eigen::Map<const Flat>(m.data(), m.size());
      o += m.size();
    }
  }
  void scatter_grad(const Flat& in) {
    Index o = 0;
    for (NamedParameter<T>& p : params_) {
      Matrix<T>& m = p.param->grad;
      Eigen::Map<Flat>(m.data(), m.size()) = in.segment(o, m.size());
      o += m.size();
    }
  }
  void zero_grad() {
    for (NamedParameter<T>& p : params_) p.param->grad.setZero();
  }

 private:
  void check_shapes() const {
    for (const NamedParameter<T>& p : params_) {
      const Parameter<T>& q = *p.param;
      if (!q.trainable() || q.grad.rows() != q.value.rows() || q.grad.cols() != q.value.cols())
        throw ConfigError("MetaLearner: parameter \"" + p.name +
                          "\" was frozen or resized after the learner was built");
    }
    Index n = 0;
    for (const NamedParameter<T>& p : params_) n += p.param->value.size();
    if (n != size_)
      throw ShapeError("MetaLearner: the parameters hold " + std::to_string(n) + " values, expected " +
                       std::to_string(size_));
  }
  void check_steps(int steps, const char* who) const {
    if (steps < 0)
      throw ConfigError(std::string("MetaLearner::") + who + ": inner steps must be >= 0, got " +
                        std::to_string(steps));
    check_shapes();
  }
  void check_flat(const Flat& v, const char* who) const {
    if (v.size() != size_)
      throw ShapeError(std::string("MetaLearner::") + who + " has " + std::to_string(v.size()) + " values, expected " +
                       std::to_string(size_));
  }

  template <class LossFn>
  T gradient_at(LossFn& loss, MetaSplit split, Flat& g) {
    zero_grad();
    const T l = loss(split);
    gather_grad(g);
    return l;
  }

  /// `steps` steps of `inner` on the support loss from the current values; returns the last loss.
  template <class LossFn>
  T run_inner(LossFn& loss, Optimizer<T>& inner, int steps) {
    inner.reset_state();
    T l = T(0);
    for (int i = 0; i < steps; ++i) {
      zero_grad();
      l = loss(MetaSplit::support);
      inner.step();
    }
    return l;
  }

  /// H v at values θ (left perturbed; the caller restores).
  template <class LossFn>
  void hvp_at(LossFn& loss, const Flat& theta, const Flat& v, Flat& hv) {
    const double vmax = static_cast<double>(v.cwiseAbs().maxCoeff());
    if (vmax == 0.0) {
      hv.setZero(size_);
      return;
    }
    const double tmax = static_cast<double>(theta.cwiseAbs().maxCoeff());
    const double eps = std::cbrt(static_cast<double>(std::numeric_limits<T>::epsilon())) * (1.0 + tmax) / vmax;
    const T e = static_cast<T>(eps);
    work_ = theta + e * v;
    scatter_values(work_);
    gradient_at(loss, MetaSplit::support, grad_plus_);
    work_ = theta - e * v;
    scatter_values(work_);
    gradient_at(loss, MetaSplit::support, hv);
    // H v = (∇L(θ + εv) − ∇L(θ − εv)) / 2ε; the step actually taken is (θ+εv) − (θ−εv) in T, which
    // equals 2ε up to rounding of θ ± εv: divide by 2e, e = ε rounded to T.
    hv = (grad_plus_ - hv) / (T(2) * e);
  }

  void accumulate() {
    meta_grad_ += task_grad_;
    ++pending_;
  }

  std::vector<NamedParameter<T>> params_;
  Optimizer<T>* outer_ = nullptr;
  Index size_ = 0;
  Index pending_ = 0;
  bool has_saved_ = false;
  Flat meta_grad_, task_grad_, saved_, theta0_, work_, grad_, grad_plus_, hv_, hvp_theta_;
  std::vector<Flat> trajectory_;  ///< θ_0 … θ_{k−1} of the current second-order task
};

// ---- members defined outside the class body ----

template <class T>
template <class LossFn>
T MetaLearner<T>::maml_gradient(LossFn&& loss, double inner_lr, int steps, Flat& g) {
  check_steps(steps, "maml_gradient");
  if (!std::isfinite(inner_lr) || inner_lr < 0.0)
    throw ConfigError("MetaLearner::maml_gradient: inner_lr must be finite and >= 0, got " + check::num(inner_lr));
  const T a = static_cast<T>(inner_lr);
  if (static_cast<int>(trajectory_.size()) < steps) trajectory_.resize(static_cast<std::size_t>(steps));
  gather_values(theta0_);
  // Forward: θ_{i+1} = θ_i − α ∇L_s(θ_i), keeping θ_0 … θ_{k−1}.
  work_ = theta0_;
  for (int i = 0; i < steps; ++i) {
    Flat& ti = trajectory_[static_cast<std::size_t>(i)];
    ti = work_;
    gradient_at(loss, MetaSplit::support, grad_);
    work_ = ti - a * grad_;
    scatter_values(work_);
  }
  // g = ∇L_q(θ_k), then g ← (I − αH_i) g for i = k−1 … 0.
  const T lq = gradient_at(loss, MetaSplit::query, g);
  for (int i = steps - 1; i >= 0; --i) {
    hvp_at(loss, trajectory_[static_cast<std::size_t>(i)], g, hv_);
    g.noalias() -= a * hv_;
  }
  scatter_values(theta0_);
  return lq;
}

template <class T>
template <class LossFn>
T MetaLearner<T>::fomaml_gradient(LossFn&& loss, Optimizer<T>& inner, int steps, Flat& g) {
  check_steps(steps, "fomaml_gradient");
  gather_values(theta0_);
  run_inner(loss, inner, steps);
  const T lq = gradient_at(loss, MetaSplit::query, g);  // ∇L_q(θ_k)
  scatter_values(theta0_);
  return lq;
}

template <class T>
template <class LossFn>
T MetaLearner<T>::reptile_gradient(LossFn&& loss, Optimizer<T>& inner, int steps, Flat& g) {
  check_steps(steps, "reptile_gradient");
  gather_values(theta0_);
  const T ls = run_inner(loss, inner, steps);
  gather_values(work_);
  g = theta0_ - work_;  // θ − θ_k
  scatter_values(theta0_);
  return ls;
}

}  // namespace peft
