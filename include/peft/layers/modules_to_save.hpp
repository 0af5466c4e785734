#pragma once
// ModulesToSave<T, M>: one trainable copy of a module per adapter next to the frozen original
// (Hugging Face PEFT's ModulesToSaveWrapper, what `modules_to_save` wraps: a classifier head, a
// layer norm). Training adapter "b" trains b's copy only, so the head adapter "a" uses stays as it
// was; the original is kept for the base model (adapters disabled, no copy active).
//
// Forward and backward are typed, not virtual, in this library, so a model declares such a module
// as a host type, as it declares its linears as AdaptedLinear:
//
//   ModulesToSave<T, Linear<T>> head;                 // instead of Linear<T> head;
//   head.active().forward(x, y, cache);               // or head.forward(x, y, cache)
//   head.active().backward(cache, dy, &dx);           // the module forward used (same active copy)
//
// active() is the active adapter's copy, or the original when no copy is active or the copies are
// disabled. Parameter names are those of PEFT's model state dict:
//   no copy:    the original's own names below the module ("head.weight"), so a pretrained base
//               loads as it would into M itself;
//   copies:     "head.original_module.weight", "head.modules_to_save.<adapter>.weight".
// With copies, the original is frozen and only the active copy is trainable (PEFT's requires_grad
// rule); with none, trainable flags are left as they are. Copies live on the heap: adding or
// deleting one never moves another (optimizers keep valid pointers). Copying or moving the host
// copies or moves every copy with it.
//
// Model-wide code (PeftModel, apply_method, apply_peft, the adapter file reader and writer) finds
// hosts while visiting modules with dynamic_cast<ModulesToSaveBase*> and drives them through its
// virtual interface (add_copy, set_active, delete_copy, disable, names, unload).
//
// Files: PEFT saves an adapter's copy under the module's own keys (base_model.model.head.weight,
// "modules_to_save.<adapter>." removed) and loads those tensors back into the copy of the adapter
// being loaded; saved_tensor_name and loaded_parameter_name below give that mapping.
#include <algorithm>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/method.hpp"
#include "peft/core/error.hpp"
#include "peft/core/module.hpp"
#include "peft/core/targeting.hpp"
#include "peft/core/warnings.hpp"

namespace peft {

/// What model-wide code sees of a ModulesToSave<T, M> host (found with dynamic_cast while visiting
/// modules). Not a template: one interface for every scalar and module type.
class ModulesToSaveBase {
 public:
  virtual ~ModulesToSaveBase() = default;

  /// Adds a copy of the original for `adapter` and makes it the active one (the original is frozen,
  /// the copy trainable). ConfigError when the adapter already has a copy or the name is invalid.
  virtual void add_copy(const std::string& adapter) = 0;
  /// Removes the adapter's copy (ConfigError when it has none); the original is used when it was the
  /// active one.
  virtual void delete_copy(const std::string& adapter) = 0;
  /// Makes `adapter`'s copy the active (and only trainable) one; a name without a copy, or "",
  /// leaves no copy active: the original is used (PEFT disables a wrapper the adapter is not in).
  virtual void set_active(const std::string& adapter) = 0;
  /// The active copy's adapter name, "" when none.
  virtual std::string active_copy() const = 0;
  virtual bool has_copy(const std::string& adapter) const = 0;
  /// The adapters with a copy, in the order they were added.
  virtual std::vector<std::string> names() const = 0;
  /// While disabled, active() is the original (PEFT's disable_adapter context).
  virtual void disable(bool disabled = true) = 0;
  virtual bool disabled() const = 0;
  /// merge_and_unload: the original takes the active copy's values (and trainable flags); every copy
  /// is dropped. With no active copy the original is kept as it is.
  virtual void unload() = 0;

  bool has_copies() const { return !names().empty(); }

