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
//   3. modules_to_save (e.g. {"classifier"}): a module declared as ModulesToSave<T, M> (the
//      built-in classifier head; layers/modules_to_save.hpp) gets a trainable copy for this
//      adapter next to the frozen original, as PEFT's ModulesToSaveWrapper; any other module is
//      trained in place, shared by every adapter, and a warning (peft::warn) says so. As in
//      PEFT, a module to save is never itself targeted by LoRA / (IA)³.
//
// Several methods may be combined in one config (all are applied, in the order listed above).
// A selection that matches nothing throws ConfigError listing the available names.
//
// LoRA (with DoRA) and (IA)³ are rows of the method table (io/methods.hpp): apply_peft converts its
// part of the config into adapter_config.json's form (to_adapter_config below; the (IA)³ keys) and
// hands it to io::apply_method on the model's linears, the same code that applies, loads, saves and
// merges those methods on any model. Bottleneck adapters, prefix and prompt tuning stay here: they
// are not terms of a linear layer (no host of the table holds them).
//
// The in-memory config and adapter_config.json (io::AdapterConfig, io/peft_format.hpp) convert into
// each other here, in one place (to_adapter_config / to_peft_config); both hold the same selector
// (ModuleSelector) and pattern maps (PatternMap), so targeting means the same on both sides:
//
//   PeftConfig.lora.target_modules / exclude_modules   <->  target_modules / exclude_modules
//   PeftConfig.lora.lora.r / alpha / dropout           <->  r / lora_alpha / lora_dropout
//   PeftConfig.lora.lora.use_rslora / use_dora         <->  use_rslora / use_dora
//   PeftConfig.lora.lora.init                          <->  init_lora_weights: KaimingUniform = true,
//                                                           Gaussian = "gaussian", None = false
//   PeftConfig.lora.rank_pattern / alpha_pattern       <->  rank_pattern / alpha_pattern (same order)
//   PeftConfig.modules_to_save                         <->  modules_to_save
//
// An adapter_config.json describes one method: a PeftConfig with another method (bottleneck
// adapters, (IA)³, prefix or prompt tuning) or without LoRA is a ConfigError in
// to_adapter_config, and so is, in to_peft_config, a file whose settings apply_peft cannot honour
// (a non-LoRA peft_type, fan_in_fan_out, bias other than "none", an init other than the three above).
//
// Needs nlohmann-json (through io/methods.hpp), so it is not in the umbrella header.
#include <algorithm>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/parameters.hpp"
#include "peft/core/patterns.hpp"
#include "peft/core/targeting.hpp"
#include "peft/io/methods.hpp"
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
/// each other in one place: to_adapter_config / to_peft_config (below).
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
/// The adapter_config.json of a LoRA part (modules_to_save: the PeftConfig's).
inline io::AdapterConfig lora_adapter_config(const LoraTargetConfig& lc,
                                             const std::vector<std::string>& modules_to_save,
                                             const std::string& base_model = "") {
  io::AdapterConfig c;
  c.peft_type = "LORA";
  c.base_model_name_or_path = base_model;
  c.r = lc.lora.r;
  c.lora_alpha = lc.lora.alpha;
  c.lora_dropout = lc.lora.dropout;
  c.use_rslora = lc.lora.use_rslora;
  c.use_dora = lc.lora.use_dora;
  c.init_lora_weights = io::lora_init_json(lc.lora.init);
  c.target_modules = lc.target_modules;
  c.exclude_modules = lc.exclude_modules;
  c.rank_pattern = lc.rank_pattern;
  c.alpha_pattern = lc.alpha_pattern;
  c.modules_to_save = modules_to_save;
  return c;
}
}  // namespace detail

/// The adapter_config.json of `config`'s LoRA (see the file comment); `base_model` fills
/// base_model_name_or_path.
inline io::AdapterConfig to_adapter_config(const PeftConfig& config, const std::string& base_model = "") {
  const std::string who = "to_adapter_config";
  if (!config.lora)
    throw ConfigError(who + ": the PeftConfig has no LoRA part; an adapter_config.json here holds LoRA");
  const char* other = config.adapter  ? "bottleneck adapters"
                      : config.ia3    ? "(IA)^3"
                      : config.prefix ? "prefix tuning"
                      : config.prompt ? "prompt tuning"
                                      : nullptr;
  if (other)
    throw ConfigError(who + ": the PeftConfig combines LoRA with " + other +
                      "; an adapter_config.json describes one method");
  return detail::lora_adapter_config(*config.lora, config.modules_to_save, base_model);
}

