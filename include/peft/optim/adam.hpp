#pragma once
// Adam (Kingma & Ba, 2015, "Adam: A Method for Stochastic Optimization") and AdamW (Loshchilov &
// Hutter, 2019, "Decoupled Weight Decay Regularization"), step for step as torch.optim.Adam and
// torch.optim.AdamW (torch 1.13, single-tensor path, amsgrad off) compute them. With t the
// parameter's own step count (1 on its first update):
//   AdamW only:  θ = θ · (1 − lr·wd)                      decoupled decay, before the moments
//   Adam only:   g = g + wd·θ                             L2 penalty through the gradient (wd ≠ 0)
//   m = β₁·m + (1 − β₁)·g,   v = β₂·v + (1 − β₂)·g²
//   step_size = lr / (1 − β₁ᵗ),   denom = √v / √(1 − β₂ᵗ) + ε
//   θ = θ − step_size · m / denom
// Note ε is added after dividing √v by √(1 − β₂ᵗ), as torch does (not the paper's ε̂ placement).
#include <cmath>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/parallel.hpp"
#include "peft/optim/optimizer.hpp"

namespace peft {

struct AdamOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.0;  ///< L2 through the gradient (torch.optim.Adam)
};

struct AdamWOptions {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0.01;  ///< decoupled (torch.optim.AdamW default)
};

template <class T>
struct AdamState {
  Matrix<T> exp_avg;     ///< m, first moment
  Matrix<T> exp_avg_sq;  ///< v, second moment

  /// Calls fn(field, tensor) for each state tensor, by torch's state-dict name (checkpoints use this).
  template <class F>
  void visit_tensors(F&& fn) {
    fn("exp_avg", exp_avg);
    fn("exp_avg_sq", exp_avg_sq);
  }
};

namespace detail {

template <class T, bool Decoupled>
class AdamImpl : public BasicOptimizer<T, AdamState<T>> {
  using Base = BasicOptimizer<T, AdamState<T>>;

 public:
  using Entry = typename Base::Entry;
  using Group = typename Base::Group;

  double beta1() const { return beta1_; }
  double beta2() const { return beta2_; }
  double eps() const { return eps_; }

 protected:
  AdamImpl(const char* kind, const std::vector<ParamGroup<T>>& groups, double lr, double beta1, double beta2,
           double eps, double weight_decay)
      : Base(kind), beta1_(beta1), beta2_(beta2), eps_(eps) {
    check::non_negative(kind, "", "lr", lr);
    check::non_negative(kind, "", "eps", eps);
    check::unit_interval_open(kind, "", "beta1", beta1);
    check::unit_interval_open(kind, "", "beta2", beta2);
    check::non_negative(kind, "", "weight_decay", weight_decay);
    this->add_groups(groups);
  }

  void init_state(Entry& e) override {
    e.state.exp_avg.setZero(e.param->value.rows(), e.param->value.cols());
    e.state.exp_avg_sq.setZero(e.param->value.rows(), e.param->value.cols());
  }

  void check_state_shape(const Entry& e) const override {
    this->check_state_matrix(e, e.state.exp_avg, "exp_avg");
    this->check_state_matrix(e, e.state.exp_avg_sq, "exp_avg_sq");
  }

