#pragma once
// Applying a PEFT configuration to a TransformerClassifier, the way Hugging Face PEFT's
// get_peft_model does it:
//
//   1. every existing parameter is frozen;
//   2. each configured method attaches its (trainable) parameters:
//        LoRA     — on the linears selected by target_modules / exclude_modules (core/targeting.hpp),
//                   r and alpha per module from rank_pattern / alpha_pattern (first match wins);
//        Adapter  — bottleneck adapters in every block at a placement (Houlsby / Pfeiffer / Parallel);
//        (IA)³    — target_modules among `k_proj`, `v_proj` (output scaling) and `fc2` (listed in
//                   feedforward_modules: input scaling), PEFT's IA3Config semantics;
//        prefix   — PrefixAttention over all layers (num_virtual_tokens, optional projection);
//        prompt   — SoftPrompt at the input (num_virtual_tokens, init RANDOM / token ids / vocab sample);
//   3. modules_to_save (e.g. {"classifier"}) become trainable again. PEFT wraps them in a
//      ModulesToSaveWrapper holding a trainable copy next to the frozen original; we train the
//      module in place instead (the original values are the caller's to keep if needed). As in
//      PEFT, a module to save is never itself targeted by LoRA / (IA)³.
//
// Several methods may be combined in one config (all are applied, in the order listed above).
// A selection that matches nothing throws ConfigError listing the available names.
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/parameters.hpp"
#include "peft/core/patterns.hpp"
#include "peft/core/targeting.hpp"
#include "peft/layers/lora_linear.hpp"
#include "peft/models/transformer.hpp"