 protected:
  ModulesToSaveBase() = default;
  ModulesToSaveBase(const ModulesToSaveBase&) = default;
  ModulesToSaveBase(ModulesToSaveBase&&) noexcept = default;
  ModulesToSaveBase& operator=(const ModulesToSaveBase&) = default;
  ModulesToSaveBase& operator=(ModulesToSaveBase&&) noexcept = default;
};

template <class T, class M>
class ModulesToSave : public Module<T>, public ModulesToSaveBase {
 public:
  using Module_type = M;

  ModulesToSave() = default;
  /// Hosts `original` (no copy yet: the parameters keep their plain names and flags).
  explicit ModulesToSave(M original, std::string name = "")
      : Module<T>(std::move(name)), original_(std::move(original)) {
    this->set_name(this->name());
  }
  /// `head = Linear<T>(...)`: replaces the original and drops every copy.
  ModulesToSave& operator=(M original) {
    original_ = std::move(original);
    copies_.clear();
    active_ = npos;
    this->set_name(this->name());
    return *this;
  }

  ModulesToSave(const ModulesToSave& o)
      : Module<T>(o), ModulesToSaveBase(o), original_(o.original_), active_(o.active_), disabled_(o.disabled_) {
    copies_.reserve(o.copies_.size());
    for (const auto& c : o.copies_) copies_.emplace_back(c.first, std::make_unique<M>(*c.second));
  }
  ModulesToSave& operator=(const ModulesToSave& o) {
    if (this != &o) *this = ModulesToSave(o);
    return *this;
  }
  ModulesToSave(ModulesToSave&&) = default;  // noexcept when M's move is
  ModulesToSave& operator=(ModulesToSave&&) = default;
  ~ModulesToSave() override = default;

  /// The module forward and backward use: the active copy, or the original when none is active or
  /// the copies are disabled.
  M& active() { return (disabled_ || active_ == npos) ? original_ : *copies_[active_].second; }
  const M& active() const { return (disabled_ || active_ == npos) ? original_ : *copies_[active_].second; }
  M& original() { return original_; }
  const M& original() const { return original_; }
  /// The copy of `adapter` (ConfigError when it has none).
  M& copy(const std::string& adapter) { return *copies_[index_of(adapter)].second; }
  const M& copy(const std::string& adapter) const { return *copies_[index_of(adapter)].second; }
  std::size_t num_copies() const { return copies_.size(); }

  /// active().forward(args...) and active().backward(args...): the cache a forward fills belongs to
  /// the module it ran on, so switching the active copy between a forward and its backward is the
  /// caller's error, as it is for any other module.
  template <class... Args>
  decltype(auto) forward(Args&&... args) {
    return active().forward(std::forward<Args>(args)...);
  }
  template <class... Args>
  decltype(auto) backward(Args&&... args) {
    return active().backward(std::forward<Args>(args)...);
  }

  // ---- ModulesToSaveBase --------------------------------------------------------------------
  void add_copy(const std::string& adapter) override {
    check_adapter_name(who(), adapter);
    if (find(adapter) != npos) throw ConfigError(who() + ": adapter \"" + adapter + "\" already has a copy");
    copies_.emplace_back(adapter, std::make_unique<M>(original_));
    active_ = copies_.size() - 1;
    this->set_name(this->name());
    sync_trainable();
  }
  void delete_copy(const std::string& adapter) override {
    const std::size_t i = index_of(adapter);
    copies_.erase(copies_.begin() + static_cast<std::ptrdiff_t>(i));
    if (active_ == i)
      active_ = npos;
    else if (active_ != npos && active_ > i)
      --active_;
    this->set_name(this->name());
    sync_trainable();
  }
  void set_active(const std::string& adapter) override {
    active_ = find(adapter);
    sync_trainable();
  }
  std::string active_copy() const override { return active_ == npos ? std::string() : copies_[active_].first; }
  bool has_copy(const std::string& adapter) const override { return find(adapter) != npos; }
  std::vector<std::string> names() const override {
    std::vector<std::string> out;
    for (const auto& c : copies_) out.push_back(c.first);
    return out;
  }
  void disable(bool disabled = true) override { disabled_ = disabled; }
  bool disabled() const override { return disabled_; }
  void unload() override {
    if (active_ != npos) original_ = std::move(*copies_[active_].second);
    copies_.clear();
    active_ = npos;
    this->set_name(this->name());
  }

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    if (copies_.empty()) {
      fn("", original_);  // the original's names directly below this module ("head.weight")
      return;
    }
    fn("original_module", original_);
    for (auto& c : copies_) fn("modules_to_save." + c.first, *c.second);
  }

