#pragma once
// Hugging Face PEFT adapter directories (adapter_config.json + adapter_model.safetensors), both
// directions, for LoRA (with rsLoRA / DoRA) and prompt / prefix tuning.
//
// Conventions, as in PEFT's save_and_load.py (get_peft_model_state_dict / set_peft_model_state_dict):
//   * tensor keys are the model's state-dict keys with the adapter name removed:
//       base_model.model.<path>.lora_A.weight   A [r, in]
//       base_model.model.<path>.lora_B.weight   B [out, r]
//       base_model.model.<path>.lora_magnitude_vector   DoRA m [out] (the ".weight" of the newer
//         ModuleDict layout is stripped on save, so it is accepted with or without it on load)
//       prompt_embeddings   [num_virtual_tokens · num_transformer_submodules, token_dim] (prompt
//         tuning; prefix tuning without projection: [num_virtual_tokens, num_layers · 2 · token_dim])
//     any other key (modules_to_save copies, biases with bias="all") is a full tensor.
//   * scaling s = lora_alpha / r, or lora_alpha / √r with use_rslora; ΔW = s · B A.
//   * rank_pattern / alpha_pattern: the first key k, in file order, for which the module path
//     matches the regex `(.*\.)?(k)$` from its start (PEFT's get_pattern_key) overrides r / alpha
//     (PatternMap, core/patterns.hpp: each key compiled once per config, tried once per module).
//   * target_modules / exclude_modules: peft::ModuleSelector (core/targeting.hpp), the same type
//     and rules as the in-memory PeftConfig: a string is a regex that must match the whole path
//     (re.fullmatch); a list matches a path equal to an entry or ending in "." + entry;
//     "all-linear" selects every linear layer but the output layer, which a file, knowing only
//     names, recognises with is_output_layer_name (`lm_head`, top-level `score` / `classifier`).
//   * fan_in_fan_out = true (GPT-2 Conv1D) stores the base weight as [in, out]: the factors are
//     unchanged and merging adds ΔWᵀ.
//
//   * prefix tuning with prefix_projection = true: PEFT saves the collapsed table (the output of
//     its PrefixEncoder's MLP, get_prompt_embedding_to_save), and loads it into a flat
//     Embedding when inference_mode is set; so does PrefixAttention::load_prompt_embeddings.
//
//   * modules_to_save: PEFT saves the trained copy of each listed module under the module's own
//     state-dict keys, the adapter name removed: base_model.model.<path>.weight / .bias. A module
//     declared as ModulesToSave (layers/modules_to_save.hpp) saves the copy of the adapter being
//     saved ("<path>.modules_to_save.<adapter>.weight" → "<path>.weight"; its original and other
//     adapters' copies are not saved), and a load puts those tensors into the copy of the adapter
//     being loaded, made from the original when missing; a plain module is saved and loaded as is.
//   * every tensor must be finite on load (NumericError naming the tensor and the file).
//
// Torn writes: rename(2) cannot replace a non-empty directory, and a directory may hold files of
// its own (a README, other adapters), so saving into an existing directory replaces the two files
// one at a time: the weights first, the config last. The config names the weights it belongs to,
//   "peft_cpp": {"weights_file": "adapter_model.safetensors", "weights_sha256": "<64 hex>"},
// and a loader refuses a pair whose weights hash differently (a crash between the two renames
// leaves new weights next to an old config: loading it would scale every delta by the old
// alpha / r). A config without the key (as PEFT writes it) loads unchecked. PEFT ≥ 0.14 drops
// the unknown key with a warning (PeftConfig.from_peft_type); older PEFT raises a TypeError on it.
//
// Strictness: a malformed config (bad JSON, a known key of the wrong type) is an IoError naming
// the file and the key; a feature that changes the math and that we do not implement (lora_bias,
// PiSSA / OLoRA / LoftQ / CorDA / LoRA-GA inits, which need a modified base, layer_replication,
// trainable tokens, aLoRA invocation tokens, Arrow routing, block-diagonal or Monte Carlo LoRA,
// other peft types) is a ConfigError and nothing is loaded. Keys we do not know are kept (written
// back unchanged on save) and listed in AdapterConfig::unknown_keys, except that an unknown
// `use_*` = true or a non-empty unknown `*_config` object is taken for a feature we do not know
// and refused: loading it as plain LoRA would silently compute something else.
#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/module.hpp"
#include "peft/core/patterns.hpp"
#include "peft/core/regex.hpp"
#include "peft/core/separate.hpp"
#include "peft/core/sha256.hpp"
#include "peft/core/targeting.hpp"
#include "peft/core/types.hpp"
#include "peft/core/warnings.hpp"
#include "peft/io/file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/layers/lora_linear.hpp"
#include "peft/layers/modules_to_save.hpp"

namespace peft::io {

constexpr const char* kAdapterConfigFile = "adapter_config.json";
constexpr const char* kAdapterWeightsFile = "adapter_model.safetensors";
constexpr const char* kPeftKeyPrefix = "base_model.model.";
constexpr const char* kPeftCppConfigKey = "peft_cpp";  ///< our namespace in adapter_config.json

struct AdapterConfig {
  std::string peft_type = "LORA";
  std::string task_type;
  std::string base_model_name_or_path;
  // LoRA
  int r = 8;
  double lora_alpha = 8.0;
  double lora_dropout = 0.0;
  bool use_rslora = false;
  bool use_dora = false;
  bool fan_in_fan_out = false;
  bool lora_bias = false;
  std::string bias = "none";
  ModuleSelector target_modules;
  ModuleSelector exclude_modules;
  LayerFilter layers;            ///< layers_to_transform / layers_pattern (core/targeting.hpp)
  PatternMap<int> rank_pattern;  ///< file order matters
  PatternMap<double> alpha_pattern;
  std::vector<std::string> modules_to_save;
  Json init_lora_weights = true;
  // prompt / prefix tuning
  int num_virtual_tokens = 0;
  int token_dim = 0;
  int num_layers = 0;
  int num_attention_heads = 0;
  int num_transformer_submodules = 1;
  bool prefix_projection = false;

  /// SHA-256 of adapter_model.safetensors as the config states it ("peft_cpp" object); empty when
  /// the config has none (PEFT's own). Loading checks it; saving writes the digest of the new file.
  std::string weights_sha256;

  Json raw = Json::object();  ///< the file as read; unknown keys survive a save
  std::vector<std::string> unknown_keys;

  bool is_lora() const { return peft_type == "LORA"; }
  bool is_prompt() const { return peft_type == "PROMPT_TUNING" || peft_type == "PREFIX_TUNING"; }

