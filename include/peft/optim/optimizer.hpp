#pragma once
// Optimizer skeleton shared by SGD, Adam and AdamW: parameter groups, per-parameter state stored
// next to the parameter it belongs to, lazily created, and the torch.optim step semantics.
//
// Lessons taken from ensmallen and from two header-only libraries that got Adam wrong:
// - Hyper-parameters live in plain options structs (SGDOptions, AdamOptions, ...), separate from
//   state. Each group carries its own lr and weight decay (discriminative learning rates).
// - State (momentum buffer, moments) is created on the first step() in which its parameter is
//   trainable, with the parameter's shape. A parameter that is frozen is skipped and never gets
//   state; when it is unfrozen later (gradual unfreezing) its state is created on that step.
//   State is never keyed by a raw pointer in a map: it sits in the group entry of its parameter.
// - The step count is per parameter and advances once per step() in which that parameter is
//   updated, exactly as torch.optim keeps state["step"]: a parameter that joins late starts its own
//   bias correction at 1 (tiny-dnn and MiniDNN advance one shared counter per tensor instead).
// - Parameters are referenced by pointer (NamedParameter): the module that owns them must outlive
//   the optimizer and must not be moved while the optimizer is in use.
// - Nothing trainable is skipped silently. Building an optimizer with no trainable parameter is a
//   ConfigError (torch: "optimizer got an empty parameter list"). An optimizer built from a module
//   (or given one with watch()) keeps watching it: step() and zero_grad() check, before touching
//   any parameter, that every trainable parameter of the module is in the optimizer and that every
//   parameter it took from the module is still there under the same name. So an adapter added (or
//   a parameter unfrozen) after the optimizer was built, or an adapter deleted, is a ConfigError
//   telling the user to rebuild the optimizer or to call add_param_group, instead of a parameter
//   that never trains or a dangling pointer. The check walks the module only when
//   peft::parameter_epoch() (core/parameter.hpp) moved since the last one, i.e. after parameters
//   were created, destroyed or (un)frozen; a training loop's steps cost one atomic load and
//   allocate nothing. An optimizer built from groups or a parameter list without a module checks
//   nothing: the caller chose its parameters.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parameters.hpp"

namespace peft {

/// A set of parameters sharing a learning rate and a weight decay. Frozen parameters may be
/// listed: they are skipped until they become trainable.
template <class T>
struct ParamGroup {
  std::vector<NamedParameter<T>> params;
  double lr = 1e-3;
  double weight_decay = 0.0;
  std::string name;
};

/// The interface a training loop, a schedule or a checkpoint writer needs, independent of the
/// update rule.
template <class T>
class Optimizer {
 public:
  virtual ~Optimizer() = default;

  /// Applies one update to every trainable parameter (reads Parameter::grad, writes value).
  virtual void step() = 0;
  /// Zeroes the gradients of every trainable parameter in every group.
  virtual void zero_grad() = 0;
  /// Forgets every parameter's state and step count, as a freshly built optimizer over the same
  /// groups (torch: a new optimizer); the state tensors keep their memory and are re-initialised on
  /// the next step(). Meta-learning's inner loops start each task this way (meta/maml.hpp).
  virtual void reset_state() = 0;

  virtual std::size_t num_groups() const = 0;
  virtual const std::string& group_name(std::size_t group) const = 0;
  /// Current learning rate of a group (what the next step() uses).
  virtual double lr(std::size_t group) const = 0;
  virtual void set_lr(std::size_t group, double lr) = 0;
  /// The learning rate the group was created with; schedules scale this one.
  virtual double initial_lr(std::size_t group) const = 0;
  virtual double weight_decay(std::size_t group) const = 0;
  virtual void set_weight_decay(std::size_t group, double weight_decay) = 0;

  /// Sets the same learning rate on every group.
  void set_lr(double lr) {
    for (std::size_t g = 0; g < num_groups(); ++g) set_lr(g, lr);
  }

