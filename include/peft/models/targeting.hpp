#pragma once
// Module targeting the way Hugging Face PEFT does it (peft.tuners.tuners_utils.
// check_target_module_exists and peft.utils.other.get_pattern_key), on dotted module names such as
// `layers.0.attn.q_proj`:
//
//   target_modules given as a list:  key == t  or  key ends with "." + t      (suffix on a dot boundary)
//   target_modules given as a string: the regex must match the WHOLE key (re.fullmatch)
//   "all-linear":                     every linear except the output head (PEFT drops the model's
//                                     output layer — here the `classifier`)
//   exclude_modules:                  same list / string rules; an excluded key is never targeted
//   modules_to_save:                  a key inside a module to save (`(^|.*\.)m($|\..*)`) is never
//                                     targeted either (PEFT does not put adapters inside them)
//   rank_pattern / alpha_pattern:     the first pattern p (in insertion order) with
//                                     re.match(r"(.*\.)?(p)$", key) gives the module's r / alpha
//                                     (PatternMap, core/patterns.hpp: compiled once per key)
//
// Every regex is compiled once per selection, not once per module.
// A selection that matches nothing is a ConfigError that lists the available names.
#include <cctype>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/patterns.hpp"
#include "peft/core/regex.hpp"

namespace peft {

/// PEFT's target_modules / exclude_modules: a list of names (exact or ".suffix"), one full-match
/// regular expression, or "all-linear".
struct ModuleSelector {
  std::vector<std::string> names;
  std::string regex;        ///< non-empty: full-match regex (PEFT's single-string form)
  bool all_linear = false;  ///< PEFT's "all-linear" shorthand

  ModuleSelector() = default;
  /// A list of names: exact or ".suffix" matches.
  ModuleSelector(std::initializer_list<std::string> list) : names(list) {}
  explicit ModuleSelector(std::vector<std::string> list) : names(std::move(list)) {}

  /// The single-string form: "all-linear" (any case, as PEFT lower-cases it) or a full-match
  /// regex (as PEFT treats a str).
  static ModuleSelector pattern(const std::string& s) {
    ModuleSelector m;
    std::string lower = s;
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (lower == "all-linear")
      m.all_linear = true;
    else
      m.regex = s;
    return m;
  }
  static ModuleSelector list(std::vector<std::string> list) { return ModuleSelector(std::move(list)); }

  bool empty() const { return names.empty() && regex.empty() && !all_linear; }

  /// Human-readable form for messages: ["q_proj", "v_proj"], regex "…" or "all-linear".
  std::string describe() const {
    if (all_linear) return "\"all-linear\"";
    if (!regex.empty()) return "regex \"" + regex + "\"";
    std::string s = "[";
    for (std::size_t i = 0; i < names.size(); ++i) s += (i ? ", \"" : "\"") + names[i] + "\"";
    return s + "]";
  }
};

namespace detail {
inline Regex compile_regex(const std::string& pattern, const std::string& who) {
  return compile_name_regex(pattern, who);
}

inline bool ends_with_dotted(const std::string& key, const std::string& suffix) {
  return key.size() > suffix.size() && key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0 &&
         key[key.size() - suffix.size() - 1] == '.';
}
}  // namespace detail

/// PEFT's list rule: key == name, or key ends with "." + name.
inline bool module_name_matches(const std::string& key, const std::string& name) {
  return key == name || detail::ends_with_dotted(key, name);
}

/// A ModuleSelector with its regex compiled once, for matching many keys.
class CompiledSelector {
 public:
  CompiledSelector(const ModuleSelector& sel, const std::string& who) : sel_(&sel), who_(who) {
    if (!sel.all_linear && !sel.regex.empty())
      re_ = std::make_shared<const Regex>(detail::compile_regex(sel.regex, who));
  }
  /// Whether `key` is selected. `is_linear_non_head` is what "all-linear" selects (every linear
  /// but the output head); list and regex forms look at the name only.
  bool matches(const std::string& key, bool is_linear_non_head = true) const {
    if (sel_->all_linear) return is_linear_non_head;
    if (re_) return regex_full_match(key, *re_, who_);
    for (const auto& n : sel_->names)
      if (module_name_matches(key, n)) return true;
    return false;
  }

 private:
  const ModuleSelector* sel_;
  std::string who_;
  std::shared_ptr<const Regex> re_;
};

/// Whether `key` is selected (one-shot; CompiledSelector for many keys).
inline bool selector_matches(const ModuleSelector& sel, const std::string& key, bool is_linear_non_head = true,
                             const std::string& who = "target_modules") {
  return CompiledSelector(sel, who).matches(key, is_linear_non_head);
}

/// Whether `key` lies inside (or is) one of the modules to save: PEFT's `(^|.*\.)m($|\..*)`.
inline bool inside_module_to_save(const std::string& key, const std::vector<std::string>& modules_to_save) {
  for (const auto& m : modules_to_save) {
    if (key == m) return true;
    // m appears as a whole dotted component sequence: at the start or after a dot, followed by end or a dot
    for (std::size_t pos = key.find(m); pos != std::string::npos; pos = key.find(m, pos + 1)) {
      const bool start_ok = pos == 0 || key[pos - 1] == '.';
      const std::size_t end = pos + m.size();
      const bool end_ok = end == key.size() || key[end] == '.';
      if (start_ok && end_ok) return true;
    }
  }
  return false;
}

/// PEFT's rank_pattern / alpha_pattern lookup (get_pattern_key, then the dict lookup): the value
/// for `key`, empty when no pattern applies. The patterns were compiled when added.
template <class V>
std::optional<V> pattern_value(const PatternMap<V>& patterns, const std::string& key, const std::string& who) {
  if (const V* v = patterns.find(key, who)) return *v;
  return std::nullopt;
}

/// "a, b, c" (at most `limit` names, then "… (N more)").
inline std::string join_names(const std::vector<std::string>& names, std::size_t limit = 64) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < limit; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > limit) s += ", ... (" + std::to_string(names.size() - limit) + " more)";
  return s;
}

/// Selects, from `candidates` (module name, is-linear-non-head), those matched by `target` and not
/// excluded by `exclude` or `modules_to_save`. Throws ConfigError when the selection is empty.
inline std::vector<std::string> select_modules(const std::vector<std::pair<std::string, bool>>& candidates,
                                               const ModuleSelector& target, const ModuleSelector& exclude,
                                               const std::vector<std::string>& modules_to_save,
                                               const std::string& who) {
  if (target.empty()) throw ConfigError(who + ": target_modules is empty");
  std::vector<std::string> out, all;
  const CompiledSelector targets(target, who + " target_modules");
  const CompiledSelector excludes(exclude, who + " exclude_modules");
  for (const auto& [name, linear_non_head] : candidates) {
    all.push_back(name);
    if (!exclude.empty() && excludes.matches(name, linear_non_head)) continue;
    if (inside_module_to_save(name, modules_to_save)) continue;
    if (targets.matches(name, linear_non_head)) out.push_back(name);
  }
  if (out.empty())
    throw ConfigError(
        who + ": target_modules " + target.describe() +
        " matches no module (after exclude_modules and modules_to_save); available modules: " + join_names(all));
  return out;
}

}  // namespace peft