  /// r and lora_alpha for the module at `path` (rank_pattern / alpha_pattern, PEFT's
  /// get_pattern_key): each pattern is tried once.
  int rank_for(const std::string& path) const {
    const int* v = rank_pattern.find(path, "adapter config: rank_pattern");
    return v ? *v : r;
  }
  double alpha_for(const std::string& path) const {
    const double* v = alpha_pattern.find(path, "adapter config: alpha_pattern");
    return v ? *v : lora_alpha;
  }
  /// s = alpha / r, or alpha / √r with use_rslora.
  double scaling_of(int rank, double alpha) const {
    return use_rslora ? alpha / std::sqrt(static_cast<double>(rank)) : alpha / static_cast<double>(rank);
  }
  double scaling_for(const std::string& path) const { return scaling_of(rank_for(path), alpha_for(path)); }
  /// What to pass to LoRALinear::add_adapter for the module at `path`.
  LoraConfig lora_config_for(const std::string& path) const {
    LoraConfig c;
    c.r = rank_for(path);
    c.alpha = alpha_for(path);
    c.dropout = lora_dropout;
    c.use_rslora = use_rslora;
    c.use_dora = use_dora;
    return c;
  }
  /// Whether PEFT would put an adapter on the linear at `path` (module_targeted: target_modules, not
  /// exclude_modules, not inside modules_to_save); "all-linear" leaves out the output layer, known
  /// here by name only (is_output_layer_name).
  bool targets(const std::string& path) const {
    return module_targeted(path, !is_output_layer_name(path), target_modules, exclude_modules, modules_to_save, layers);
  }
};

/// Parses and validates an adapter_config.json object. `label` names the file in errors.
PEFT_SEPARATE_INLINE AdapterConfig parse_adapter_config(const Json& j, const std::string& label);
/// Reads `path` (strict JSON, peft/io/json.hpp) and parses it as above.
PEFT_SEPARATE_INLINE AdapterConfig read_adapter_config(const std::string& path);
/// The config as JSON: the keys read from the file (unknown ones too), updated with the fields.
PEFT_SEPARATE_INLINE Json to_json(const AdapterConfig& c);

#if PEFT_SEPARATE_BODIES  // (peft/core/separate.hpp)
namespace detail {

inline const std::vector<std::string>& known_config_keys() {
  // Keys we read, plus keys that do not change the math of a trained adapter (bookkeeping,
  // target selection already reflected in the saved tensors, initialisation-only options).
  static const std::vector<std::string> k = {"peft_type",
                                             "task_type",
                                             "base_model_name_or_path",
                                             "r",
                                             "lora_alpha",
                                             "lora_dropout",
                                             "use_rslora",
                                             "use_dora",
                                             "fan_in_fan_out",
                                             "lora_bias",
                                             "bias",
                                             "target_modules",
                                             "exclude_modules",
                                             "rank_pattern",
                                             "alpha_pattern",
                                             "modules_to_save",
                                             "init_lora_weights",
                                             "num_virtual_tokens",
                                             "token_dim",
                                             "num_layers",
                                             "num_attention_heads",
                                             "num_transformer_submodules",
                                             "prefix_projection",
                                             "encoder_hidden_size",
                                             "layers_to_transform",
                                             "layers_pattern",
                                             "layer_replication",
                                             "revision",
                                             "inference_mode",
                                             "auto_mapping",
                                             "megatron_config",
                                             "megatron_core",
                                             "loftq_config",
                                             "eva_config",
                                             "corda_config",
                                             "runtime_config",
                                             "use_qalora",
                                             "qalora_group_size",
                                             "trainable_token_indices",
                                             "target_parameters",
                                             "peft_version",
                                             "prompt_tuning_init",
                                             "prompt_tuning_init_text",
                                             "tokenizer_name_or_path",
                                             "tokenizer_kwargs",
                                             "ensure_weight_tying",
                                             "velora_config",
                                             "lora_ga_config",
                                             "alora_invocation_tokens",
                                             "arrow_config",
                                             "use_bdlora",
                                             "bdlora_config",
                                             "monteclora_config",
                                             kPeftCppConfigKey};
  return k;
}

struct ConfigReader {
  const Json& j;
  std::string label;

  [[noreturn]] void bad(const std::string& key, const char* expected) const {
    throw IoError("\"" + label + "\": key \"" + key + "\" must be " + expected + ", got " + j.at(key).dump());
  }
  bool has(const std::string& key) const { return j.contains(key) && !j.at(key).is_null(); }

