#pragma once
// Which modules a PEFT config targets: the one implementation behind both the in-memory config
// (models/peft_config.hpp, apply_peft) and adapter_config.json (io/peft_format.hpp). It follows
// Hugging Face PEFT (peft.tuners.tuners_utils.check_target_module_exists and
// _maybe_include_all_linear_layers), on dotted module names such as `layers.0.attn.q_proj`:
//
//   null / absent:       selects nothing
//   a list:              key == t  or  key ends with "." + t              (suffix on a dot boundary)
//   a string:            a regex that must match the WHOLE key (re.fullmatch), except
//   "all-linear":        (compared case-insensitively, as PEFT lower-cases it) every linear layer
//                        except the model's output layer (see "The output layer" below)
//   exclude_modules:     the same forms; an excluded key is never targeted
//   modules_to_save:     a key equal to or inside a module to save (`(^|.*\.)m($|\..*)`) is never
//                        targeted (PEFT puts no adapter inside a ModulesToSaveWrapper)
//   rank_pattern / alpha_pattern: PatternMap (core/patterns.hpp), PEFT's get_pattern_key.
//   layers_to_transform / layers_pattern (LayerFilter): when set, a module selected by a list
//                        entry as a suffix (or by "all-linear", which PEFT turns into such a list)
//                        is kept only if its layer index is listed. The index is the number in
//                        PEFT's `re.match(r".*\.[^.]*\.(\d+)\.", key)`, or, with layers_pattern p,
//                        `.*\.{p}\.(\d+)\.` (the first p that matches): the last numeric component
//                        that has a component before it and one after it, and a dot before that
//                        (`model.layers.3.mlp.fc` is layer 3; `layers.3.mlp.fc` has none, so it is
//                        not kept, as in PEFT). A key equal to a list entry, or selected by a regex,
//                        is not filtered (PEFT checks layers only on the suffix branch).
//
// The output layer. PEFT drops the model's output embedding (get_output_embeddings(): `lm_head` in
// causal and seq2seq LMs) and, for sequence classification, the top-level head named "score" or
// "classifier" (SEQ_CLS_HEAD_NAMES). A caller that knows its model says which linear is the head
// (TransformerClassifier::linear_names). A caller that knows only names (adapter files, merging a
// file, the CLI) uses is_output_layer_name(), the only place this rule is written: a module whose
// last component is `lm_head` (at any depth: multimodal wrappers nest it, e.g.
// `language_model.lm_head`), or whose whole path is `score` or `classifier`. Unlike PEFT we do not
// make the classifier rule depend on task_type: a file does not always carry it, and a
// classification head is the output layer "all-linear" is documented to leave out.
//
// A regex is compiled once, when the selector is made (copies share the compiled program); an
// invalid one is a ConfigError at that point.
#include <algorithm>
#include <cctype>
#include <initializer_list>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/regex.hpp"

namespace peft {

/// PEFT's list rule: key == name, or key ends with "." + name.
inline bool module_name_matches(const std::string& key, const std::string& name) {
  if (key == name) return true;
  return key.size() > name.size() && key.compare(key.size() - name.size(), name.size(), name) == 0 &&
         key[key.size() - name.size() - 1] == '.';
}

/// Whether the module at `path` is the model's output layer, judged by its name alone (see the
/// file comment): what "all-linear" leaves out where the caller does not know the model.
inline bool is_output_layer_name(const std::string& path) {
  if (path == "score" || path == "classifier") return true;
  return module_name_matches(path, "lm_head");
}

/// target_modules / exclude_modules (and (IA)³'s feedforward_modules): absent, a list of names
/// (exact or ".suffix"), one full-match regular expression, or "all-linear".
class ModuleSelector {
 public:
  enum class Form { Absent, List, String };

  /// Absent (JSON null): selects nothing.
  ModuleSelector() = default;
  /// A list of names: exact or ".suffix" matches.
  ModuleSelector(std::initializer_list<std::string> names) : form_(Form::List), names_(names) {}
  explicit ModuleSelector(std::vector<std::string> names) : form_(Form::List), names_(std::move(names)) {}
  static ModuleSelector list(std::vector<std::string> names) { return ModuleSelector(std::move(names)); }