  /// Index of the group called `name`; ConfigError when there is none.
  std::size_t group_index(const std::string& name) const {
    for (std::size_t g = 0; g < num_groups(); ++g)
      if (group_name(g) == name) return g;
    std::string known;
    for (std::size_t g = 0; g < num_groups(); ++g) known += (known.empty() ? "\"" : ", \"") + group_name(g) + "\"";
    throw ConfigError("optimizer: no parameter group named \"" + name + "\"; groups are " + known);
  }
};

/// Groups of entries {parameter, state, step count}; the derived class supplies the state type
/// and the update rule. A State lists its own tensors with `visit_tensors(fn)`, fn(field, Matrix<T>&)
/// by torch's state-dict field names: that is how checkpoints save and restore any optimizer.
template <class T, class State>
class BasicOptimizer : public Optimizer<T> {
 public:
  struct Entry {
    std::string name;
    Parameter<T>* param = nullptr;
    State state{};
    std::int64_t steps = 0;  ///< torch's state["step"]: updates applied to this parameter so far
    bool has_state = false;
    bool from_module = false;  ///< found in the watched module at a check (then it must stay there)
  };

  struct Group {
    std::string name;
    double lr = 0.0;
    double initial_lr = 0.0;
    double weight_decay = 0.0;
    std::vector<Entry> entries;
  };

  void step() override {
    check_watched();
    // Validate every parameter first, so that a bad shape leaves all parameters untouched
    // rather than half of them stepped.
    for (const Group& group : groups_) {
      for (const Entry& e : group.entries) {
        const Parameter<T>& p = *e.param;
        if (!p.trainable()) continue;
        if (p.grad.rows() != p.value.rows() || p.grad.cols() != p.value.cols())
          throw ShapeError(std::string(kind_) + ": parameter \"" + e.name + "\" has gradient of shape " +
                           shape_str(p.grad.rows(), p.grad.cols()) + ", expected " +
                           shape_str(p.value.rows(), p.value.cols()));
        if (e.has_state) check_state_shape(e);
      }
    }
    for (Group& group : groups_) {
      for (Entry& e : group.entries) {
        if (!e.param->trainable()) continue;  // frozen: no gradient, no state, no update
        if (!e.has_state) {
          init_state(e);  // first step in which this parameter is trainable
          e.has_state = true;
        }
        ++e.steps;
        update(group, e);
      }
    }
  }

  void zero_grad() override {
    check_watched();
    for (Group& group : groups_)
      for (Entry& e : group.entries) e.param->zero_grad();
  }

  void reset_state() override {
    for (Group& group : groups_)
      for (Entry& e : group.entries) {
        e.has_state = false;
        e.steps = 0;
      }
  }

  std::size_t num_groups() const override { return groups_.size(); }
  const std::string& group_name(std::size_t g) const override { return group_at(g).name; }
  double lr(std::size_t g) const override { return group_at(g).lr; }
  void set_lr(std::size_t g, double lr) override {
    check_non_negative("lr", lr, group_at(g).name);
    group_at(g).lr = lr;
  }
  using Optimizer<T>::set_lr;
  double initial_lr(std::size_t g) const override { return group_at(g).initial_lr; }
  double weight_decay(std::size_t g) const override { return group_at(g).weight_decay; }
  void set_weight_decay(std::size_t g, double wd) override {
    check_non_negative("weight_decay", wd, group_at(g).name);
    group_at(g).weight_decay = wd;
  }

  /// Adds a group after construction (torch's add_param_group), e.g. a head added later.
  void add_param_group(const ParamGroup<T>& group) {
    check_non_negative("lr", group.lr, group.name);
    check_non_negative("weight_decay", group.weight_decay, group.name);
    Group g;
    g.name = group.name.empty() ? "group" + std::to_string(groups_.size()) : group.name;
    for (const Group& other : groups_)
      if (other.name == g.name)
        throw ConfigError(std::string(kind_) + ": two parameter groups are named \"" + g.name + "\"");
    g.lr = group.lr;
    g.initial_lr = group.lr;
    g.weight_decay = group.weight_decay;
    if (group.params.empty())
      throw ConfigError(std::string(kind_) + ": parameter group \"" + g.name + "\" has no parameters");
    g.entries.reserve(group.params.size());
    for (const NamedParameter<T>& np : group.params) {
      if (np.param == nullptr)
        throw ConfigError(std::string(kind_) + ": parameter \"" + np.name + "\" in group \"" + g.name + "\" is null");
      if (const Entry* dup = find_entry(np.param))
        throw ConfigError(std::string(kind_) + ": parameter \"" + np.name +
                          "\" appears in more than one group"
                          " (already listed as \"" +
                          dup->name + "\")");
      for (const Entry& e : g.entries)
        if (e.param == np.param)
          throw ConfigError(std::string(kind_) + ": parameter \"" + np.name + "\" is listed twice in group \"" +
                            g.name + "\"");
      Entry e;
      e.name = np.name;
      e.param = np.param;
      g.entries.push_back(std::move(e));
    }
    groups_.push_back(std::move(g));
    checked_epoch_ = kNeverChecked;  // the next step checks the watched module against the new group
  }