  void get(const std::string& key, std::string& out) const {
    if (!has(key)) return;
    if (!j.at(key).is_string()) bad(key, "a string");
    out = j.at(key).get<std::string>();
  }
  void get(const std::string& key, bool& out) const {
    if (!has(key)) return;
    if (!j.at(key).is_boolean()) bad(key, "true or false");
    out = j.at(key).get<bool>();
  }
  void get(const std::string& key, int& out, int lo) const {
    if (!has(key)) return;
    const Json& v = j.at(key);
    if (!v.is_number_integer() || v.get<std::int64_t>() < lo || v.get<std::int64_t>() > (1 << 30))
      bad(key, lo > 0 ? "a positive integer" : "a non-negative integer");
    out = static_cast<int>(v.get<std::int64_t>());
  }
  void get(const std::string& key, double& out) const {
    if (!has(key)) return;
    const Json& v = j.at(key);
    if (!v.is_number() || !std::isfinite(v.get<double>())) bad(key, "a finite number");
    out = v.get<double>();
  }
  void get(const std::string& key, ModuleSelector& out) const {
    if (!has(key)) return;
    const Json& v = j.at(key);
    if (v.is_string()) {
      try {
        out = ModuleSelector::pattern(v.get<std::string>(), "adapter config: " + key);  // compiled once, here
      } catch (const ConfigError& e) {
        throw IoError("\"" + label + "\": key \"" + key + "\" is not a valid regular expression (" + e.what() + ")");
      }
      return;
    }
    if (!v.is_array()) bad(key, "a string or a list of strings");
    std::vector<std::string> names;
    for (const Json& e : v) {
      if (!e.is_string()) bad(key, "a string or a list of strings");
      names.push_back(e.get<std::string>());
    }
    out = ModuleSelector::list(std::move(names));
  }
  void get(const std::string& key, std::vector<std::string>& out) const {
    if (!has(key)) return;
    const Json& v = j.at(key);
    if (!v.is_array()) bad(key, "a list of strings");
    for (const Json& e : v) {
      if (!e.is_string()) bad(key, "a list of strings");
      out.push_back(e.get<std::string>());
    }
  }
  /// layers_to_transform (an index or a list of indexes >= 0) and layers_pattern (a regex or a list).
  void get_layers(LayerFilter& out) const {
    std::vector<long long> indexes;
    if (has("layers_to_transform")) {
      const Json& v = j.at("layers_to_transform");
      auto index = [&](const Json& e) {
        if (!e.is_number_integer() || e.get<std::int64_t>() < 0 || e.get<std::int64_t>() > (1 << 30))
          bad("layers_to_transform", "a non-negative integer or a list of them");
        indexes.push_back(e.get<std::int64_t>());
      };
      if (v.is_array())
        for (const Json& e : v) index(e);
      else
        index(v);
    }
    std::vector<std::string> patterns;
    if (has("layers_pattern")) {
      const Json& v = j.at("layers_pattern");
      if (v.is_string())
        patterns.push_back(v.get<std::string>());
      else
        get("layers_pattern", patterns);
    }
    try {
      out = LayerFilter(std::move(indexes), patterns, "adapter config: layers_pattern");
    } catch (const ConfigError& e) {
      throw IoError("\"" + label + "\": key \"layers_pattern\" is not a valid regular expression (" + e.what() + ")");
    }
  }
  template <class V>
  void get_pattern(const std::string& key, PatternMap<V>& out, bool integer) const {
    if (!has(key)) return;
    const Json& v = j.at(key);
    if (!v.is_object()) bad(key, integer ? "an object of positive integers" : "an object of numbers");
    for (auto it = v.begin(); it != v.end(); ++it) {
      const Json& x = it.value();
      const bool ok = integer
                          ? (x.is_number_integer() && x.get<std::int64_t>() > 0 && x.get<std::int64_t>() <= (1 << 30))
                          : (x.is_number() && std::isfinite(x.get<double>()) && x.get<double>() > 0);
      if (!ok)
        throw IoError("\"" + label + "\": key \"" + key + "\" entry \"" + it.key() + "\" must be " +
                      (integer ? "a positive integer" : "a positive number") + ", got " + x.dump());
      try {
        out.add(it.key(), x.get<V>(), key);  // compiled here, once for the life of the config
      } catch (const ConfigError& e) {
        throw IoError("\"" + label + "\": key \"" + key + "\" entry \"" + it.key().substr(0, 80) +
                      "\" is not a valid regular expression (" + e.what() + ")");
      }
    }
  }
};

}  // namespace detail

PEFT_SEPARATE_INLINE AdapterConfig parse_adapter_config(const Json& j, const std::string& label) {
  if (!j.is_object()) throw IoError("\"" + label + "\": adapter config must be a JSON object");
  AdapterConfig c;
  c.raw = j;
  const detail::ConfigReader rd{j, label};
  if (!rd.has("peft_type")) throw IoError("\"" + label + "\": missing key \"peft_type\"");
  rd.get("peft_type", c.peft_type);
  rd.get("task_type", c.task_type);
  rd.get("base_model_name_or_path", c.base_model_name_or_path);
  const std::string who = "\"" + label + "\"";
  if (rd.has(kPeftCppConfigKey)) {
    const Json& ours = j.at(kPeftCppConfigKey);
    if (!ours.is_object()) rd.bad(kPeftCppConfigKey, "an object");
    if (ours.contains("weights_file")) {
      const Json& f = ours.at("weights_file");
      if (!f.is_string() || f.get<std::string>() != kAdapterWeightsFile)
        throw IoError(who + ": key \"" + kPeftCppConfigKey + "\" entry \"weights_file\" must be \"" +
                      kAdapterWeightsFile + "\", got " + f.dump().substr(0, 80));
    }
    if (ours.contains("weights_sha256")) {
      const Json& h = ours.at("weights_sha256");
      const bool ok = h.is_string() && h.get<std::string>().size() == 64 &&
                      h.get<std::string>().find_first_not_of("0123456789abcdef") == std::string::npos;
      if (!ok)
        throw IoError(who + ": key \"" + kPeftCppConfigKey +
                      "\" entry \"weights_sha256\" must be 64 lower-case hex digits, got " + h.dump().substr(0, 80));
      c.weights_sha256 = h.get<std::string>();
    }
  }
  for (auto it = j.begin(); it != j.end(); ++it) {
    const auto& known = detail::known_config_keys();
    if (std::find(known.begin(), known.end(), it.key()) != known.end()) continue;
    const std::string& k = it.key();
    const bool enables = k.rfind("use_", 0) == 0 && it.value().is_boolean() && it.value().get<bool>();
    const bool configures =
        k.size() > 7 && k.compare(k.size() - 7, 7, "_config") == 0 && it.value().is_object() && !it.value().empty();
    if (enables || configures)
      throw ConfigError(who + ": unknown key \"" + k + "\" = " + it.value().dump().substr(0, 80) +
                        " looks like a feature this version does not implement; refusing the adapter rather than "
                        "loading it as plain " +
                        c.peft_type);
    c.unknown_keys.push_back(k);
  }
  if (c.is_lora()) {
    rd.get("r", c.r, 1);
    rd.get("lora_alpha", c.lora_alpha);
    rd.get("lora_dropout", c.lora_dropout);
    rd.get("use_rslora", c.use_rslora);
    rd.get("use_dora", c.use_dora);
    rd.get("fan_in_fan_out", c.fan_in_fan_out);
    rd.get("lora_bias", c.lora_bias);
    rd.get("bias", c.bias);
    rd.get("target_modules", c.target_modules);
    rd.get("exclude_modules", c.exclude_modules);
    rd.get_pattern("rank_pattern", c.rank_pattern, true);
    rd.get_pattern("alpha_pattern", c.alpha_pattern, false);
    rd.get("modules_to_save", c.modules_to_save);
    rd.get_layers(c.layers);
    if (rd.has("init_lora_weights")) {
      const Json& v = j.at("init_lora_weights");
      if (!v.is_boolean() && !v.is_string()) rd.bad("init_lora_weights", "true, false or a string");
      c.init_lora_weights = v;
    }
    if (!(c.lora_alpha > 0))
      throw IoError(who + ": key \"lora_alpha\" must be > 0, got " + std::to_string(c.lora_alpha));
    if (!(c.lora_dropout >= 0 && c.lora_dropout < 1))
      throw IoError(who + ": key \"lora_dropout\" must be in [0, 1), got " + std::to_string(c.lora_dropout));
    // Features that change the math and that we do not implement: refuse the whole adapter.
    if (c.lora_bias) throw ConfigError(who + ": lora_bias = true (a bias on lora_B) is not supported");
    if (c.bias != "none" && c.bias != "all" && c.bias != "lora_only")
      throw IoError(who + ": key \"bias\" must be \"none\", \"all\" or \"lora_only\", got \"" + c.bias + "\"");
    if (c.use_dora && c.fan_in_fan_out)
      throw ConfigError(who + ": use_dora together with fan_in_fan_out = true is not supported");
    if (c.init_lora_weights.is_string()) {
      const std::string init = c.init_lora_weights.get<std::string>();
      for (const char* p : {"pissa", "olora", "loftq", "corda", "lora_ga"})
        if (init.rfind(p, 0) == 0)
          throw ConfigError(who + ": init_lora_weights = \"" + init +
                            "\" modifies the base weights; such an adapter is not supported (convert it to plain "
                            "LoRA in PEFT first)");
    }
    // Keys that switch on a feature we do not implement: refused when set (not null, false or empty).
    static const std::pair<const char*, const char*> kRefused[] = {
        {"layer_replication", "layer_replication"},
        {"trainable_token_indices", "trainable_token_indices"},
        {"use_qalora", "use_qalora = true"},
        {"target_parameters", "target_parameters (LoRA on raw parameters)"},
        {"alora_invocation_tokens",
         "alora_invocation_tokens (activated LoRA: the adapter applies only after the "
         "invocation tokens)"},
        {"arrow_config", "arrow_config (Arrow routing between LoRA experts)"},
        {"use_bdlora", "block-diagonal LoRA (BD-LoRA)"},
        {"bdlora_config", "block-diagonal LoRA (BD-LoRA)"},
        {"monteclora_config", "monteclora_config (Monte Carlo LoRA)"},
    };
    for (const auto& [key, feature] : kRefused) {
      if (!rd.has(key)) continue;
      const Json& v = j.at(key);
      const bool off =
          (v.is_boolean() && !v.get<bool>()) || ((v.is_array() || v.is_object() || v.is_string()) && v.empty());
      if (!off) throw ConfigError(who + ": " + feature + " is not supported");
    }
  } else if (c.is_prompt()) {
    rd.get("num_virtual_tokens", c.num_virtual_tokens, 1);
    rd.get("token_dim", c.token_dim, 1);
    rd.get("num_layers", c.num_layers, 1);
    rd.get("num_attention_heads", c.num_attention_heads, 1);
    rd.get("num_transformer_submodules", c.num_transformer_submodules, 1);
    rd.get("prefix_projection", c.prefix_projection);
    rd.get("modules_to_save", c.modules_to_save);
    if (c.num_virtual_tokens <= 0) throw IoError(who + ": key \"num_virtual_tokens\" is required and must be > 0");
  } else {
    throw ConfigError(who + ": peft_type \"" + c.peft_type +
                      "\" is not supported (supported: LORA, PROMPT_TUNING, PREFIX_TUNING)");
  }
  return c;
}

PEFT_SEPARATE_INLINE AdapterConfig read_adapter_config(const std::string& path) {
  const std::string text = read_text_file(path);
  return parse_adapter_config(parse_json_strict(text, path), path);
}
#endif  // PEFT_SEPARATE_BODIES

/// A selector as adapter_config.json writes it: null, a string (regex or "all-linear") or a list.
inline Json selector_json(const ModuleSelector& s) {
  if (!s.present()) return Json();
  if (s.form() == ModuleSelector::Form::String) return Json(s.text());
  return Json(s.names());
}

/// init_lora_weights as LoraInit: true = KaimingUniform, "gaussian" = Gaussian, false = None;
/// ConfigError naming `who` for anything else (PiSSA, OLoRA, ... modify the base).
inline LoraInit lora_init_of(const Json& init, const std::string& who) {
  if (init.is_boolean()) return init.get<bool>() ? LoraInit::KaimingUniform : LoraInit::None;
  if (init.is_string() && init.get<std::string>() == "gaussian") return LoraInit::Gaussian;
  throw ConfigError(who + ": init_lora_weights = " + init.dump().substr(0, 80) +
                    " is not supported; expected true, false or \"gaussian\"");
}
/// The inverse of lora_init_of.
inline Json lora_init_json(LoraInit init) {
  switch (init) {
    case LoraInit::KaimingUniform: return true;
    case LoraInit::Gaussian: return "gaussian";
    case LoraInit::None: return false;
  }
  return true;
}

#if PEFT_SEPARATE_BODIES
PEFT_SEPARATE_INLINE Json to_json(const AdapterConfig& c) {
  Json j = c.raw.is_object() ? c.raw : Json::object();
  j["peft_type"] = c.peft_type;
  if (!c.task_type.empty()) j["task_type"] = c.task_type;
  j["base_model_name_or_path"] = c.base_model_name_or_path.empty() ? Json() : Json(c.base_model_name_or_path);
  auto selector = [](const ModuleSelector& s) { return selector_json(s); };
  if (c.is_lora()) {
    j["r"] = c.r;
    j["lora_alpha"] = c.lora_alpha;
    j["lora_dropout"] = c.lora_dropout;
    j["use_rslora"] = c.use_rslora;
    j["use_dora"] = c.use_dora;
    j["fan_in_fan_out"] = c.fan_in_fan_out;
    j["lora_bias"] = c.lora_bias;
    j["bias"] = c.bias;
    j["target_modules"] = selector(c.target_modules);
    j["exclude_modules"] = selector(c.exclude_modules);
    Json rp = Json::object();
    for (const auto& kv : c.rank_pattern) rp[kv.first] = kv.second;
    j["rank_pattern"] = rp;
    Json ap = Json::object();
    for (const auto& kv : c.alpha_pattern) ap[kv.first] = kv.second;
    j["alpha_pattern"] = ap;
    j["init_lora_weights"] = c.init_lora_weights;
  } else {
    j["num_virtual_tokens"] = c.num_virtual_tokens;
    j["token_dim"] = c.token_dim;
    j["num_layers"] = c.num_layers;
    j["num_attention_heads"] = c.num_attention_heads;
    j["num_transformer_submodules"] = c.num_transformer_submodules;
  }
  j["modules_to_save"] = c.modules_to_save.empty() ? Json() : Json(c.modules_to_save);
  if (c.weights_sha256.empty()) {
    j.erase(kPeftCppConfigKey);
  } else {
    Json ours =
        j.contains(kPeftCppConfigKey) && j.at(kPeftCppConfigKey).is_object() ? j.at(kPeftCppConfigKey) : Json::object();
    ours["weights_file"] = kAdapterWeightsFile;
    ours["weights_sha256"] = c.weights_sha256;
    j[kPeftCppConfigKey] = ours;
  }
  return j;
}
#endif  // PEFT_SEPARATE_BODIES

/// One LoRA-adapted module: ΔW = scaling · B A (DoRA: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row).
template <class T>
struct LoraModuleWeights {
  std::string path;     ///< PEFT module path, without "base_model.model."
  Matrix<T> A;          ///< [r, in]
  Matrix<T> B;          ///< [out, r]
  Matrix<T> magnitude;  ///< DoRA m as [1, out]; empty without DoRA
  double alpha = 0.0;
  double scaling = 0.0;
  Index rank() const { return A.rows(); }
};

/// A full tensor carried by the adapter (modules_to_save, biases), by model-relative name.
template <class T>
struct FullTensor {
  std::string name;
  std::vector<std::int64_t> shape;
  Matrix<T> value;
};

template <class T>
struct PeftAdapter {
  AdapterConfig config;
  std::vector<LoraModuleWeights<T>> lora;  ///< sorted by path
  Matrix<T> prompt_embeddings;             ///< prompt / prefix tuning; empty otherwise
  std::vector<FullTensor<T>> full;         ///< other tensors
  std::vector<std::string> warnings;       ///< e.g. a module target_modules does not select; also sent to peft::warn