 private:
  static constexpr std::size_t npos = static_cast<std::size_t>(-1);

  std::string who() const { return describe("ModulesToSave", this->name()); }

  std::size_t find(const std::string& adapter) const {
    for (std::size_t i = 0; i < copies_.size(); ++i)
      if (copies_[i].first == adapter) return i;
    return npos;
  }
  std::size_t index_of(const std::string& adapter) const {
    const std::size_t i = find(adapter);
    if (i == npos) {
      std::string have;
      for (const auto& c : copies_) have += (have.empty() ? "\"" : ", \"") + c.first + "\"";
      throw ConfigError(who() + ": adapter \"" + adapter +
                        "\" has no copy (copies: " + (have.empty() ? std::string("none") : have) + ")");
    }
    return i;
  }

  /// With copies: the original frozen, the active copy trainable, the others frozen.
  void sync_trainable() {
    if (copies_.empty()) return;
    auto set = [](M& m, bool on) {
      m.visit_parameters([on](const std::string&, Parameter<T>& p) { p.set_trainable(on); });
    };
    set(original_, false);
    for (std::size_t i = 0; i < copies_.size(); ++i) set(*copies_[i].second, i == active_);
  }

  M original_;
  std::vector<std::pair<std::string, std::unique_ptr<M>>> copies_;  ///< adapter → copy, in insertion order
  std::size_t active_ = npos;
  bool disabled_ = false;
};

/// Every ModulesToSave host below `model` with its dotted path (parents before children).
template <class T>
std::vector<std::pair<std::string, ModulesToSaveBase*>> modules_to_save_hosts(Module<T>& model) {
  std::vector<std::pair<std::string, ModulesToSaveBase*>> out;
  model.visit_modules([&](const std::string& path, Module<T>& m) {
    if (auto* h = dynamic_cast<ModulesToSaveBase*>(&m)) {
      for (const auto& o : out)  // a host's original, without copies, is visited at the host's own path
        if (o.first == path) return;
      out.emplace_back(path, h);
    }
  });
  return out;
}

/// Whether `path` lies inside a host that holds copies (its original or one of its copies): such
/// modules are not targets of an adapter method (PEFT never targets a module to save).
inline bool inside_module_copies(const std::vector<std::pair<std::string, ModulesToSaveBase*>>& hosts,
                                 const std::string& path) {
  for (const auto& [p, h] : hosts)
    if (h->has_copies() && path.size() > p.size() && (p.empty() || path.compare(0, p.size() + 1, p + ".") == 0))
      return true;
  return false;
}

/// The name a model parameter is saved under in adapter `adapter`'s file (PEFT's
/// get_peft_model_state_dict): "head.modules_to_save.<adapter>.weight" → "head.weight"; false for
/// the original and other adapters' copies of a host with copies (not saved); the name itself
/// for anything else.
inline bool saved_tensor_name(const std::vector<std::pair<std::string, ModulesToSaveBase*>>& hosts,
                              const std::string& name, const std::string& adapter, std::string* saved) {
  for (const auto& [p, h] : hosts) {
    if (!h->has_copies()) continue;
    const std::string head = p.empty() ? std::string() : p + ".";
    if (name.compare(0, head.size(), head) != 0) continue;
    const std::string copy = head + "modules_to_save." + adapter + ".";
    if (name.compare(0, copy.size(), copy) == 0) {
      *saved = head + name.substr(copy.size());
      return true;
    }
    if (name.compare(0, head.size() + 16, head + "original_module.") == 0 ||
        name.compare(0, head.size() + 16, head + "modules_to_save.") == 0)
      return false;
  }
  *saved = name;
  return true;
}

