#pragma once
// Module: the naming and traversal skeleton shared by layers and models.
//
// A module lists its own parameters (visit_own_parameters) and its child modules (visit_children);
// the base class walks the tree to produce dotted names the way PyTorch and Hugging Face PEFT do
// (`layers.0.attn.q.lora_A.default.weight`), to propagate a name to children for error messages,
// and to switch train/eval mode. Nothing is stored as a pointer into another object, so modules
// stay safely copyable and movable. Forward/backward are not virtual: each layer has its own typed
// Cache (see DESIGN notes in README), and models call their layers directly.
#include <functional>
#include <string>

#include "peft/core/parameter.hpp"

namespace peft {

template <class T>
class Module {
 public:
  using ParameterVisitor = std::function<void(const std::string& name, Parameter<T>& p)>;
  using ChildVisitor = std::function<void(const std::string& key, Module<T>& child)>;

  Module() = default;
  explicit Module(std::string name) : name_(std::move(name)) {}
  Module(const Module&) = default;
  Module(Module&&) noexcept = default;
  Module& operator=(const Module&) = default;
  Module& operator=(Module&&) noexcept = default;
  virtual ~Module() = default;

  /// Full dotted path of this module, used in error messages.
  const std::string& name() const { return name_; }

  /// Renames this module and, recursively, its children (`name.key`).
  void set_name(const std::string& name) {
    name_ = name;
    visit_children([&](const std::string& key, Module<T>& child) { child.set_name(join(name_, key)); });
  }

  bool training() const { return training_; }

  /// Train mode enables dropout; eval mode disables it. Applies to the whole subtree.
  void train(bool on = true) {
    training_ = on;
    visit_children([&](const std::string&, Module<T>& child) { child.train(on); });
  }
  void eval() { train(false); }

  /// Calls fn(dotted_name, parameter) for every parameter in the subtree, in a stable order.
  void visit_parameters(const ParameterVisitor& fn, const std::string& prefix = "") {
    visit_own_parameters([&](const std::string& local, Parameter<T>& p) { fn(join(prefix, local), p); });
    visit_children([&](const std::string& key, Module<T>& child) { child.visit_parameters(fn, join(prefix, key)); });
  }

  using ModuleVisitor = std::function<void(const std::string& path, Module<T>& module)>;
  /// Calls fn(dotted_path, module) for this module (path `prefix`) and every module below it, parents
  /// before children, with the paths visit_parameters uses ("layers.0.attn.q").
  void visit_modules(const ModuleVisitor& fn, const std::string& prefix = "") {
    fn(prefix, *this);
    visit_children([&](const std::string& key, Module<T>& child) { child.visit_modules(fn, join(prefix, key)); });
  }

  /// Zeroes the gradient of every trainable parameter in the subtree. It walks the tree by name
  /// (building the dotted names allocates): in a training loop prefer the optimizer's zero_grad(),
  /// which walks its own list.
  void zero_grad() {
    visit_parameters([](const std::string&, Parameter<T>& p) { p.zero_grad(); });
  }

  static std::string join(const std::string& prefix, const std::string& key) {
    if (prefix.empty()) return key;
    if (key.empty()) return prefix;
    return prefix + "." + key;
  }

 protected:
  /// Leaves override this: fn(local_name, parameter) for each parameter owned directly.
  virtual void visit_own_parameters(const ParameterVisitor& /*fn*/) {}
  /// Composites override this: fn(key, child) for each child module.
  virtual void visit_children(const ChildVisitor& /*fn*/) {}

 private:
  std::string name_;
  bool training_ = true;
};

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class Module<float>;
extern template class Module<double>;
}  // namespace peft
#endif