  const LoraModuleWeights<T>* find(const std::string& path) const {
    for (const auto& m : lora)
      if (m.path == path) return &m;
    return nullptr;
  }
};

namespace detail {
/// `name` without PEFT's wrapper level: "fc1.base_layer.bias" → "fc1.bias" (a whole "base_layer"
/// component, anywhere).
inline std::string unwrap_base_layer(std::string name) {
  static const std::string part = "base_layer";
  for (std::size_t at = name.find(part); at != std::string::npos; at = name.find(part, at)) {
    const bool starts = at == 0 || name[at - 1] == '.';
    const std::size_t end = at + part.size();
    if (starts && end < name.size() && name[end] == '.') {
      name.erase(at, part.size() + 1);
    } else {
      at = end;
    }
  }
  return name;
}

inline bool ends_with(const std::string& s, const std::string& suffix, std::string* head = nullptr) {
  if (s.size() < suffix.size() || s.compare(s.size() - suffix.size(), suffix.size(), suffix) != 0) return false;
  if (head) *head = s.substr(0, s.size() - suffix.size());
  return true;
}

/// Loads tensor `key` and refuses a NaN or Inf in it (also one produced by the conversion to T,
/// e.g. a float64 1e300 read as float), naming the tensor, the file and the first bad element.
template <class T>
Matrix<T> load_finite(const SafeTensorsFile& st, const std::string& key) {
  Matrix<T> m = st.load<T>(key);
  if (all_finite(m)) return m;
  for (Index i = 0; i < m.rows(); ++i)
    for (Index k = 0; k < m.cols(); ++k)
      if (!std::isfinite(static_cast<double>(m(i, k))))
        throw NumericError("\"" + st.path() + "\": tensor \"" + key + "\" holds " +
                           (std::isnan(static_cast<double>(m(i, k))) ? "NaN" : "Inf") + " (a NaN or Inf value) at [" +
                           std::to_string(i) + ", " + std::to_string(k) + "]");
  return m;
}
}  // namespace detail

/// Builds and validates an adapter from a config and a safetensors file's tensors.
template <class T>
PeftAdapter<T> adapter_from_file(const AdapterConfig& config, const SafeTensorsFile& st) {
  PeftAdapter<T> ad;
  ad.config = config;
  const std::string who = "\"" + st.path() + "\"";
  std::map<std::string, LoraModuleWeights<T>> mods;
  for (const TensorInfo& t : st.tensors()) {
    if (!dtype_is_float(t.dtype))
      throw IoError(who + ": tensor \"" + t.name + "\" has dtype " + dtype_name(t.dtype) + ", expected a float type");
    if (t.name == "prompt_embeddings") {
      if (!config.is_prompt())
        throw ConfigError(who + ": tensor \"prompt_embeddings\" in a " + config.peft_type + " adapter");
      ad.prompt_embeddings = detail::load_finite<T>(st, t.name);
      continue;
    }
    std::string rest = t.name;
    if (rest.rfind(kPeftKeyPrefix, 0) == 0) rest = rest.substr(std::char_traits<char>::length(kPeftKeyPrefix));
    std::string path;
    if (config.is_lora()) {
      const bool is_a = detail::ends_with(rest, ".lora_A.weight", &path);
      const bool is_b = !is_a && detail::ends_with(rest, ".lora_B.weight", &path);
      const bool is_m = !is_a && !is_b &&
                        (detail::ends_with(rest, ".lora_magnitude_vector", &path) ||
                         detail::ends_with(rest, ".lora_magnitude_vector.weight", &path));
      if (is_a || is_b || is_m) {
        if (t.name.rfind(kPeftKeyPrefix, 0) != 0)
          throw IoError(who + ": tensor \"" + t.name + "\" lacks the \"" + kPeftKeyPrefix + "\" prefix PEFT writes");
        if (is_m && !config.use_dora)
          throw ConfigError(who + ": tensor \"" + t.name +
                            "\" is a DoRA magnitude but the config has use_dora = false");
        const bool shape_ok = is_m ? t.shape.size() == 1 : t.shape.size() == 2;
        if (!shape_ok)
          throw ShapeError(who + ": tensor \"" + t.name + "\" has shape " + t.shape_string() + ", expected " +
                           (is_m ? "[out]" : "a matrix"));
        LoraModuleWeights<T>& m = mods[path];
        m.path = path;
        Matrix<T>& slot = is_a ? m.A : is_b ? m.B : m.magnitude;
        if (slot.size() != 0)  // e.g. both "...lora_magnitude_vector" and "...lora_magnitude_vector.weight"
          throw IoError(who + ": tensor \"" + t.name + "\" is a second " +
                        (is_a   ? "lora_A"
                         : is_b ? "lora_B"
                                : "lora_magnitude_vector") +
                        " for module \"" + path + "\"");
        slot = detail::load_finite<T>(st, t.name);
        continue;
      }
      if (rest.find("lora_") != std::string::npos)
        throw ConfigError(
            who + ": tensor \"" + t.name +
            "\" is a LoRA tensor of a kind we do not support (lora_B bias, embedding or convolution LoRA)");
    }
    // PEFT names the base layer of a linear it wraps "<path>.base_layer" (a bias saved with bias =
    // "all" / "lora_only": "<path>.base_layer.bias"); the model's own name has no such level.
    rest = detail::unwrap_base_layer(rest);
    for (const auto& other : ad.full)  // "x" and "base_model.model.x" name the same tensor
      if (other.name == rest)
        throw IoError(who + ": tensor \"" + t.name + "\" names \"" + rest + "\", which another tensor already holds");
    FullTensor<T> f{rest, t.shape, detail::load_finite<T>(st, t.name)};
    ad.full.push_back(std::move(f));
  }
  for (auto& kv : mods) {
    LoraModuleWeights<T>& m = kv.second;
    const std::string mw = who + ": module \"" + m.path + "\"";
    if (m.A.size() == 0 && m.B.size() == 0) throw ConfigError(mw + ": has a magnitude but no lora_A / lora_B");
    if (m.A.rows() == 0 || m.A.cols() == 0) throw ConfigError(mw + ": lora_A.weight is missing or empty");
    if (m.B.rows() == 0 || m.B.cols() == 0) throw ConfigError(mw + ": lora_B.weight is missing or empty");
    if (m.B.cols() != m.A.rows())
      throw ShapeError(mw + ": lora_B " + shape_str(m.B) + " does not fit lora_A " + shape_str(m.A) +
                       " (ranks differ)");
    // One pattern lookup per module: r and alpha are each resolved once.
    const int r = config.rank_for(m.path);
    if (m.A.rows() != r)
      throw ShapeError(mw + ": lora_A has rank " + std::to_string(m.A.rows()) +
                       ", but the config (r / rank_pattern) says " + std::to_string(r));
    if (config.use_dora && m.magnitude.size() == 0)
      throw ConfigError(mw + ": use_dora = true but lora_magnitude_vector is missing");
    if (m.magnitude.size() != 0 && m.magnitude.cols() != m.B.rows())
      throw ShapeError(mw + ": lora_magnitude_vector has " + std::to_string(m.magnitude.cols()) +
                       " entries, expected " + std::to_string(m.B.rows()) + " (out features)");
    m.alpha = config.alpha_for(m.path);
    m.scaling = config.scaling_of(r, m.alpha);
    if (config.target_modules.present() && !config.targets(m.path))
      ad.warnings.push_back("module \"" + m.path +
                            "\" is not selected by target_modules / exclude_modules / modules_to_save");
    ad.lora.push_back(std::move(m));
  }
  if (config.is_lora() && ad.lora.empty()) throw ConfigError(who + ": LoRA adapter holds no lora_A / lora_B tensors");
  if (config.is_prompt()) {
    if (ad.prompt_embeddings.size() == 0)
      throw ConfigError(who + ": prompt adapter has no \"prompt_embeddings\" tensor");
    const Index expected_rows =
        static_cast<Index>(config.num_virtual_tokens) *
        (config.peft_type == "PROMPT_TUNING" ? static_cast<Index>(config.num_transformer_submodules) : 1);
    if (ad.prompt_embeddings.rows() != expected_rows)
      throw ShapeError(who + ": prompt_embeddings has " + std::to_string(ad.prompt_embeddings.rows()) +
                       " rows, expected " + std::to_string(expected_rows) + " (num_virtual_tokens" +
                       (config.peft_type == "PROMPT_TUNING" ? " · num_transformer_submodules)" : ")"));
    const Index expected_cols = config.peft_type == "PROMPT_TUNING"
                                    ? static_cast<Index>(config.token_dim)
                                    : static_cast<Index>(config.num_layers) * 2 * static_cast<Index>(config.token_dim);
    if (config.token_dim > 0 && ad.prompt_embeddings.cols() != expected_cols)
      throw ShapeError(who + ": prompt_embeddings has " + std::to_string(ad.prompt_embeddings.cols()) +
                       " columns, expected " + std::to_string(expected_cols));
  }
  return ad;
}

/// Reads a PEFT adapter directory. Nothing is returned unless everything validates. The weights
/// file is memory-mapped while it is read (SafeTensorsFile: a file truncated meanwhile by another
/// process raises SIGBUS).
template <class T>
PeftAdapter<T> load_peft_adapter(const std::string& dir) {
  if (!is_directory(dir)) throw IoError("\"" + dir + "\" is not a directory");
  const AdapterConfig config = read_adapter_config(dir + "/" + kAdapterConfigFile);
  const std::string weights = dir + "/" + kAdapterWeightsFile;
  if (!path_exists(weights))
    throw IoError("\"" + weights + "\" not found (only the safetensors format is read; adapter_model.bin is pickle)");
  const SafeTensorsFile st(weights);
  if (!config.weights_sha256.empty()) {
    // The bytes being loaded (the mapping), not a second read of the path.
    const std::string actual = sha256_hex(st.file().data(), st.file().size());
    if (actual != config.weights_sha256)
      throw IoError("\"" + dir + "/" + kAdapterConfigFile + "\" belongs to weights with SHA-256 " +
                    config.weights_sha256 + ", but \"" + weights + "\" has SHA-256 " + actual +
                    " (an interrupted save left a new weights file next to an old config, or one of the two "
                    "was replaced); refusing the pair");
  }
  PeftAdapter<T> ad = adapter_from_file<T>(config, st);
  for (const std::string& w : ad.warnings) warn("load_peft_adapter \"" + dir + "\": " + w);  // also the sink
  return ad;
}

/// Maps PEFT module paths to the user's model (and back, for saving).
struct NameMapping {
  /// Prefix rewrites, tried in order; the first whose `from` is a prefix of the name applies.
  std::vector<std::pair<std::string, std::string>> prefix_rules;
  /// When set, used instead of the rules.
  std::function<std::string(const std::string&)> custom;

