#pragma once
// Stochastic gradient descent with momentum, dampening, Nesterov momentum and L2 weight decay,
// step for step as torch.optim.SGD (torch 1.13, single-tensor path) computes it:
//   d   = g + wd·θ                                   (only when wd ≠ 0)
//   buf = d                          on a parameter's first update (no dampening, as torch)
//   buf = μ·buf + (1 − τ)·d          afterwards (τ = dampening)
//   d   = d + μ·buf  (Nesterov)  or  d = buf          (only when μ ≠ 0)
//   θ   = θ − lr·d
// Nesterov (Sutskever et al., 2013, "On the importance of initialization and momentum") requires
// μ > 0 and τ = 0, as in torch.
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/optim/optimizer.hpp"

namespace peft {

struct SGDOptions {
  double lr = 1e-3;
  double momentum = 0.0;
  double dampening = 0.0;
  double weight_decay = 0.0;
  bool nesterov = false;
};

template <class T>
struct SGDState {
  Matrix<T> momentum_buffer;  ///< empty when momentum = 0

  /// Calls fn(field, tensor) for each state tensor, by torch's state-dict name (checkpoints use this).
  template <class F>
  void visit_tensors(F&& fn) {
    fn("momentum_buffer", momentum_buffer);
  }
};

template <class T>
class SGD : public BasicOptimizer<T, SGDState<T>> {
  using Base = BasicOptimizer<T, SGDState<T>>;

 public:
  using Entry = typename Base::Entry;
  using Group = typename Base::Group;

  /// Groups with their own lr and weight decay; momentum, dampening and nesterov from `options`
  /// (whose lr and weight_decay serve only the single-group constructors).
  SGD(const std::vector<ParamGroup<T>>& groups, const SGDOptions& options) : Base("SGD"), options_(options) {
    validate();
    this->add_groups(groups);
  }

  /// One group with every parameter of `params` (frozen ones are skipped until unfrozen).
  SGD(std::vector<NamedParameter<T>> params, const SGDOptions& options)
      : SGD(detail::single_group(std::move(params), options.lr, options.weight_decay), options) {}

  /// One group with every parameter of `module`, frozen ones included; the optimizer watches the
  /// module (a trainable parameter added later is reported at step(), see optimizer.hpp).
  SGD(Module<T>& module, const SGDOptions& options) : SGD(named_parameters(module), options) { this->watch(module); }
  /// Groups taken from `module` (e.g. param_groups_by_rules), watching the module: every trainable
  /// parameter of it must be in a group, now and at every step.
  SGD(Module<T>& module, const std::vector<ParamGroup<T>>& groups, const SGDOptions& options) : SGD(groups, options) {
    this->watch(module);
  }

  const SGDOptions& options() const { return options_; }

 protected:
  void init_state(Entry& e) override {
    if (options_.momentum != 0.0) e.state.momentum_buffer.resize(e.param->value.rows(), e.param->value.cols());
  }

  void check_state_shape(const Entry& e) const override {
    if (options_.momentum != 0.0) this->check_state_matrix(e, e.state.momentum_buffer, "momentum buffer");
  }

  void update(const Group& group, Entry& e) override {
    Eigen::ArrayWrapper<Matrix<T>> theta = e.param->value.array();
    const Eigen::ArrayWrapper<Matrix<T>> g = e.param->grad.array();
    const T lr = static_cast<T>(group.lr);
    const T wd = static_cast<T>(group.weight_decay);
    const bool decay = group.weight_decay != 0.0;
    if (options_.momentum == 0.0) {
      if (decay)
        theta -= lr * (g + wd * theta);  // cwise: each θ_i is read before it is written
      else
        theta -= lr * g;
      return;
    }
    const T mu = static_cast<T>(options_.momentum);
    Eigen::ArrayWrapper<Matrix<T>> buf = e.state.momentum_buffer.array();
    if (e.steps == 1) {
      if (decay)
        buf = g + wd * theta;
      else
        buf = g;
    } else {
      const T keep = static_cast<T>(1.0 - options_.dampening);
      if (decay)
        buf = mu * buf + keep * (g + wd * theta);
      else
        buf = mu * buf + keep * g;
    }
    if (options_.nesterov) {
      if (decay)
        theta -= lr * ((g + wd * theta) + mu * buf);
      else
        theta -= lr * (g + mu * buf);
    } else {
      theta -= lr * buf;
    }
  }

 private:
  void validate() const {
    check::non_negative("SGD", "", "lr", options_.lr);
    check::non_negative("SGD", "", "momentum", options_.momentum);
    check::non_negative("SGD", "", "weight_decay", options_.weight_decay);
    if (!std::isfinite(options_.dampening))
      throw ConfigError("SGD: dampening must be finite, got " + check::num(options_.dampening));
    if (options_.nesterov && (options_.momentum <= 0.0 || options_.dampening != 0.0))
      throw ConfigError("SGD: Nesterov momentum requires momentum > 0 and dampening = 0, got momentum " +
                        check::num(options_.momentum) + " and dampening " + check::num(options_.dampening));
  }

  SGDOptions options_;
};

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class BasicOptimizer<float, SGDState<float>>;
extern template class BasicOptimizer<double, SGDState<double>>;
extern template class SGD<float>;
extern template class SGD<double>;
}  // namespace peft
#endif