  /// Watches `module` from now on (the module constructors do this): step() and zero_grad() throw a
  /// ConfigError when a trainable parameter of the module is not in this optimizer (an adapter
  /// added or a parameter unfrozen after it was built), or when a parameter the optimizer took from
  /// the module is gone or renamed (an adapter deleted). Checks once now. Parameters given from
  /// outside the module (add_param_group) are not checked. The module must outlive the optimizer.
  void watch(Module<T>& module) {
    watched_ = &module;
    for (Group& g : groups_)
      for (Entry& e : g.entries) e.from_module = false;
    checked_epoch_ = kNeverChecked;
    check_watched();
  }
  /// The module watched, or null.
  const Module<T>* watched_module() const { return watched_; }

  /// Groups with their entries (for inspection and checkpointing).
  const std::vector<Group>& groups() const { return groups_; }
  std::vector<Group>& groups() { return groups_; }

  /// State of the parameter called `name`, or null while it has none (never trainable at a step).
  const State* state(const std::string& name) const {
    const Entry& e = entry(name);
    return e.has_state ? &e.state : nullptr;
  }
  /// Number of updates applied to the parameter called `name`.
  std::int64_t step_count(const std::string& name) const { return entry(name).steps; }
  /// How many parameters hold state.
  std::size_t num_states() const {
    std::size_t n = 0;
    for (const Group& g : groups_)
      for (const Entry& e : g.entries) n += e.has_state ? 1 : 0;
    return n;
  }

 protected:
  explicit BasicOptimizer(const char* kind) : kind_(kind) {}

  /// The constructors' groups: at least one parameter, and at least one of them trainable.
  void add_groups(const std::vector<ParamGroup<T>>& groups) {
    if (groups.empty()) throw ConfigError(std::string(kind_) + ": got no parameter groups");
    std::size_t total = 0, trainable = 0;
    for (const auto& g : groups)
      for (const NamedParameter<T>& np : g.params) {
        ++total;
        if (np.param != nullptr && np.param->trainable()) ++trainable;
      }
    if (total == 0)
      throw ConfigError(std::string(kind_) + ": got an empty parameter list: parameter group \"" +
                        (groups.front().name.empty() ? std::string("group0") : groups.front().name) +
                        "\" has no parameters");
    for (const auto& g : groups) add_param_group(g);
    if (trainable == 0)
      throw ConfigError(std::string(kind_) + ": none of the " + std::to_string(total) +
                        " parameters given is trainable, so there is nothing to optimize; add adapters or unfreeze "
                        "parameters before building the optimizer");
  }

  /// Allocates the state of a parameter that becomes trainable for the first time.
  virtual void init_state(Entry& e) = 0;
  /// Throws ShapeError when the parameter was resized after its state was created.
  virtual void check_state_shape(const Entry& e) const = 0;
  /// Applies one update; e.steps already counts this step.
  virtual void update(const Group& group, Entry& e) = 0;

  void check_state_matrix(const Entry& e, const Matrix<T>& m, const char* what) const {
    const Matrix<T>& v = e.param->value;
    if (m.rows() != v.rows() || m.cols() != v.cols())
      throw ShapeError(std::string(kind_) + ": parameter \"" + e.name + "\" has shape " +
                       shape_str(v.rows(), v.cols()) + " but its " + what + " has shape " +
                       shape_str(m.rows(), m.cols()) + " (resized after the optimizer was built?)");
  }

  void check_non_negative(const char* what, double value, const std::string& group) const {
    if (!std::isfinite(value) || value < 0.0)
      throw ConfigError(std::string(kind_) + ": " + what + " of group \"" + group + "\" must be finite and >= 0, got " +
                        check::num(value));
  }

  const char* kind_;

 private:
  void check_group_index(std::size_t g) const {
    if (g >= groups_.size())
      throw ConfigError(std::string(kind_) + ": group index " + std::to_string(g) + " out of range, " +
                        std::to_string(groups_.size()) + " groups");
  }
  Group& group_at(std::size_t g) {
    check_group_index(g);
    return groups_[g];
  }
  const Group& group_at(std::size_t g) const {
    check_group_index(g);
    return groups_[g];
  }