namespace peft {

/// Hugging Face LoraConfig: target_modules, exclude_modules, r / lora_alpha / lora_dropout /
/// use_rslora / init_lora_weights (in `lora`), rank_pattern, alpha_pattern.
struct LoraTargetConfig {
  ModuleSelector target_modules;
  ModuleSelector exclude_modules;
  LoraConfig lora;
  PatternMap<int> rank_pattern;      ///< key → r, PEFT's get_pattern_key order (compiled once per key)
  PatternMap<double> alpha_pattern;  ///< key → lora_alpha
};

/// Bottleneck adapters (AdapterHub-style config): placement + size / reduction factor / init.
struct AdapterTargetConfig {
  AdapterPlacement placement = AdapterPlacement::Pfeiffer;
  AdapterOptions options;
};

/// Hugging Face IA3Config: target_modules and the subset feedforward_modules (input scaling).
struct IA3TargetConfig {
  ModuleSelector target_modules{"k_proj", "v_proj", "fc2"};
  ModuleSelector exclude_modules;
  ModuleSelector feedforward_modules{"fc2"};
};

/// Hugging Face PrefixTuningConfig.
struct PrefixTargetConfig {
  Index num_virtual_tokens = 10;
  bool prefix_projection = false;
  Index encoder_hidden_size = 0;  ///< required with prefix_projection
};

/// Hugging Face PromptTuningConfig (TEXT init takes already-tokenized ids).
struct PromptTargetConfig {
  Index num_virtual_tokens = 10;
  PromptInit init = PromptInit::Random;
  double scale = 1.0;                 ///< RANDOM: N(0, 1)·scale
  std::vector<Index> init_token_ids;  ///< FromTokens: ids whose embeddings seed the prompt
};

/// What apply_peft applies. Its LoRA part and adapter_config.json (io::AdapterConfig) convert into
/// each other in one place: to_adapter_config / to_peft_config (models/peft_config_io.hpp).
struct PeftConfig {
  std::string adapter_name = "default";
  std::optional<LoraTargetConfig> lora;
  std::optional<AdapterTargetConfig> adapter;
  std::optional<IA3TargetConfig> ia3;
  std::optional<PrefixTargetConfig> prefix;
  std::optional<PromptTargetConfig> prompt;
  std::vector<std::string> modules_to_save;  ///< exact or ".suffix" module names kept trainable
};

/// What apply_peft did.
struct PeftReport {
  std::vector<std::string> lora_modules;   ///< linears that got a LoRA adapter
  std::vector<std::string> ia3_modules;    ///< k_proj / v_proj / fc2 that got an (IA)³ vector
  std::vector<std::string> saved_modules;  ///< modules_to_save as resolved
  ParameterCount parameters;               ///< after application
};

namespace detail {
/// Every module path of the model, derived from its parameter names ("layers.0.norm1.weight" gives
/// "layers", "layers.0", "layers.0.norm1"), in first-seen order.
template <class T>
std::vector<std::string> module_names(Module<T>& model) {
  std::vector<std::string> out;
  model.visit_parameters([&](const std::string& name, Parameter<T>&) {
    for (std::size_t pos = name.find('.'); pos != std::string::npos; pos = name.find('.', pos + 1)) {
      const std::string m = name.substr(0, pos);
      bool seen = false;
      for (const auto& o : out) seen = seen || o == m;
      if (!seen) out.push_back(m);
    }
  });
  return out;
}
}  // namespace detail

/// Applies `config` to `model` (see file comment). Throws ConfigError on any selection that matches
/// nothing, on (IA)³ targets this model cannot scale, or on a prompt init that needs token input.
/// Strong guarantee: the work happens on a copy that replaces `model` only on success, so a
/// ConfigError leaves the model exactly as it was.
template <class T>
PeftReport apply_peft(TransformerClassifier<T>& target, const PeftConfig& config, Rng& rng) {
  const std::string who = "apply_peft";
  TransformerClassifier<T> model = target;
  PeftReport report;
  // Validate modules_to_save before touching the model.
  const std::vector<std::string> modules = detail::module_names(model);
  for (const auto& m : config.modules_to_save) {
    bool hit = false;
    for (const auto& key : modules)
      if (module_name_matches(key, m)) {
        hit = true;
        report.saved_modules.push_back(key);
      }
    if (!hit)
      throw ConfigError(who + ": modules_to_save entry \"" + m +
                        "\" matches no module; available modules: " + join_names(modules));
  }

  model.freeze_all();

  if (config.lora) {
    const LoraTargetConfig& lc = *config.lora;
    report.lora_modules = select_modules(model.linear_names(), lc.target_modules, lc.exclude_modules,
                                         config.modules_to_save, who + " (LoRA)");
    for (const auto& key : report.lora_modules) {
      LoraConfig c = lc.lora;
      if (const int* r = lc.rank_pattern.find(key, who + " rank_pattern")) c.r = *r;
      if (const double* a = lc.alpha_pattern.find(key, who + " alpha_pattern")) c.alpha = *a;
      model.linear(key).add_adapter(config.adapter_name, c, rng);
    }
  }

  if (config.adapter) model.add_adapters(config.adapter->placement, config.adapter->options, rng);

  if (config.ia3) {
    const IA3TargetConfig& ic = *config.ia3;
    report.ia3_modules = select_modules(model.linear_names(), ic.target_modules, ic.exclude_modules,
                                        config.modules_to_save, who + " ((IA)^3)");
    std::vector<char> keys(model.layers.size(), 0), values(model.layers.size(), 0), ffn(model.layers.size(), 0);
    for (const auto& key : report.ia3_modules) {
      const bool feedforward = ic.feedforward_modules.matches_linear_by_name(key);
      bool placed = false;
      for (std::size_t i = 0; i < model.layers.size() && !placed; ++i) {
        const std::string p = "layers." + std::to_string(i) + ".";
        if (key == p + "attn.k_proj" && !feedforward) keys[i] = placed = true;
        if (key == p + "attn.v_proj" && !feedforward) values[i] = placed = true;
        if (key == p + "ffn.fc2" && feedforward) ffn[i] = placed = true;
      }
      if (!placed)
        throw ConfigError(who + " ((IA)^3): cannot scale \"" + key + "\"" +
                          (feedforward ? " as a feed-forward module" : "") +
                          "; this model supports attn.k_proj, attn.v_proj (output scaling, not in feedforward_modules) "
                          "and ffn.fc2 (input scaling, in feedforward_modules)");
    }
    for (std::size_t i = 0; i < model.layers.size(); ++i) {
      if (keys[i] || values[i]) model.layers[i].attn.add_ia3(config.adapter_name, keys[i] != 0, values[i] != 0);
      if (ffn[i]) model.layers[i].ffn.add_ia3(config.adapter_name);
    }
  }

  if (config.prefix)
    model.add_prefix(config.prefix->num_virtual_tokens, rng, config.prefix->prefix_projection,
                     config.prefix->encoder_hidden_size);

  if (config.prompt) {
    const PromptTargetConfig& pc = *config.prompt;
    if (pc.init != PromptInit::Random && !model.token_input())
      throw ConfigError(who +
                        " (prompt tuning): init from token embeddings needs a token-input model; this one "
                        "takes features, use PromptInit::Random");
    SoftPrompt<T>& sp = model.add_soft_prompt(pc.num_virtual_tokens, rng, pc.scale);
    if (pc.init == PromptInit::FromTokens) sp.init_from_tokens(model.embed_tokens.weight.value, pc.init_token_ids);
    if (pc.init == PromptInit::SampleVocab) sp.init_from_vocab_sample(model.embed_tokens.weight.value, rng);
  }

  // modules_to_save: everything inside the resolved modules trains again.
  if (!report.saved_modules.empty())
    model.visit_parameters([&](const std::string& name, Parameter<T>& p) {
      for (const auto& m : report.saved_modules)
        if (name.compare(0, m.size() + 1, m + ".") == 0) p.set_trainable(true);
    });

  report.parameters = count_parameters(model);
  target = std::move(model);
  target.set_name(target.name());
  return report;
}

}  // namespace peft