  std::string operator()(const std::string& name) const {
    if (custom) return custom(name);
    for (const auto& r : prefix_rules)
      if (name.rfind(r.first, 0) == 0) return r.second + name.substr(r.first.size());
    return name;
  }
  /// The rules reversed (custom functions cannot be reversed).
  NameMapping inverse() const {
    if (custom) throw ConfigError("NameMapping: a custom mapping function has no inverse; pass one explicitly");
    NameMapping m;
    for (const auto& r : prefix_rules) m.prefix_rules.emplace_back(r.second, r.first);
    return m;
  }
};

namespace detail {
template <class T>
std::unordered_map<std::string, Parameter<T>*> parameter_index(Module<T>& model) {
  std::unordered_map<std::string, Parameter<T>*> idx;
  model.visit_parameters([&](const std::string& n, Parameter<T>& p) { idx[n] = &p; });
  return idx;
}

template <class T>
Parameter<T>* require_param(std::unordered_map<std::string, Parameter<T>*>& idx, const std::string& name,
                            const std::string& hint) {
  const auto it = idx.find(name);
  if (it == idx.end()) throw ConfigError("model has no parameter \"" + name + "\"" + hint);
  return it->second;
}

template <class T>
void require_shape(const Parameter<T>& p, const std::string& name, Index rows, Index cols, const char* what) {
  if (p.value.rows() != rows || p.value.cols() != cols)
    throw ShapeError("model parameter \"" + name + "\" has shape " + shape_str(p.value) + ", but the adapter's " +
                     what + " is " + shape_str(rows, cols));
}

/// The full tensors of adapter `adapter` (modules_to_save, biases), by model parameter name, checked
/// against the model and then copied in (PEFT's set_peft_model_state_dict): a tensor under a
/// ModulesToSave host ("head.weight") goes to that adapter's copy ("head.modules_to_save.<adapter>.
/// weight"), which is made (from the original, and activated) when the host has none; any other
/// tensor to the parameter of its name. check() validates everything without changing the model.
template <class T>
class FullTensorLoader {
 public:
  FullTensorLoader(Module<T>& model, std::string adapter) : model_(model), adapter_(std::move(adapter)) {
    hosts_ = modules_to_save_hosts(model);
    idx_ = parameter_index(model);
  }