  const Entry* find_entry(const Parameter<T>* p) const {
    for (const Group& g : groups_)
      for (const Entry& e : g.entries)
        if (e.param == p) return &e;
    return nullptr;
  }

  const Entry& entry(const std::string& name) const {
    for (const Group& g : groups_)
      for (const Entry& e : g.entries)
        if (e.name == name) return e;
    throw ConfigError(std::string(kind_) + ": no parameter named \"" + name + "\"");
  }

  static constexpr std::uint64_t kNeverChecked = ~std::uint64_t{0};

  /// The watched module's check (see the top of this file); one atomic load unless parameters
  /// were created, destroyed or (un)frozen since the last check.
  void check_watched() {
    if (watched_ == nullptr) return;
    const std::uint64_t epoch = parameter_epoch();
    if (epoch == checked_epoch_) return;
    std::vector<std::pair<const Parameter<T>*, Entry*>> held;  // sorted by address, for lookup
    for (Group& g : groups_)
      for (Entry& e : g.entries) held.emplace_back(e.param, &e);
    std::sort(held.begin(), held.end(),
              [](const auto& x, const auto& y) { return std::less<const Parameter<T>*>()(x.first, y.first); });
    std::vector<char> seen(held.size(), 0);
    std::vector<std::string> missing, renamed;
    watched_->visit_parameters([&](const std::string& name, Parameter<T>& p) {
      const auto it = std::lower_bound(held.begin(), held.end(), &p, [](const auto& x, const Parameter<T>* q) {
        return std::less<const Parameter<T>*>()(x.first, q);
      });
      if (it == held.end() || it->first != &p) {
        if (p.trainable()) missing.push_back(name);
        return;
      }
      seen[static_cast<std::size_t>(it - held.begin())] = 1;
      if (it->second->from_module && it->second->name != name)
        renamed.push_back("\"" + it->second->name + "\" (now \"" + name + "\")");
    });
    const std::string where = describe("module", watched_->name());
    std::vector<std::string> gone;
    for (std::size_t i = 0; i < held.size(); ++i)
      if (!seen[i] && held[i].second->from_module) gone.push_back("\"" + held[i].second->name + "\"");
    for (const std::string& r : renamed) gone.push_back(r);
    auto list = [](const std::vector<std::string>& v, bool quote) {
      std::string out;
      const std::size_t shown = std::min<std::size_t>(v.size(), 5);
      for (std::size_t i = 0; i < shown; ++i) out += (i ? ", " : "") + (quote ? "\"" + v[i] + "\"" : v[i]);
      if (v.size() > shown) out += ", ... (" + std::to_string(v.size()) + " in all)";
      return out;
    };
    if (!gone.empty()) {
      const bool one = gone.size() == 1;
      throw ConfigError(std::string(kind_) + (one ? ": parameter " : ": parameters ") + list(gone, false) +
                        " of this optimizer " + (one ? "is" : "are") + " no longer in " + where +
                        " (an adapter deleted or replaced after the optimizer was built); rebuild the optimizer");
    }
    if (!missing.empty()) {
      const bool one = missing.size() == 1;
      throw ConfigError(std::string(kind_) + (one ? ": trainable parameter " : ": trainable parameters ") +
                        list(missing, true) + " of " + where + (one ? " is" : " are") +
                        " not in this optimizer (an adapter added, or a parameter unfrozen, after the optimizer was "
                        "built); rebuild the optimizer, or pass the new parameters to add_param_group");
    }
    for (std::size_t i = 0; i < held.size(); ++i)
      if (seen[i]) held[i].second->from_module = true;
    checked_epoch_ = epoch;
  }

  std::vector<Group> groups_;
  Module<T>* watched_ = nullptr;
  std::uint64_t checked_epoch_ = kNeverChecked;
};

namespace detail {
/// One group holding every parameter of `module` (frozen ones included, so that unfreezing them
/// later brings them into training).
template <class T>
std::vector<ParamGroup<T>> single_group(std::vector<NamedParameter<T>> params, double lr, double weight_decay) {
  return {ParamGroup<T>{std::move(params), lr, weight_decay, "default"}};
}
}  // namespace detail

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class Optimizer<float>;
extern template class Optimizer<double>;
}  // namespace peft
#endif
