#pragma once
// The one place where the in-memory config that apply_peft takes (PeftConfig, models/
// peft_config.hpp) and the adapter_config.json config (io::AdapterConfig, io/peft_format.hpp) are
// converted into each other. Both hold the same selector (ModuleSelector) and pattern maps
// (PatternMap), so targeting means the same on both sides; what is converted is the LoRA part:
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
// Needs nlohmann-json (through io/peft_format.hpp), so it is not in the umbrella header.
#include <string>

#include "peft/core/error.hpp"
#include "peft/core/targeting.hpp"
#include "peft/io/peft_format.hpp"
#include "peft/models/peft_config.hpp"

namespace peft {

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
  const LoraTargetConfig& lc = *config.lora;
  io::AdapterConfig c;
  c.peft_type = "LORA";
  c.base_model_name_or_path = base_model;
  c.r = lc.lora.r;
  c.lora_alpha = lc.lora.alpha;
  c.lora_dropout = lc.lora.dropout;
  c.use_rslora = lc.lora.use_rslora;
  c.use_dora = lc.lora.use_dora;
  switch (lc.lora.init) {
    case LoraInit::KaimingUniform: c.init_lora_weights = true; break;
    case LoraInit::Gaussian: c.init_lora_weights = "gaussian"; break;
    case LoraInit::None: c.init_lora_weights = false; break;
  }
  c.target_modules = lc.target_modules;
  c.exclude_modules = lc.exclude_modules;
  c.rank_pattern = lc.rank_pattern;
  c.alpha_pattern = lc.alpha_pattern;
  c.modules_to_save = config.modules_to_save;
  return c;
}

/// The PeftConfig (LoRA only) that apply_peft needs to reproduce the adapter described by `c`
/// (see the file comment). `adapter_name` names the adapter in the model.
inline PeftConfig to_peft_config(const io::AdapterConfig& c, const std::string& adapter_name = "default") {
  const std::string who = "to_peft_config";
  if (!c.is_lora())
    throw ConfigError(who + ": peft_type is \"" + c.peft_type + "\", expected \"LORA\" (apply_peft takes such a " +
                      "config only as LoRA)");
  if (c.fan_in_fan_out)
    throw ConfigError(who +
                      ": fan_in_fan_out = true describes a base stored [in, out] (GPT-2 Conv1D); "
                      "apply_peft's models store weights [out, in], expected false");
  if (c.bias != "none")
    throw ConfigError(who + ": bias = \"" + c.bias +
                      "\" trains biases, which apply_peft does not do; expected \"none\"");
  LoraTargetConfig lc;
  lc.target_modules = c.target_modules;
  lc.exclude_modules = c.exclude_modules;
  lc.lora.r = c.r;
  lc.lora.alpha = c.lora_alpha;
  lc.lora.dropout = c.lora_dropout;
  lc.lora.use_rslora = c.use_rslora;
  lc.lora.use_dora = c.use_dora;
  const io::Json& init = c.init_lora_weights;
  if (init.is_boolean())
    lc.lora.init = init.get<bool>() ? LoraInit::KaimingUniform : LoraInit::None;
  else if (init.is_string() && init.get<std::string>() == "gaussian")
    lc.lora.init = LoraInit::Gaussian;
  else
    throw ConfigError(who + ": init_lora_weights = " + init.dump().substr(0, 80) +
                      " is not supported; expected true, false or \"gaussian\"");
  lc.rank_pattern = c.rank_pattern;
  lc.alpha_pattern = c.alpha_pattern;
  PeftConfig pc;
  pc.adapter_name = adapter_name;
  pc.lora = std::move(lc);
  pc.modules_to_save = c.modules_to_save;
  return pc;
}

}  // namespace peft
