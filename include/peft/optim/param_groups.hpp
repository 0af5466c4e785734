#pragma once
// Building parameter groups from a module's dotted parameter names.
//
// - param_groups_by_rules: regex rules on names, first matching rule wins, unmatched parameters go
//   to a "default" group; a rule that matches no parameter is an error (a typo must not silently
//   train everything at the default lr). Patterns must match the WHOLE name (Python's re.fullmatch), as
//   peft::freeze / peft::unfreeze do: write ".*bias" rather than "bias".
// - layerwise_lr_groups: layer-wise learning-rate decay (Howard & Ruder, 2018, "Universal Language
//   Model Fine-tuning", discriminative fine-tuning; Clark et al., 2020, ELECTRA, layer-wise decay):
//     lr_layer = base_lr · decay^(num_layers − layer_index)
//   The layer index is the first capture group of `layer_regex` searched in the name (default
//   `(?:^|\.)layers\.(\d+)\.`, i.e. "layers.3.attn.q.weight" → 3). Parameters without such a
//   component get the index of the first matching `fixed_layers` rule, else `default_layer`
//   (default num_layers, i.e. the full base_lr: a head on top of the stack). With L blocks named
//   layers.0 … layers.{L−1}, the top block gets base·decay, the bottom one base·decay^L, and an
//   embedding mapped to index −1 gets base·decay^(L+1).
// Frozen parameters are included unless trainable_only is set, so that gradual unfreezing works.
#include <cmath>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameters.hpp"
#include "peft/optim/optimizer.hpp"