/// The host that a file tensor of a module to save ("head.weight") belongs to, with the tensor's
/// name below it ("weight"); nullptr when `name` is under no host.
inline ModulesToSaveBase* module_to_save_of(const std::vector<std::pair<std::string, ModulesToSaveBase*>>& hosts,
                                            const std::string& name, std::string* host_path, std::string* rest) {
  ModulesToSaveBase* found = nullptr;
  for (const auto& [p, h] : hosts) {  // the innermost host wins (parents come first)
    const std::string head = p.empty() ? std::string() : p + ".";
    if (name.size() > head.size() && name.compare(0, head.size(), head) == 0) {
      found = h;
      *host_path = p;
      *rest = name.substr(head.size());
    }
  }
  return found;
}

/// The modules a `modules_to_save` list names in `model` (PEFT's rule, module_name_matches: a path
/// equal to an entry or ending in "." + entry), resolved before anything changes: each with its
/// host when it is a ModulesToSave (then it gets a copy per adapter), else the plain module.
template <class T>
struct SavedModule {
  std::string path;
  ModulesToSaveBase* host = nullptr;  ///< set for a ModulesToSave host
  Module<T>* plain = nullptr;         ///< set for any other module
};

/// Resolves `entries` in `model` for adding adapter `adapter` (see SavedModule). ConfigError naming
/// the entry when one matches no module (with `strict`; else it is reported through peft::warn), or
/// when a host already has a copy for `adapter`. Modules inside a host's copies are never matched.
template <class T>
std::vector<SavedModule<T>> resolve_modules_to_save(Module<T>& model, const std::vector<std::string>& entries,
                                                    const std::string& adapter, const std::string& who,
                                                    bool strict = true) {
  std::vector<SavedModule<T>> out;
  if (entries.empty()) return out;
  const auto hosts = modules_to_save_hosts(model);
  std::vector<std::string> paths;
  model.visit_modules([&](const std::string& path, Module<T>& m) {
    if (path.empty() || inside_module_copies(hosts, path)) return;
    if (!paths.empty() && paths.back() == path) return;  // a host's original without copies, at the host's path
    paths.push_back(path);
    bool hit = false;
    for (const auto& e : entries) hit = hit || module_name_matches(path, e);
    if (!hit) return;
    SavedModule<T> s;
    s.path = path;
    if (auto* h = dynamic_cast<ModulesToSaveBase*>(&m)) {
      if (h->has_copy(adapter))
        throw ConfigError(who + ": module to save \"" + path + "\" already has a copy for adapter \"" + adapter + "\"");
      s.host = h;
    } else {
      s.plain = &m;
    }
    out.push_back(s);
  });
  for (const auto& e : entries) {
    bool hit = false;
    for (const auto& s : out) hit = hit || module_name_matches(s.path, e);
    if (hit) continue;
    std::string list;
    for (const auto& p : paths) list += (list.empty() ? "" : ", ") + p;
    const std::string msg = who + ": modules_to_save entry \"" + e + "\" matches no module; available modules: " + list;
    if (strict) throw ConfigError(msg);
    warn(msg);
  }
  return out;
}

/// Makes the resolved modules train for adapter `adapter` (PEFT's _set_trainable): a host gets a
/// copy, active and trainable, its original frozen; a plain module is trained in place, shared by
/// every adapter, which is reported through peft::warn with the fix.
template <class T>
void add_modules_to_save(const std::vector<SavedModule<T>>& modules, const std::string& adapter,
                         const std::string& who) {
  for (const auto& s : modules) {
    if (s.host != nullptr) {
      s.host->add_copy(adapter);
      continue;
    }
    s.plain->visit_parameters([](const std::string&, Parameter<T>& p) { p.set_trainable(true); });
    warn(who + ": module to save \"" + s.path + "\" is a plain module, trained in place and shared by every " +
         "adapter (training adapter \"" + adapter + "\" changes it for the others too); declare it as " +
         "peft::ModulesToSave<T, M> for one copy per adapter");
  }
}

}  // namespace peft