/// The PeftConfig (LoRA only) that apply_peft needs to reproduce the adapter described by `c`
/// (see the file comment). `adapter_name` names the adapter in the model.
inline PeftConfig to_peft_config(const io::AdapterConfig& c, const std::string& adapter_name = "default") {
  const std::string who = "to_peft_config";
  if (!c.is_lora())
    throw ConfigError(who + ": peft_type is \"" + c.peft_type + "\", expected \"LORA\" (apply_peft takes such a " +
                      "config only as LoRA)");
  io::detail::check_lora_apply(c, who);
  LoraTargetConfig lc;
  lc.target_modules = c.target_modules;
  lc.exclude_modules = c.exclude_modules;
  lc.lora.r = c.r;
  lc.lora.alpha = c.lora_alpha;
  lc.lora.dropout = c.lora_dropout;
  lc.lora.use_rslora = c.use_rslora;
  lc.lora.use_dora = c.use_dora;
  lc.lora.init = io::lora_init_of(c.init_lora_weights, who);
  lc.rank_pattern = c.rank_pattern;
  lc.alpha_pattern = c.alpha_pattern;
  PeftConfig pc;
  pc.adapter_name = adapter_name;
  pc.lora = std::move(lc);
  pc.modules_to_save = c.modules_to_save;
  return pc;
}

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

  // Hosts (ModulesToSave) get a copy for this adapter; plain modules train in place (with a warning).
  const std::vector<SavedModule<T>> saved =
      resolve_modules_to_save(model, config.modules_to_save, config.adapter_name, who);
  model.freeze_all();

  // LoRA and (IA)³ through the method table, on this model's linears (it knows its head).
  auto slots = [&model] {
    std::vector<io::LinearSlot<T>> out;
    model.for_each_linear([&](const std::string& n, LoRALinear<T>& l, bool head) { out.push_back({n, &l, !head}); });
    return out;
  };
  if (config.lora)
    report.lora_modules = io::apply_method(slots(), detail::lora_adapter_config(*config.lora, config.modules_to_save),
                                           config.adapter_name, rng, who + " (LoRA)");

  if (config.adapter) model.add_adapters(config.adapter->placement, config.adapter->options, rng);

  if (config.ia3) {
    const IA3TargetConfig& ic = *config.ia3;
    const io::Json ia3 = {{"peft_type", "IA3"},
                          {"target_modules", io::selector_json(ic.target_modules)},
                          {"exclude_modules", io::selector_json(ic.exclude_modules)},
                          {"feedforward_modules", io::selector_json(ic.feedforward_modules)},
                          {"modules_to_save", config.modules_to_save}};
    const std::vector<io::LinearSlot<T>> at = slots();
    std::vector<std::vector<std::string>> active;  // each linear's active adapters before (IA)³ joins them
    for (const auto& s : at) active.push_back(s.host->active_adapters());
    report.ia3_modules = io::apply_method(at, ia3, config.adapter_name, rng, who + " ((IA)^3)");
    // This model scales keys and values in attention and fc2's input (the prefix is never scaled).
    for (const auto& key : report.ia3_modules) {
      const bool feedforward = ic.feedforward_modules.matches_linear_by_name(key);
      bool placed = false;
      for (std::size_t i = 0; i < model.layers.size() && !placed; ++i) {
        const std::string p = "layers." + std::to_string(i) + ".";
        placed = ((key == p + "attn.k_proj" || key == p + "attn.v_proj") && !feedforward) ||
                 (key == p + "ffn.fc2" && feedforward);
      }
      if (!placed)
        throw ConfigError(who + " ((IA)^3): cannot scale \"" + key + "\"" +
                          (feedforward ? " as a feed-forward module" : "") +
                          "; this model supports attn.k_proj, attn.v_proj (output scaling, not in feedforward_modules) "
                          "and ffn.fc2 (input scaling, in feedforward_modules)");
    }
    // (IA)³ joins the adapters active there (a LoRA adapter of the same config stays on).
    for (std::size_t i = 0; i < at.size(); ++i)
      if (std::find(report.ia3_modules.begin(), report.ia3_modules.end(), at[i].path) != report.ia3_modules.end()) {
        active[i].push_back(config.adapter_name);
        at[i].host->set_active(active[i]);
      }
  }

  // Prefix and prompt tuning add virtual tokens (not a term of a linear): they are not rows of the
  // method table and stay here, as do bottleneck adapters above.
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

  // modules_to_save: a ModulesToSave host gets this adapter's copy (active, trainable; the original
  // stays frozen); everything inside a plain module trains again, shared by every adapter.
  add_modules_to_save(saved, config.adapter_name, who);

  report.parameters = count_parameters(model);
  target = std::move(model);
  target.set_name(target.name());
  return report;
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_io.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_PEFT_CONFIG_TEMPLATES(KW, T) \
  KW template PeftReport apply_peft<T>(TransformerClassifier<T>&, const PeftConfig&, Rng&);
namespace peft {
PEFT_PEFT_CONFIG_TEMPLATES(extern, float)
PEFT_PEFT_CONFIG_TEMPLATES(extern, double)
}  // namespace peft
#endif