namespace peft {

/// Parameters whose full dotted name matches `pattern` (ConfigError when none does).
template <class T>
std::vector<NamedParameter<T>> parameters_matching(Module<T>& module, const std::string& pattern,
                                                   bool trainable_only = false) {
  const Regex re = detail::compile_pattern(pattern, "parameters_matching");
  std::vector<NamedParameter<T>> out;
  module.visit_parameters([&](const std::string& name, Parameter<T>& p) {
    if ((!trainable_only || p.trainable()) && regex_full_match(name, re, "parameters_matching"))
      out.push_back({name, &p});
  });
  if (out.empty())
    throw ConfigError("parameters_matching: pattern \"" + pattern + "\" matches no " +
                      (trainable_only ? "trainable " : "") + "parameter of " + describe("module", module.name()));
  return out;
}

struct GroupRule {
  std::string pattern;  ///< regex matched against the whole dotted name
  double lr = 1e-3;
  double weight_decay = 0.0;
  std::string name;  ///< group name; defaults to the pattern
};

/// One group per rule (in rule order), then "default" (default_lr, default_weight_decay) for the
/// parameters no rule matched, if any.
template <class T>
std::vector<ParamGroup<T>> param_groups_by_rules(Module<T>& module, const std::vector<GroupRule>& rules,
                                                 double default_lr, double default_weight_decay,
                                                 bool trainable_only = false) {
  std::vector<Regex> res;
  std::vector<ParamGroup<T>> groups;
  for (const GroupRule& r : rules) {
    res.push_back(detail::compile_pattern(r.pattern, "param_groups_by_rules"));
    groups.push_back(ParamGroup<T>{{}, r.lr, r.weight_decay, r.name.empty() ? r.pattern : r.name});
  }
  ParamGroup<T> rest{{}, default_lr, default_weight_decay, "default"};
  module.visit_parameters([&](const std::string& name, Parameter<T>& p) {
    if (trainable_only && !p.trainable()) return;
    for (std::size_t i = 0; i < rules.size(); ++i) {
      if (regex_full_match(name, res[i], "param_groups_by_rules")) {
        groups[i].params.push_back({name, &p});
        return;
      }
    }
    rest.params.push_back({name, &p});
  });
  for (std::size_t i = 0; i < rules.size(); ++i)
    if (groups[i].params.empty())
      throw ConfigError("param_groups_by_rules: rule \"" + rules[i].pattern + "\" matches no " +
                        (trainable_only ? "trainable " : "") + "parameter of " + describe("module", module.name()) +
                        " not already taken by an earlier rule");
  if (!rest.params.empty()) groups.push_back(std::move(rest));
  return groups;
}

struct LayerRule {
  std::string pattern;  ///< regex matched against the whole dotted name
  Index layer = 0;      ///< layer index assigned to matching parameters
};

struct LayerwiseLrOptions {
  double base_lr = 1e-3;
  double decay = 0.8;    ///< in (0, 1]
  Index num_layers = 0;  ///< L > 0
  double weight_decay = 0.0;
  std::string layer_regex = R"((?:^|\.)layers\.(\d+)\.)";  ///< searched; capture 1 = index
  std::vector<LayerRule> fixed_layers;                     ///< for names without a layer index
  std::optional<Index> default_layer;                      ///< index for everything else; unset: num_layers
  std::string no_decay_pattern;                            ///< e.g. ".*bias|.*norm.*": weight decay 0 (empty: none)
  bool trainable_only = false;
};

/// Groups named "layer<i>" (and "layer<i>.no_decay") in increasing layer index, with
/// lr = base_lr · decay^(num_layers − i).
template <class T>
std::vector<ParamGroup<T>> layerwise_lr_groups(Module<T>& module, const LayerwiseLrOptions& o) {
  const char* who = "layerwise_lr_groups";
  if (o.num_layers <= 0)
    throw ConfigError(std::string(who) + ": num_layers must be > 0, got " + std::to_string(o.num_layers));
  if (!std::isfinite(o.decay) || o.decay <= 0.0 || o.decay > 1.0)
    throw ConfigError(std::string(who) + ": decay must be in (0, 1], got " + check::num(o.decay));
  if (!std::isfinite(o.base_lr) || o.base_lr < 0.0)
    throw ConfigError(std::string(who) + ": base_lr must be finite and >= 0, got " + check::num(o.base_lr));
  if (!std::isfinite(o.weight_decay) || o.weight_decay < 0.0)
    throw ConfigError(std::string(who) + ": weight_decay must be finite and >= 0, got " + check::num(o.weight_decay));
  const Regex layer_re = detail::compile_pattern(o.layer_regex, who);
  if (layer_re.group_count() < 1)
    throw ConfigError(std::string(who) + ": layer_regex \"" + o.layer_regex +
                      "\" has no capture group for the layer index");
  std::vector<Regex> fixed;
  for (const LayerRule& r : o.fixed_layers) fixed.push_back(detail::compile_pattern(r.pattern, who));
  std::vector<bool> fixed_used(fixed.size(), false);
  const bool has_no_decay = !o.no_decay_pattern.empty();
  const Regex no_decay_re = detail::compile_pattern(has_no_decay ? o.no_decay_pattern : "$^", who);
  bool no_decay_used = false;
  const Index default_layer = o.default_layer.value_or(o.num_layers);

  // key: (layer, no_decay) → group, ordered by layer then decay-before-no-decay
  std::map<std::pair<Index, bool>, ParamGroup<T>> by_layer;
  module.visit_parameters([&](const std::string& name, Parameter<T>& p) {
    if (o.trainable_only && !p.trainable()) return;
    Index layer = default_layer;
    RegexMatch m;
    if (regex_search_in(name, m, layer_re, who) && m[1].matched) {
      try {
        layer = static_cast<Index>(std::stoll(m[1].str()));
      } catch (const std::exception&) {
        throw ConfigError(std::string(who) + ": cannot read a layer index from \"" + m[1].str() + "\" in \"" + name +
                          "\"");
      }
      if (layer >= o.num_layers)  // blocks are layers.0 … layers.{L−1}
        throw ConfigError(std::string(who) + ": parameter \"" + name + "\" has layer index " + std::to_string(layer) +
                          ", expected < num_layers " + std::to_string(o.num_layers));
    } else {
      for (std::size_t i = 0; i < fixed.size(); ++i) {
        if (regex_full_match(name, fixed[i], who)) {
          layer = o.fixed_layers[i].layer;
          fixed_used[i] = true;
          break;
        }
      }
    }
    const bool nd = has_no_decay && regex_full_match(name, no_decay_re, who);
    no_decay_used = no_decay_used || nd;
    ParamGroup<T>& g = by_layer[{layer, nd}];
    if (g.params.empty()) {
      g.lr = o.base_lr * std::pow(o.decay, static_cast<double>(o.num_layers - layer));
      g.weight_decay = nd ? 0.0 : o.weight_decay;
      g.name = "layer" + std::to_string(layer) + (nd ? ".no_decay" : "");
    }
    g.params.push_back({name, &p});
  });
  for (std::size_t i = 0; i < fixed.size(); ++i)
    if (!fixed_used[i])
      throw ConfigError(std::string(who) + ": fixed_layers rule \"" + o.fixed_layers[i].pattern +
                        "\" matches no parameter without a layer index in " + describe("module", module.name()));
  if (has_no_decay && !no_decay_used)
    throw ConfigError(std::string(who) + ": no_decay_pattern \"" + o.no_decay_pattern + "\" matches no parameter of " +
                      describe("module", module.name()));
  if (by_layer.empty())
    throw ConfigError(std::string(who) + ": " + describe("module", module.name()) + " has no " +
                      (o.trainable_only ? "trainable " : "") + "parameters");
  std::vector<ParamGroup<T>> out;
  out.reserve(by_layer.size());
  for (auto& kv : by_layer) out.push_back(std::move(kv.second));
  return out;
}

}  // namespace peft
