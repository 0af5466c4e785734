#pragma once
// Whole-model parameter utilities: enumerate by dotted name, count trainable vs. frozen, freeze
// and unfreeze by name pattern (a regular expression that must match the whole name, like
// Hugging Face PEFT's string form of target_modules).
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/module.hpp"
#include "peft/core/regex.hpp"

namespace peft {

template <class T>
struct NamedParameter {
  std::string name;
  Parameter<T>* param;
};

template <class T>
std::vector<NamedParameter<T>> named_parameters(Module<T>& module) {
  std::vector<NamedParameter<T>> out;
  module.visit_parameters([&](const std::string& name, Parameter<T>& p) { out.push_back({name, &p}); });
  return out;
}

/// Only the trainable parameters, in model order (what an optimizer takes).
template <class T>
std::vector<NamedParameter<T>> trainable_parameters(Module<T>& module) {
  std::vector<NamedParameter<T>> out;
  module.visit_parameters([&](const std::string& name, Parameter<T>& p) {
    if (p.trainable()) out.push_back({name, &p});
  });
  return out;
}

struct ParameterCount {
  Index trainable = 0;
  Index total = 0;
  Index frozen() const { return total - trainable; }
  /// Trainable share in percent.
  double trainable_percent() const {
    return total == 0 ? 0.0 : 100.0 * static_cast<double>(trainable) / static_cast<double>(total);
  }
};

template <class T>
ParameterCount count_parameters(Module<T>& module) {
  ParameterCount c;
  module.visit_parameters([&](const std::string&, Parameter<T>& p) {
    c.total += p.size();
    if (p.trainable()) c.trainable += p.size();
  });
  return c;
}

namespace detail {
inline Regex compile_pattern(const std::string& pattern, const char* who) { return compile_name_regex(pattern, who); }

/// Sets trainable = on for every parameter whose full name matches; throws when none does, so a
/// typo cannot silently leave a model fully frozen (or fully trainable).
template <class T>
std::size_t set_trainable_matching(Module<T>& module, const std::string& pattern, bool on, const char* who) {
  const Regex re = compile_pattern(pattern, who);
  std::size_t hits = 0;
  std::vector<std::string> seen;
  module.visit_parameters([&](const std::string& name, Parameter<T>& p) {
    if (regex_full_match(name, re, who)) {
      p.set_trainable(on);
      ++hits;
    } else if (seen.size() < 8) {
      seen.push_back(name);
    }
  });
  if (hits == 0) {
    std::string names;
    for (const auto& n : seen) names += (names.empty() ? "" : ", ") + n;
    throw ConfigError(std::string(who) + ": pattern \"" + pattern + "\" matches no parameter of " +
                      describe("module", module.name()) + "; names look like: " + names);
  }
  return hits;
}
}  // namespace detail

/// Freezes every parameter whose dotted name fully matches `pattern` (default: all). Returns the count.
template <class T>
std::size_t freeze(Module<T>& module, const std::string& pattern = ".*") {
  return detail::set_trainable_matching(module, pattern, false, "freeze");
}

/// Unfreezes every parameter whose dotted name fully matches `pattern`. Returns the count.
template <class T>
std::size_t unfreeze(Module<T>& module, const std::string& pattern = ".*") {
  return detail::set_trainable_matching(module, pattern, true, "unfreeze");
}

}  // namespace peft