  /// The single-string form: "all-linear" (any case) or a full-match regex, compiled here.
  /// ConfigError naming `who` when the regex is invalid; `who` also names the selector when a
  /// key is too long to match.
  static ModuleSelector pattern(const std::string& text, const std::string& who = "target_modules") {
    ModuleSelector m;
    m.form_ = Form::String;
    m.text_ = text;
    m.who_ = who;
    std::string lower = text;
    for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    m.all_linear_ = lower == "all-linear";
    if (!m.all_linear_) m.re_ = std::make_shared<const Regex>(compile_name_regex(text, who));
    return m;
  }

  Form form() const { return form_; }
  bool present() const { return form_ != Form::Absent; }
  bool is_list() const { return form_ == Form::List; }
  bool is_all_linear() const { return all_linear_; }
  /// A string other than "all-linear".
  bool is_regex() const { return form_ == Form::String && !all_linear_; }
  /// The list form's names (empty for the other forms).
  const std::vector<std::string>& names() const { return names_; }
  /// The string form as given ("all-linear" keeps its spelling); empty for the other forms.
  const std::string& text() const { return text_; }
  /// Absent, or an empty list: nothing can match.
  bool empty() const { return form_ == Form::Absent || (form_ == Form::List && names_.empty()); }

  /// Whether `key` is selected. `linear_non_head` is what "all-linear" selects: the module is a
  /// linear layer and not the model's output layer. The list and regex forms look at the name only.
  bool matches(const std::string& key, bool linear_non_head) const {
    switch (form_) {
      case Form::Absent: return false;
      case Form::List:
        for (const auto& n : names_)
          if (module_name_matches(key, n)) return true;
        return false;
      case Form::String: return all_linear_ ? linear_non_head : regex_full_match(key, *re_, who_);
    }
    return false;
  }
  /// matches() for a linear layer known only by its name: the output layer is recognised by
  /// is_output_layer_name().
  bool matches_linear_by_name(const std::string& key) const { return matches(key, !is_output_layer_name(key)); }

  /// Human-readable form for messages: ["q_proj", "v_proj"], regex "…", "all-linear" or null.
  std::string describe() const {
    if (form_ == Form::Absent) return "null";
    if (all_linear_) return "\"" + text_ + "\"";
    if (form_ == Form::String) return "regex \"" + text_ + "\"";
    std::string s = "[";
    for (std::size_t i = 0; i < names_.size(); ++i) s += (i ? ", \"" : "\"") + names_[i] + "\"";
    return s + "]";
  }

  friend bool operator==(const ModuleSelector& a, const ModuleSelector& b) {
    return a.form_ == b.form_ && a.names_ == b.names_ && a.text_ == b.text_;
  }
  friend bool operator!=(const ModuleSelector& a, const ModuleSelector& b) { return !(a == b); }

 private:
  Form form_ = Form::Absent;
  std::vector<std::string> names_;
  std::string text_;
  std::string who_;
  bool all_linear_ = false;
  std::shared_ptr<const Regex> re_;  // String form but "all-linear"; shared: copies compile nothing
};

/// PEFT's layers_to_transform / layers_pattern (see the file comment). Empty `indexes`: no filter.
class LayerFilter {
 public:
  LayerFilter() = default;
  /// `patterns` are regexes (layers_pattern), compiled here; ConfigError naming `who` if invalid.
  LayerFilter(std::vector<long long> indexes, const std::vector<std::string>& patterns,
              const std::string& who = "layers_pattern")
      : indexes_(std::move(indexes)), who_(who) {
    for (const auto& p : patterns)
      if (!p.empty()) patterns_.push_back(std::make_shared<const Regex>(compile_name_regex(".*\\.(?:" + p + ")", who)));
  }

  bool active() const { return !indexes_.empty(); }
  const std::vector<long long>& indexes() const { return indexes_; }