  /// Checks that `name` exists with the value's shape (for a host: in the original or the copy).
  void add(const std::string& name, const Matrix<T>& value, const std::string& hint) {
    std::string path, rest;
    Item item{name, name, nullptr, &value};
    if (ModulesToSaveBase* h = module_to_save_of(hosts_, name, &path, &rest)) {
      const std::string head = path.empty() ? std::string() : path + ".";
      item.target = head + "modules_to_save." + adapter_ + "." + rest;
      item.check = h->has_copy(adapter_) ? item.target : h->has_copies() ? head + "original_module." + rest : name;
      item.host = h;
    }
    Parameter<T>* p = require_param(idx_, item.check, hint);
    require_shape(*p, item.check, value.rows(), value.cols(), "full tensor");
    items_.push_back(item);
  }

  /// Makes the missing copies and copies every value in.
  void apply() {
    bool made = false;
    for (const Item& it : items_)
      if (it.host != nullptr && !it.host->has_copy(adapter_)) {
        it.host->add_copy(adapter_);
        made = true;
      }
    if (made) idx_ = parameter_index(model_);
    for (const Item& it : items_) idx_.at(it.target)->value = *it.value;
  }

 private:
  struct Item {
    std::string check, target;
    ModulesToSaveBase* host;
    const Matrix<T>* value;
  };
  Module<T>& model_;
  std::string adapter_;
  std::vector<std::pair<std::string, ModulesToSaveBase*>> hosts_;
  std::unordered_map<std::string, Parameter<T>*> idx_;
  std::vector<Item> items_;
};
}  // namespace detail

/// Copies a loaded adapter into a model whose LoRALinear layers already hold an adapter named
/// `adapter_name` (created with `adapter.config.lora_config_for(path)` so the scaling agrees).
/// Parameters are found by name through Module::visit_parameters:
///   <mapped path>.weight                         base, must be [out, in] (shape check only)
///   <mapped path>.lora_A.<adapter_name>.weight   ← A
///   <mapped path>.lora_B.<adapter_name>.weight   ← B
///   <mapped path>.lora_magnitude_vector.<adapter_name>[.weight]  ← m (DoRA)
///   mapping("prompt_embeddings"), mapping(full tensor name)        ← prompt / full tensors
///     (a full tensor of a ModulesToSave host goes to the copy of `adapter_name`, made when missing)
/// Every target is checked before the first copy: on any error the model is unchanged.
template <class T>
void load_adapter_into(Module<T>& model, const PeftAdapter<T>& adapter, const std::string& adapter_name,
                       const NameMapping& mapping = {}) {
  auto idx = detail::parameter_index(model);
  std::vector<std::pair<Parameter<T>*, const Matrix<T>*>> plan;
  const std::string hint =
      "; create the adapter \"" + adapter_name +
      "\" first (LoRALinear::add_adapter with config.lora_config_for(path)) or fix the name mapping";
  for (const auto& m : adapter.lora) {
    const std::string p = mapping(m.path);
    if (adapter.config.fan_in_fan_out == false) {
      Parameter<T>* base = detail::require_param(idx, p + ".weight", hint);
      detail::require_shape(*base, p + ".weight", m.B.rows(), m.A.cols(), "ΔW = B·A");
    }
    const std::string an = p + ".lora_A." + adapter_name + ".weight";
    const std::string bn = p + ".lora_B." + adapter_name + ".weight";
    Parameter<T>* a = detail::require_param(idx, an, hint);
    Parameter<T>* b = detail::require_param(idx, bn, hint);
    detail::require_shape(*a, an, m.A.rows(), m.A.cols(), "lora_A");
    detail::require_shape(*b, bn, m.B.rows(), m.B.cols(), "lora_B");
    plan.emplace_back(a, &m.A);
    plan.emplace_back(b, &m.B);
    if (m.magnitude.size() > 0) {
      std::string mn = p + ".lora_magnitude_vector." + adapter_name;
      if (!idx.count(mn) && idx.count(mn + ".weight")) mn += ".weight";
      Parameter<T>* mp = detail::require_param(idx, mn, " (the model's layer has no DoRA magnitude for this adapter)");
      detail::require_shape(*mp, mn, 1, m.magnitude.cols(), "lora_magnitude_vector");
      plan.emplace_back(mp, &m.magnitude);
    }
  }
  if (adapter.prompt_embeddings.size() > 0) {
    const std::string n = mapping("prompt_embeddings");
    Parameter<T>* p = detail::require_param(idx, n, " (map \"prompt_embeddings\" to the soft prompt's parameter)");
    detail::require_shape(*p, n, adapter.prompt_embeddings.rows(), adapter.prompt_embeddings.cols(),
                          "prompt_embeddings");
    plan.emplace_back(p, &adapter.prompt_embeddings);
  }
  detail::FullTensorLoader<T> full(model, adapter_name);
  for (const auto& f : adapter.full) full.add(mapping(f.name), f.value, " (full tensor from the adapter)");
  for (auto& step : plan) step.first->value = *step.second;
  full.apply();
}

namespace detail {

/// The layer's adapter `name` when `m` hosts LoRA adapters (LoRALinear, on a dense or an NF4 base) and has it.
template <class T>
const LoraAdapter<T>* hosted_adapter(Module<T>& m, const std::string& name) {
  if (auto* l = dynamic_cast<LoRALinear<T>*>(&m)) {  // the LoRA adapter of that name (an (IA)³ one may share it)
    for (auto& a : l->methods())
      if (auto* lora = dynamic_cast<LoraMethod<T>*>(&a); lora != nullptr && a.name() == name) return &lora->adapter();
    return nullptr;
  }
  return nullptr;
}

inline bool is_lora_parameter_name(const std::string& n) {
  for (const char* part : {".lora_A.", ".lora_B.", ".lora_magnitude_vector."})
    if (n.find(part) != std::string::npos) return true;
  return false;
}

/// A module path as a rank_pattern / alpha_pattern key that matches that path: dots escaped (a
/// bare `.` would match any character); `anchored` also stops it matching a longer path that ends
/// in it (`(.*\.)?(^k)$` can only match from the start).
inline std::string exact_pattern_key(const std::string& path, bool anchored) {
  std::string k = anchored ? "^" : "";
  for (const char c : path) {
    if (std::string_view(".^$*+?{}[]\\|()").find(c) != std::string_view::npos) k += '\\';
    k += c;
  }
  return k;
}

template <class V>
V most_common(const std::vector<V>& values) {
  std::map<V, std::size_t> count;
  for (const V& v : values) ++count[v];
  V best = values.front();
  std::size_t n = 0;
  for (const auto& kv : count)
    if (kv.second > n) {
      n = kv.second;
      best = kv.first;
    }
  return best;
}

inline std::string sha256_of_file(const std::string& path) {
  const MappedFile f(path);
  return sha256_hex(f.data(), f.size());
}

}  // namespace detail

/// Collects the adapter `adapter_name` from a model into a PeftAdapter (the inverse of
/// load_adapter_into), so that the file computes what the model computes:
///   * each module `mapping(p)` whose layer (LoRALinear, NF4LoRALinear) holds the adapter gives
///     lora_A / lora_B (and the DoRA magnitude);
///   * r, lora_alpha, use_rslora, use_dora and lora_dropout come from the layers, not from
///     `config`: when the config's r / lora_alpha / rank_pattern / alpha_pattern do not give
///     every module its layer's values, r and lora_alpha become the most common values and the
///     other modules are listed in rank_pattern / alpha_pattern by their full path; a change to
///     the config is reported in `warnings`. use_rslora, use_dora and lora_dropout are single
///     values in PEFT's config: layers that differ are a ConfigError naming both modules;
///   * target_modules lists the modules unless the config's selection already covers them;
///   * modules_to_save: every parameter of each model module whose PEFT path ends with an entry
///     of config.modules_to_save (PEFT's rule) is saved as a full tensor under its PEFT name
///     (base_model.model.<path>.weight in the file, as PEFT's get_peft_model_state_dict writes it);
///     of a ModulesToSave host, the copy of `adapter_name` under the module's own names.
///     An entry that matches nothing is a ConfigError. Other trainable parameters that are not
///     saved are reported in `warnings`.
/// `config` supplies everything else (peft_type, task_type, base model, unknown keys).
template <class T>
PeftAdapter<T> collect_adapter(Module<T>& model, const std::string& adapter_name, const AdapterConfig& config,
                               const NameMapping& mapping = {}) {
  const std::string who = "collect_adapter";
  if (!config.is_lora()) throw ConfigError(who + ": only LoRA adapters are collected from a model");
  // The layers hosting the adapter, by the address of their lora_A parameter.
  std::map<const Parameter<T>*, const LoraAdapter<T>*> hosts;
  model.visit_modules([&](const std::string&, Module<T>& m) {
    if (const LoraAdapter<T>* a = detail::hosted_adapter(m, adapter_name)) hosts[&a->A] = a;
  });
  auto idx = detail::parameter_index(model);
  std::vector<std::string> names;
  names.reserve(idx.size());
  for (const auto& kv : idx) names.push_back(kv.first);
  std::sort(names.begin(), names.end());

  PeftAdapter<T> ad;
  ad.config = config;
  AdapterConfig& out = ad.config;
  std::vector<LoraConfig> layer_configs;
  const std::string a_suffix = ".lora_A." + adapter_name + ".weight";
  for (const auto& n : names) {
    std::string p;
    if (!detail::ends_with(n, a_suffix, &p)) continue;
    const auto host = hosts.find(idx.at(n));
    if (host == hosts.end())
      throw ConfigError(who + ": module \"" + p + "\" has \"" + n +
                        "\" but is not a LoRALinear / NF4LoRALinear, so its alpha, rsLoRA and dropout cannot be read");
    const LoraAdapter<T>& la = *host->second;
    LoraModuleWeights<T> m;
    m.path = mapping(p);
    m.A = la.A.value;
    m.B = la.B.value;
    if (la.config.use_dora) m.magnitude = la.magnitude.value;
    m.alpha = la.config.alpha;
    m.scaling = la.config.scaling();
    layer_configs.push_back(la.config);
    ad.lora.push_back(std::move(m));
  }
  if (ad.lora.empty()) throw ConfigError(who + ": the model has no adapter named \"" + adapter_name + "\"");

  // One value per config in PEFT: every layer must agree with the first.
  const LoraConfig& first = layer_configs.front();
  for (std::size_t i = 1; i < layer_configs.size(); ++i) {
    const LoraConfig& c = layer_configs[i];
    auto differ = [&](const char* field, const std::string& a, const std::string& b) {
      throw ConfigError(who + ": module \"" + ad.lora[i].path + "\" has " + field + " = " + b + " but module \"" +
                        ad.lora[0].path + "\" has " + a + "; a PEFT config holds one " + field);
    };
    auto tf = [](bool b) { return std::string(b ? "true" : "false"); };
    if (c.use_rslora != first.use_rslora) differ("use_rslora", tf(first.use_rslora), tf(c.use_rslora));
    if (c.use_dora != first.use_dora) differ("use_dora", tf(first.use_dora), tf(c.use_dora));
    if (c.dropout != first.dropout) differ("lora_dropout", check::num(first.dropout), check::num(c.dropout));
  }
  auto changed = [&](const std::string& field, const std::string& was, const std::string& now) {
    ad.warnings.push_back("config " + field + " = " + was + " replaced by the layers' " + now);
  };
  if (out.use_rslora != first.use_rslora)
    changed("use_rslora", out.use_rslora ? "true" : "false", first.use_rslora ? "true" : "false");
  if (out.use_dora != first.use_dora)
    changed("use_dora", out.use_dora ? "true" : "false", first.use_dora ? "true" : "false");
  if (out.lora_dropout != first.dropout)
    changed("lora_dropout", check::num(out.lora_dropout), check::num(first.dropout));
  out.use_rslora = first.use_rslora;
  out.use_dora = first.use_dora;
  out.lora_dropout = first.dropout;

  // r / lora_alpha: keep the config's values and patterns when they give every module its own.
  auto reproduces = [&](const AdapterConfig& c) {
    for (const auto& m : ad.lora)
      if (c.rank_for(m.path) != m.rank() || c.alpha_for(m.path) != m.alpha) return false;
    return true;
  };
  if (!reproduces(out)) {
    for (const auto& m : ad.lora) {
      const int cr = out.rank_for(m.path);
      const double ca = out.alpha_for(m.path);
      if (cr != m.rank()) changed("r for \"" + m.path + "\"", std::to_string(cr), std::to_string(m.rank()));
      if (ca != m.alpha) changed("lora_alpha for \"" + m.path + "\"", check::num(ca), check::num(m.alpha));
    }
    std::vector<int> ranks;
    std::vector<double> alphas;
    for (const auto& m : ad.lora) {
      ranks.push_back(static_cast<int>(m.rank()));
      alphas.push_back(m.alpha);
    }
    out.r = detail::most_common(ranks);
    out.lora_alpha = detail::most_common(alphas);
    for (const bool anchored : {false, true}) {  // anchored keys only if a plain one reaches another module
      out.rank_pattern.clear();
      out.alpha_pattern.clear();
      for (const auto& m : ad.lora) {
        if (m.rank() != out.r)
          out.rank_pattern.add(detail::exact_pattern_key(m.path, anchored), static_cast<int>(m.rank()), who);
        if (m.alpha != out.lora_alpha) out.alpha_pattern.add(detail::exact_pattern_key(m.path, anchored), m.alpha, who);
      }
      if (reproduces(out)) break;
    }
    if (!reproduces(out))
      throw ConfigError(who + ": cannot express the layers' ranks / alphas as rank_pattern / alpha_pattern");
  }

  // target_modules / exclude_modules: keep a selection that covers every module.
  bool covered = out.target_modules.present();
  for (const auto& m : ad.lora) covered = covered && out.targets(m.path);
  if (!covered) {
    if (out.target_modules.present()) ad.warnings.push_back("config target_modules replaced by the adapter's modules");
    std::vector<std::string> paths;
    for (const auto& m : ad.lora) paths.push_back(m.path);
    out.target_modules = ModuleSelector::list(std::move(paths));
    out.exclude_modules = ModuleSelector{};
  }

  // bias = "all" / "lora_only" (PEFT's get_peft_model_state_dict): base biases travel with the
  // adapter: "all" every bias of the model (PEFT: every key containing "bias"; here every
  // parameter named "bias" outside the adapters and the ModulesToSave hosts, which save their
  // copies below), "lora_only" the biases of the linears holding this adapter. A linear that holds
  // any adapter is wrapped in PEFT, so its bias is saved as "<path>.base_layer.bias".
  std::set<std::string> bias_saved;
  if (out.bias == "all" || out.bias == "lora_only") {
    std::map<std::string, bool> wrapped;  // bias parameter → whether its linear holds this adapter
    model.visit_modules([&](const std::string& path, Module<T>& m) {
      if (auto* l = dynamic_cast<LoRALinear<T>*>(&m); l != nullptr && l->has_bias() && l->num_adapters() > 0)
        wrapped[Module<T>::join(path, "bias")] = l->has_adapter(adapter_name);
    });
    for (const auto& n : names) {
      if (n != "bias" && !detail::ends_with(n, ".bias")) continue;
      if (n.find("modules_to_save.") != std::string::npos || n.find("original_module.") != std::string::npos) continue;
      const auto w = wrapped.find(n);
      if (out.bias == "lora_only" && (w == wrapped.end() || !w->second)) continue;
      if (w == wrapped.end() && (n.find("lora_") != std::string::npos || n.find("hada_") != std::string::npos ||
                                 n.find("lokr_") != std::string::npos || n.find("vera_") != std::string::npos ||
                                 n.find("ia3_") != std::string::npos))
        continue;  // an adapter's own tensor
      std::string peft_name = mapping(n);
      if (w != wrapped.end()) peft_name.insert(peft_name.size() - 4, "base_layer.");
      const Parameter<T>& p = *idx.at(n);
      ad.full.push_back(FullTensor<T>{peft_name, p.shape(), p.value});
      bias_saved.insert(n);
    }
  }

  // modules_to_save: PEFT wraps every module whose name ends with an entry (key.endswith). A
  // ModulesToSave host saves this adapter's copy under the module's own names ("head.weight"), not
  // its original or other adapters' copies (get_peft_model_state_dict).
  const auto save_hosts = modules_to_save_hosts(model);
  std::vector<bool> used(out.modules_to_save.size(), false);
  for (const auto& n : names) {
    if (detail::is_lora_parameter_name(n)) continue;
    std::string model_name;
    if (!saved_tensor_name(save_hosts, n, adapter_name, &model_name)) continue;
    const std::string peft_name = mapping(model_name);
    bool save = false;
    for (std::size_t dot = peft_name.find('.'); dot != std::string::npos && !save; dot = peft_name.find('.', dot + 1))
      for (std::size_t e = 0; e < out.modules_to_save.size(); ++e)
        if (detail::ends_with(peft_name.substr(0, dot), out.modules_to_save[e])) {
          used[e] = true;
          save = true;
        }
    const Parameter<T>& p = *idx.at(n);
    if (bias_saved.count(n) != 0) {
      // saved by the bias rule above (once, also when its module is a module to save)
    } else if (save) {
      ad.full.push_back(FullTensor<T>{peft_name, p.shape(), p.value});
    } else if (p.trainable())
      ad.warnings.push_back("parameter \"" + n +
                            "\" is trainable but not saved (list its module in modules_to_save to save it)");
  }
  for (std::size_t e = 0; e < used.size(); ++e)
    if (!used[e])
      throw ConfigError(who + ": modules_to_save entry \"" + out.modules_to_save[e] +
                        "\" matches no module of the model");
  std::sort(ad.lora.begin(), ad.lora.end(), [](const auto& x, const auto& y) { return x.path < y.path; });
  for (const std::string& w : ad.warnings) warn(who + " \"" + adapter_name + "\": " + w);  // also the sink
  return ad;
}

/// Writes `dir`/adapter_model.safetensors and `dir`/adapter_config.json in the layout PEFT's
/// PeftModel.from_pretrained reads; the config carries the SHA-256 of the weights file (see the
/// file comment). A new directory appears whole (a temporary directory renamed into place). An
/// existing one gets the weights first and the config last, each replaced atomically; other
/// files in it are kept. Nothing is written when either name is taken by a directory.
namespace detail {
/// Whether the adapter_config.json at `path` carries our weights digest (false if unreadable).
inline bool config_has_digest(const std::string& path) {
  try {
    const std::string text = read_text_file(path, 1u << 20);
    const Json j = parse_json_strict(text.data(), text.data() + text.size(), path);
    return j.is_object() && j.contains("peft_cpp") && j.at("peft_cpp").is_object() &&
           j.at("peft_cpp").contains("weights_sha256") && j.at("peft_cpp").at("weights_sha256").is_string();
  } catch (const Error&) {
    return false;
  }
}
}  // namespace detail

namespace detail {
/// Writes `tensors` as adapter_model.safetensors and config_text(weights path) as
/// adapter_config.json into `dir`: a new directory appears complete or not at all; an existing one
/// gets the weights first and the config last (see the file comment on torn writes).
template <class T, class ConfigText>
void write_adapter_dir(const std::string& dir, const std::vector<NamedTensor<T>>& tensors,
                       const ConfigText& config_text) {
  std::string d = dir;
  while (d.size() > 1 && d.back() == '/') d.pop_back();
  if (!path_exists(d)) {
    AtomicDirectory out(d);
    const std::string weights = out.staging() + "/" + kAdapterWeightsFile;
    save_safetensors<T>(weights, tensors, {{"format", "pt"}});
    write_file_atomic(out.staging() + "/" + kAdapterConfigFile, config_text(weights));
    out.commit();
    return;
  }
  struct stat st;
  if (::stat(d.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw IoError("cannot write directory \"" + d + "\": " + detail::file_type_name(st.st_mode) +
                  " of that name exists");
  const std::string weights = d + "/" + kAdapterWeightsFile, config = d + "/" + kAdapterConfigFile;
  for (const std::string& f : {weights, config})
    if (is_directory(f))
      throw IoError("cannot write \"" + f + "\": expected a file there, found a directory; nothing was written");
  // Weights first: a crash before the config's rename leaves the old config, whose digest no longer
  // matches, so the torn pair is refused rather than loaded with the old scaling. An old config
  // without a digest (as PEFT writes it) could not tell: it is moved aside (a hidden file) once the
  // new weights are complete, just before they replace the old ones, so such a crash leaves a
  // directory that fails to load ("no adapter_config.json"), never one that loads wrong. A failure
  // (a NaN refused, a full disk, a failed rename) puts it back: the old pair stays as it was.
  SafeTensorsWriter w(weights, tensor_specs(tensors), {{"format", "pt"}});
  write_tensors(w, tensors);
  const std::string aside = d + "/." + kAdapterConfigFile + ".replaced";
  const bool set_aside = path_exists(config) && !detail::config_has_digest(config);
  if (set_aside && ::rename(config.c_str(), aside.c_str()) != 0)
    throw IoError("cannot move \"" + config + "\" aside before replacing its weights: " + detail::errno_text(errno) +
                  "; nothing was written");
  try {
    w.commit();
  } catch (...) {
    if (set_aside) (void)::rename(aside.c_str(), config.c_str());  // the old pair, as it was
    throw;
  }
  write_file_atomic(config, config_text(weights));
  if (set_aside) ::unlink(aside.c_str());
}
}  // namespace detail

template <class T>
void save_peft_adapter(const std::string& dir, const PeftAdapter<T>& adapter, DType dtype = native_dtype<T>()) {
  if (!dtype_is_float(dtype))
    throw ConfigError(std::string("save_peft_adapter: dtype ") + dtype_name(dtype) + " is not a float type");
  std::vector<NamedTensor<T>> tensors;
  for (const auto& m : adapter.lora) {
    const std::string base = std::string(kPeftKeyPrefix) + m.path;
    tensors.push_back({base + ".lora_A.weight", matrix_shape(m.A.rows(), m.A.cols()), m.A.data(), dtype});
    tensors.push_back({base + ".lora_B.weight", matrix_shape(m.B.rows(), m.B.cols()), m.B.data(), dtype});
    if (m.magnitude.size() > 0)
      tensors.push_back(
          {base + ".lora_magnitude_vector", matrix_shape(1, m.magnitude.cols(), true), m.magnitude.data(), dtype});
  }
  if (adapter.prompt_embeddings.size() > 0)
    tensors.push_back({"prompt_embeddings",
                       matrix_shape(adapter.prompt_embeddings.rows(), adapter.prompt_embeddings.cols()),
                       adapter.prompt_embeddings.data(), dtype});
  for (const auto& f : adapter.full)
    tensors.push_back({std::string(kPeftKeyPrefix) + f.name, f.shape, f.value.data(), dtype});
  auto config_text = [&](const std::string& weights_path) {
    AdapterConfig c = adapter.config;
    c.weights_sha256 = detail::sha256_of_file(weights_path);
    return to_json(c).dump(2) + "\n";
  };
  detail::write_adapter_dir<T>(dir, tensors, config_text);
}

}  // namespace peft::io

// The test build compiles these once (tests/support/instantiations_io.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_IO_PEFT_FORMAT_TEMPLATES(KW, T) \
  KW template PeftAdapter<T> load_peft_adapter<T>(const std::string&);                                   \
  KW template void load_adapter_into<T>(Module<T>&, const PeftAdapter<T>&, const std::string&,            \
                                        const NameMapping&);                                               \
  KW template PeftAdapter<T> collect_adapter<T>(Module<T>&, const std::string&, const AdapterConfig&,      \
                                                const NameMapping&);                                       \
  KW template void save_peft_adapter<T>(const std::string&, const PeftAdapter<T>&, DType);
namespace peft::io {
PEFT_IO_PEFT_FORMAT_TEMPLATES(extern, float)
PEFT_IO_PEFT_FORMAT_TEMPLATES(extern, double)
}  // namespace peft::io
#endif