  void update(const Group& group, Entry& e) override {
    const double t = static_cast<double>(e.steps);
    // Scalars in double, as torch computes them in Python, then rounded to T once.
    const double bias_correction1 = 1.0 - std::pow(beta1_, t);
    const double bias_correction2 = 1.0 - std::pow(beta2_, t);
    const T step_size = static_cast<T>(group.lr / bias_correction1);
    const T bc2_sqrt = static_cast<T>(std::sqrt(bias_correction2));
    const T b1 = static_cast<T>(beta1_);
    const T b2 = static_cast<T>(beta2_);
    const T one_minus_b1 = static_cast<T>(1.0 - beta1_);
    const T one_minus_b2 = static_cast<T>(1.0 - beta2_);
    const T eps = static_cast<T>(eps_);
    const T decay = static_cast<T>(1.0 - group.lr * group.weight_decay);
    const T wd = static_cast<T>(group.weight_decay);
    // Element-wise: contiguous ranges of the (same-shaped, contiguous) tensors split between threads.
    using Flat = Eigen::Map<Eigen::Array<T, Eigen::Dynamic, 1>>;
    T* const pv = e.param->value.data();
    const T* const pg = e.param->grad.data();
    T* const pm = e.state.exp_avg.data();
    T* const ps = e.state.exp_avg_sq.data();
    parallel_rows(e.param->value.size(), 16.0, [&](Index begin, Index end) {
      const Index k = end - begin;
      Flat theta(pv + begin, k), m(pm + begin, k), v(ps + begin, k);
      const Eigen::Map<const Eigen::Array<T, Eigen::Dynamic, 1>> g(pg + begin, k);
      if (Decoupled) {
        theta *= decay;  // θ ← θ(1 − lr·wd)
        m = b1 * m + one_minus_b1 * g;
        v = b2 * v + one_minus_b2 * g * g;
      } else if (group.weight_decay != 0.0) {
        m = b1 * m + one_minus_b1 * (g + wd * theta);  // g' = g + wd·θ, θ not yet updated
        v = b2 * v + one_minus_b2 * (g + wd * theta).square();
      } else {
        m = b1 * m + one_minus_b1 * g;
        v = b2 * v + one_minus_b2 * g * g;
      }
      theta -= step_size * m / (v.sqrt() / bc2_sqrt + eps);
    });
  }

 private:
  double beta1_;
  double beta2_;
  double eps_;
};

}  // namespace detail

/// Adam with L2 weight decay added to the gradient (torch.optim.Adam). With groups, each group's
/// lr and weight_decay are used; the options' lr and weight_decay serve the single-group constructors.
template <class T>
class Adam : public detail::AdamImpl<T, false> {
 public:
  Adam(const std::vector<ParamGroup<T>>& groups, const AdamOptions& o)
      : detail::AdamImpl<T, false>("Adam", groups, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay) {}
  Adam(std::vector<NamedParameter<T>> params, const AdamOptions& o)
      : Adam(detail::single_group(std::move(params), o.lr, o.weight_decay), o) {}
  /// Every parameter of `module`, watching it (a trainable parameter added later is reported at step()).
  Adam(Module<T>& module, const AdamOptions& o) : Adam(named_parameters(module), o) { this->watch(module); }
  /// Groups taken from `module`, watching it: every trainable parameter of it must be in a group.
  Adam(Module<T>& module, const std::vector<ParamGroup<T>>& groups, const AdamOptions& o) : Adam(groups, o) {
    this->watch(module);
  }
};

/// AdamW: decoupled weight decay θ ← θ(1 − lr·wd) before the Adam update (torch.optim.AdamW).
template <class T>
class AdamW : public detail::AdamImpl<T, true> {
 public:
  AdamW(const std::vector<ParamGroup<T>>& groups, const AdamWOptions& o)
      : detail::AdamImpl<T, true>("AdamW", groups, o.lr, o.beta1, o.beta2, o.eps, o.weight_decay) {}
  AdamW(std::vector<NamedParameter<T>> params, const AdamWOptions& o)
      : AdamW(detail::single_group(std::move(params), o.lr, o.weight_decay), o) {}
  /// Every parameter of `module`, watching it (a trainable parameter added later is reported at step()).
  AdamW(Module<T>& module, const AdamWOptions& o) : AdamW(named_parameters(module), o) { this->watch(module); }
  /// Groups taken from `module`, watching it: every trainable parameter of it must be in a group.
  AdamW(Module<T>& module, const std::vector<ParamGroup<T>>& groups, const AdamWOptions& o) : AdamW(groups, o) {
    this->watch(module);
  }
};

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class BasicOptimizer<float, AdamState<float>>;
extern template class BasicOptimizer<double, AdamState<double>>;
extern template class detail::AdamImpl<float, false>;
extern template class detail::AdamImpl<double, false>;
extern template class detail::AdamImpl<float, true>;
extern template class detail::AdamImpl<double, true>;
extern template class Adam<float>;
extern template class Adam<double>;
extern template class AdamW<float>;
extern template class AdamW<double>;
}  // namespace peft
#endif