  /// The layer index PEFT reads from `key`, or -1 when none matches.
  long long layer_index(const std::string& key) const {
    std::vector<std::size_t> starts{0};  // start of each dotted component
    for (std::size_t i = 0; i < key.size(); ++i)
      if (key[i] == '.') starts.push_back(i + 1);
    const std::size_t n = starts.size();
    auto end_of = [&](std::size_t c) { return c + 1 < n ? starts[c + 1] - 1 : key.size(); };
    auto patterns_at = [&](std::size_t c) {  // the key before ".<component c>" ends with "." + a pattern
      if (patterns_.empty()) return c >= 2;  // default: ".*\.[^.]*\." before the digits
      const std::string head = key.substr(0, starts[c] - 1);
      for (const auto& re : patterns_)
        if (regex_full_match(head, *re, who_)) return true;
      return false;
    };
    // Greedy `.*`: the last numeric component followed by a dot that fits.
    for (std::size_t c = n >= 2 ? n - 1 : 0; c-- > 1;) {
      const std::size_t b = starts[c], e = end_of(c);
      if (e == b || e - b > 18) continue;
      bool digits = true;
      for (std::size_t i = b; i < e && digits; ++i) digits = key[i] >= '0' && key[i] <= '9';
      if (digits && patterns_at(c)) return std::stoll(key.substr(b, e - b));
    }
    return -1;
  }

  /// Whether a module selected as a suffix is kept.
  bool keeps(const std::string& key) const {
    if (!active()) return true;
    const long long i = layer_index(key);
    return i >= 0 && std::find(indexes_.begin(), indexes_.end(), i) != indexes_.end();
  }

 private:
  std::vector<long long> indexes_;
  std::vector<std::shared_ptr<const Regex>> patterns_;
  std::string who_;
};

/// Whether `key` lies inside (or is) one of the modules to save: PEFT's `(^|.*\.)m($|\..*)`.
inline bool inside_module_to_save(const std::string& key, const std::vector<std::string>& modules_to_save) {
  for (const auto& m : modules_to_save) {
    if (m.empty()) continue;
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

/// PEFT's decision for one module: selected by `target`, not by `exclude`, and not inside a module
/// to save. `linear_non_head` as in ModuleSelector::matches.
/// `layers` filters what a list entry selects as a suffix, or "all-linear" (see LayerFilter).
inline bool module_targeted(const std::string& key, bool linear_non_head, const ModuleSelector& target,
                            const ModuleSelector& exclude, const std::vector<std::string>& modules_to_save,
                            const LayerFilter& layers = {}) {
  if (exclude.matches(key, linear_non_head)) return false;
  if (inside_module_to_save(key, modules_to_save)) return false;
  if (!target.matches(key, linear_non_head)) return false;
  if (!layers.active() || target.is_regex()) return true;
  if (target.is_list())
    for (const auto& n : target.names())
      if (key == n) return true;  // named exactly: PEFT does not look at layers
  return layers.keeps(key);
}

/// "a, b, c" (at most `limit` names, then "… (N more)").
inline std::string join_names(const std::vector<std::string>& names, std::size_t limit = 64) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < limit; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > limit) s += ", ... (" + std::to_string(names.size() - limit) + " more)";
  return s;
}

/// Selects, from `candidates` (module name, is-linear-and-not-the-output-layer), those
/// module_targeted() accepts. ConfigError naming `who` when `target` is empty or the selection is.
inline std::vector<std::string> select_modules(const std::vector<std::pair<std::string, bool>>& candidates,
                                               const ModuleSelector& target, const ModuleSelector& exclude,
                                               const std::vector<std::string>& modules_to_save, const std::string& who,
                                               const LayerFilter& layers = {}) {
  if (target.empty()) throw ConfigError(who + ": target_modules is empty");
  std::vector<std::string> out, all;
  for (const auto& [name, linear_non_head] : candidates) {
    all.push_back(name);
    if (module_targeted(name, linear_non_head, target, exclude, modules_to_save, layers)) out.push_back(name);
  }
  if (out.empty())
    throw ConfigError(who + ": target_modules " + target.describe() + " matches no module (after exclude_modules" +
                      (layers.active() ? ", layers_to_transform" : "") +
                      " and modules_to_save); available modules: " + join_names(all));
  return out;
}

}  // namespace peft
