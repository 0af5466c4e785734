#pragma once
// The method table: one row per kind of adapter that lives on a model's linears, with what
// adapter_config.json and adapter_model.safetensors hold for it in Hugging Face PEFT (its
// peft_type, its config keys and how they become a module's options, its tensor keys, its
// model-level tensors). Applying a method to any model, loading a PEFT directory onto a model,
// saving one, merging one into a base file and `peft inspect` dispatch through this table.
//
// Adding a method: its header under adapters/ (the kind of adapter, adapters/method.hpp), one row
// here (method_formats), and its cases in tests/layers/conformance_cases.hpp.
//
// Models are plain Module trees: every AdaptedLinear (LoRALinear) in the tree is a slot, named by
// its dotted path (Module::visit_modules), which is PEFT's module path when the model uses the
// checkpoint's names. Rows, per peft_type:
//   LORA  (and DoRA: use_dora) r, lora_alpha, lora_dropout, use_rslora, use_dora, rank_pattern,
//         alpha_pattern, init_lora_weights, modules_to_save, bias, fan_in_fan_out; tensors
//         lora_A.weight [r, in], lora_B.weight [out, r], lora_magnitude_vector [out]. The row is
//         the LoRA code of io/peft_format.hpp and io/merge_file.hpp: its directory reader
//         (load_peft_adapter: strict config, refused features, digest, modules_to_save / bias full
//         tensors), its writer (collect_adapter + save_peft_adapter: r / alpha reconciled with the
//         layers, byte for byte what they write) and its streaming merge (merge_adapter_file:
//         --scale, fan_in_fan_out). Applying refuses fan_in_fan_out = true (the hosts are [out, in])
//         and bias != "none" (biases are not trained here).
//   VERA  r, vera_dropout, d_initial, projection_prng_key, save_projection (false refused: see
//         adapters/vera.hpp), fan_in_fan_out / bias refused; tensors vera_lambda_b [out],
//         vera_lambda_d [r]; model tensors base_model.vera_A [r, in_max], base_model.vera_B [out_max, r]
//   LOHA  r, alpha, rank_pattern, alpha_pattern, rank_dropout, module_dropout, init_weights;
//         use_effective_conv2d ignored (Conv only); tensors hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b
//   LOKR  r, alpha, rank_pattern, alpha_pattern, decompose_both, decompose_factor, rank_dropout,
//         rank_dropout_scale, module_dropout, init_weights; tensors lokr_w1 | lokr_w1_a + lokr_w1_b,
//         lokr_w2 | lokr_w2_a + lokr_w2_b (lokr_t2: Conv only, refused)
//   IA3   feedforward_modules (input scaling), init_ia3_weights; tensor ia3_l ([out, 1] or [1, in])
// Every row: target_modules / exclude_modules select the linears (a list entry matches a path
// equal to it or ending in "." + it; a string is a full-match regex; "all-linear"),
// layers_to_transform / layers_pattern keep the listed layers (core/targeting.hpp: LayerFilter).
// Prompt and prefix tuning are not rows: they add virtual tokens, not a term of a linear
// (io/peft_format.hpp reads and writes their directories).
// A row with a LoRA-factor form also says how a file gives a module's [out, in] (file_shape), so
// that a directory reads as factors without its base model (io/adapter_factors.hpp: peft combine);
// a row without one says why (no_factors: (IA)³).
#include <algorithm>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "peft/adapters/ia3.hpp"
#include "peft/adapters/loha.hpp"
#include "peft/adapters/lokr.hpp"
#include "peft/adapters/vera.hpp"
#include "peft/core/patterns.hpp"
#include "peft/io/merge_file.hpp"
#include "peft/io/peft_format.hpp"
#include "peft/layers/adapted_linear.hpp"

namespace peft::io {

/// Model-level state a method shares between the adapters of one application or file (VeRA's
/// projections), by peft_type.
struct MethodState {
  std::map<std::string, std::shared_ptr<const void>> shared;
};

/// One module's tensors from a file: parameter name (e.g. "hada_w1_a") → [rows, cols].
template <class T>
using ModuleTensors = std::map<std::string, Matrix<T>>;

template <class T>
struct MethodFormat;

/// A PEFT adapter directory of a table method, read and checked (not yet attached to a model).
template <class T>
struct MethodAdapterFile {
  Json config;                                      ///< adapter_config.json
  const MethodFormat<T>* format = nullptr;          ///< its row
  std::map<std::string, ModuleTensors<T>> modules;  ///< module path → its tensors (names below the module)
  std::map<std::string, Matrix<T>> model_tensors;   ///< e.g. base_model.vera_A
  /// Whole tensors besides the adapters (LoRA's modules_to_save copies and biases with bias = "all" /
  /// "lora_only"), by model-relative name: copied into the model on load, replacing the base's
  /// tensor on merge.
  std::vector<FullTensor<T>> full;
  std::vector<std::string> warnings;  ///< e.g. a module target_modules does not select
};

/// A module's [out, in] as a file's tensors tell it, without the base model.
struct ModuleFileShape {
  Index out = 0;
  Index in = 0;
  /// false where the file bounds the input size only (VeRA: in <= vera_A's columns, the module's A
  /// being the leading in columns of the shared projection); `in` is then that bound.
  bool in_exact = true;
};

/// A method's row of the table.
template <class T>
struct MethodFormat {
  std::string peft_type;                 ///< PEFT's peft_type: "VERA", "LOHA", "LOKR", "IA3"
  std::string kind;                      ///< for messages: "VeRA", ...
  std::vector<std::string> config_keys;  ///< the method's own keys of adapter_config.json
  std::vector<std::string> params;       ///< tensor names below a module (file key suffixes)
  /// Refuses options this library does not implement, naming them (`label`: the config file).
  std::function<void(const Json& config, const std::string& label)> check;
  /// Prepares model-level state before any module: from the targeted modules' shapes [out, in]
  /// (apply) or from the file's model tensors (load). May be null.
  std::function<void(const Json& config, const std::vector<std::pair<Index, Index>>& shapes, Rng& rng,
                     MethodState& state)>
      prepare;
  std::function<void(const Json& config, const std::map<std::string, Matrix<T>>& model_tensors,
                     const std::string& label, MethodState& state)>
      load_model;
  /// Model-level tensor keys a file holds (read into load_model's map).
  std::vector<std::string> model_tensors;
  /// Writes model-level tensors for `adapters` (the named adapter of every module). May be null.
  std::function<std::vector<std::pair<std::string, Matrix<T>>>(const std::vector<AdapterMethod<T>*>& adapters)>
      save_model;
  /// A fresh adapter for the module at `path` [out, in] (init per config).
  std::function<std::unique_ptr<AdapterMethod<T>>(const Json& config, const std::string& path,
                                                  const std::string& adapter, Index in, Index out, MethodState& state,
                                                  Rng& rng)>
      create;
  /// The layout a file's tensors of one module imply, when it can differ from create's (LoKr's
  /// factorisation): returns an adapter shaped for them (values are then copied in). May be null.
  std::function<std::unique_ptr<AdapterMethod<T>>(const Json& config, const std::string& path,
                                                  const std::string& adapter, Index in, Index out,
                                                  const ModuleTensors<T>& tensors, MethodState& state, Rng& rng)>
      shaped;
  /// A fresh adapter that depends on its host (DoRA's magnitude starts at ‖W₀ + s·B·A‖_row): used
  /// instead of `create` where set. May be null.
  std::function<std::unique_ptr<AdapterMethod<T>>(const Json& config, const std::string& path,
                                                  const std::string& adapter, const AdaptedLinear<T>& host,
                                                  MethodState& state, Rng& rng)>
      create_on;
  /// The method's own directory reader, where it has one (LoRA: load_peft_adapter); the table's
  /// reader (tensors grouped by `params`) otherwise. May be null.
  std::function<MethodAdapterFile<T>(const std::string& dir)> read;
  /// The method's own directory writer, where it has one (LoRA: collect_adapter + save_peft_adapter);
  /// returns its warnings. May be null.
  std::function<std::vector<std::string>(const std::string& dir, Module<T>& model, const std::string& adapter,
                                         const Json& config, DType dtype)>
      save;
  /// The method's own merge into a safetensors file, where it has one (LoRA: merge_adapter_file,
  /// streaming by blocks of rows, with --scale and fan_in_fan_out). May be null.
  std::function<MergeFileReport(const std::string& base, const MethodAdapterFile<T>& file, const std::string& out,
                                const MergeFileOptions& opt)>
      merge;
  /// The [out, in] of module `path` as the file's tensors imply it (0 where they do not), for
  /// reading a directory without its base model (peft combine). Null for a method with no
  /// LoRA-factor form.
  std::function<ModuleFileShape(const MethodAdapterFile<T>& file, const std::string& path)> file_shape;
  /// Why the method's update has no LoRA-factor form ΔW = s·B·A (combine refuses it with this
  /// reason); empty when every adapter of the method converts (AdapterMethod::to_factors).
  std::string no_factors;
};

namespace detail {

/// "a, b, c" (the first 64, then a count).
inline std::string join_list(const std::vector<std::string>& names) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < 64; ++i) s += (i ? ", " : "") + names[i];
  if (names.size() > 64) s += ", ... (" + std::to_string(names.size() - 64) + " more)";
  return s;
}

/// config[key] as V, or `fallback` when absent or null; IoError naming the key when mistyped.
template <class V>
V json_value(const Json& config, const std::string& key, V fallback, const std::string& label) {
  if (!config.contains(key) || config.at(key).is_null()) return fallback;
  try {
    return config.at(key).template get<V>();
  } catch (const std::exception&) {
    throw IoError("\"" + label + "\": key \"" + key + "\" has the wrong type: " + config.at(key).dump().substr(0, 80));
  }
}

/// PEFT's rank_pattern / alpha_pattern lookup (get_pattern_key) for one module path.
template <class V>
V pattern_or(const Json& config, const char* key, const std::string& path, V fallback) {
  if (!config.contains(key) || !config.at(key).is_object()) return fallback;
  PatternMap<V> map;
  for (auto it = config.at(key).begin(); it != config.at(key).end(); ++it) map.add(it.key(), it.value().get<V>());
  const V* v = map.find(path, std::string("adapter config: ") + key);
  return v ? *v : fallback;
}

inline std::string label_of(const Json& config) {
  return detail::json_value<std::string>(config, "peft_type", "adapter config", "adapter config") + " config";
}

inline VeraConfig vera_config(const Json& c, const std::string& label) {
  VeraConfig v;
  v.r = json_value<int>(c, "r", v.r, label);
  v.vera_dropout = json_value<double>(c, "vera_dropout", v.vera_dropout, label);
  v.d_initial = json_value<double>(c, "d_initial", v.d_initial, label);
  v.init_weights = json_value<bool>(c, "init_weights", v.init_weights, label);
  v.save_projection = json_value<bool>(c, "save_projection", v.save_projection, label);
  v.projection_prng_key = json_value<std::uint64_t>(c, "projection_prng_key", v.projection_prng_key, label);
  v.fan_in_fan_out = json_value<bool>(c, "fan_in_fan_out", v.fan_in_fan_out, label);
  v.bias = json_value<std::string>(c, "bias", v.bias, label);
  return v;
}

/// The options LoHa and LoKr share (LyCORIS' rank, alpha, dropouts), as their config structs
/// spell them: r and alpha per module (rank_pattern / alpha_pattern).
template <class C>
void lycoris_common_config(const Json& c, const std::string& path, const std::string& label, C& k) {
  k.r = pattern_or<int>(c, "rank_pattern", path, json_value<int>(c, "r", k.r, label));
  k.alpha = pattern_or<double>(c, "alpha_pattern", path, json_value<double>(c, "alpha", k.alpha, label));
  k.rank_dropout = json_value<double>(c, "rank_dropout", k.rank_dropout, label);
  k.module_dropout = json_value<double>(c, "module_dropout", k.module_dropout, label);
  k.use_effective_conv2d = json_value<bool>(c, "use_effective_conv2d", k.use_effective_conv2d, label);
}

inline LohaConfig loha_config(const Json& c, const std::string& path, const std::string& label) {
  LohaConfig h;
  lycoris_common_config(c, path, label, h);
  h.init_weights = json_value<bool>(c, "init_weights", h.init_weights, label);
  return h;
}

inline LokrConfig lokr_config(const Json& c, const std::string& path, const std::string& label) {
  LokrConfig k;
  lycoris_common_config(c, path, label, k);
  k.decompose_both = json_value<bool>(c, "decompose_both", k.decompose_both, label);
  k.decompose_factor = json_value<int>(c, "decompose_factor", k.decompose_factor, label);
  k.rank_dropout_scale = json_value<bool>(c, "rank_dropout_scale", k.rank_dropout_scale, label);
  if (c.contains("init_weights") && c.at("init_weights").is_string()) {
    const std::string s = c.at("init_weights").get<std::string>();
    if (s != "lycoris") throw ConfigError("\"" + label + "\": LoKr init_weights = \"" + s + "\" is not supported");
    k.init_weights = LokrInit::Lycoris;
  } else {
    k.init_weights = json_value<bool>(c, "init_weights", true, label) ? LokrInit::Default : LokrInit::Random;
  }
  return k;
}

/// A selector key of the config (target_modules, exclude_modules, feedforward_modules) as the one
/// ModuleSelector of core/targeting.hpp: a list, a full-match regex, "all-linear", or absent.
inline ModuleSelector json_selector(const Json& c, const char* key, const std::string& label) {
  if (!c.contains(key) || c.at(key).is_null()) return ModuleSelector();
  const Json& v = c.at(key);
  if (v.is_string()) return ModuleSelector::pattern(v.get<std::string>(), label + ": " + key);
  std::vector<std::string> names;
  if (v.is_array())
    for (const Json& e : v)
      if (e.is_string()) names.push_back(e.get<std::string>());
  if (!v.is_array() || names.size() != v.size())
    throw IoError("\"" + label + "\": key \"" + key + "\" must be a string or a list of strings");
  return ModuleSelector::list(std::move(names));
}

/// What a config selects (core/targeting.hpp: module_targeted), read once per application.
struct Targeting {
  ModuleSelector target, exclude;
  std::vector<std::string> modules_to_save;
  LayerFilter layers;

  Targeting() = default;
  Targeting(const Json& c, const std::string& label)
      : target(json_selector(c, "target_modules", label)), exclude(json_selector(c, "exclude_modules", label)) {
    if (c.contains("modules_to_save") && c.at("modules_to_save").is_array())
      for (const Json& e : c.at("modules_to_save"))
        if (e.is_string()) modules_to_save.push_back(e.get<std::string>());
    std::vector<long long> indexes;
    if (c.contains("layers_to_transform") && !c.at("layers_to_transform").is_null()) {
      const Json& v = c.at("layers_to_transform");
      for (const Json& e : v.is_array() ? v : Json::array({v})) {
        if (!e.is_number_integer() || e.get<std::int64_t>() < 0)
          throw IoError("\"" + label +
                        "\": key \"layers_to_transform\" must be a non-negative integer or a list of them");
        indexes.push_back(e.get<std::int64_t>());
      }
    }
    std::vector<std::string> patterns;
    if (c.contains("layers_pattern") && !c.at("layers_pattern").is_null()) {
      const Json& v = c.at("layers_pattern");
      for (const Json& e : v.is_array() ? v : Json::array({v})) {
        if (!e.is_string())
          throw IoError("\"" + label + "\": key \"layers_pattern\" must be a string or a list of strings");
        patterns.push_back(e.get<std::string>());
      }
    }
    layers = LayerFilter(std::move(indexes), patterns, label + ": layers_pattern");
  }
  /// PEFT's decision for the linear at `path`; `linear_non_head`: what "all-linear" may select.
  bool operator()(const std::string& path, bool linear_non_head) const {
    return module_targeted(path, linear_non_head, target, exclude, modules_to_save, layers);
  }
};

/// Whether `path` is in feedforward_modules (IA3), by the selector rule of target_modules.
inline bool ia3_feedforward(const Json& c, const std::string& path) {
  return json_selector(c, "feedforward_modules", label_of(c)).matches_linear_by_name(path);
}

/// The LoRA row's config, parsed once per application or file (io/peft_format.hpp's reader).
struct LoraState {
  AdapterConfig config;
  bool fresh = false;  ///< applying (init per init_lora_weights), not loading (values copied in)
};

inline const LoraState& lora_state(MethodState& s, const Json& c, bool fresh) {
  auto it = s.shared.find("LORA");
  if (it == s.shared.end()) {
    auto st = std::make_shared<LoraState>();
    st->config = parse_adapter_config(c, label_of(c));
    st->fresh = fresh;
    it = s.shared.emplace("LORA", std::move(st)).first;
  }
  return *std::static_pointer_cast<const LoraState>(it->second);
}

/// Refuses what applying LoRA to [out, in] hosts cannot honour (loading such a file is fine).
inline void check_lora_apply(const AdapterConfig& c, const std::string& who) {
  if (c.fan_in_fan_out)
    throw ConfigError(who +
                      ": fan_in_fan_out = true describes a base stored [in, out] (GPT-2 Conv1D); "
                      "the adapted linears store weights [out, in], expected false");
  if (c.bias != "none")
    throw ConfigError(who + ": bias = \"" + c.bias +
                      "\" trains biases, which applying LoRA does not do; expected \"none\" (PeftModel::add_adapter "
                      "trains them)");
  (void)lora_init_of(c.init_lora_weights, who);
}

template <class T>
std::shared_ptr<const VeraProjections<T>> vera_projections(const MethodState& state, const std::string& who) {
  const auto it = state.shared.find("VERA");
  if (it == state.shared.end()) throw ConfigError(who + ": VeRA's shared projections were not prepared");
  return std::static_pointer_cast<const VeraProjections<T>>(it->second);
}

}  // namespace detail

/// A LoRA file of the table (peft_type LORA) as the PeftAdapter of io/peft_format.hpp: the config
/// parsed, per module A, B (and DoRA's magnitude) with alpha and scaling from the config, the full
/// tensors. What `peft inspect` reports and merge_adapter_file streams.
template <class T>
PeftAdapter<T> lora_adapter_of(const MethodAdapterFile<T>& file) {
  PeftAdapter<T> ad;
  ad.config = parse_adapter_config(file.config, "adapter config");
  if (!ad.config.is_lora())
    throw ConfigError("lora_adapter_of: peft_type is \"" + ad.config.peft_type + "\", not LORA");
  for (const auto& [path, tensors] : file.modules) {
    LoraModuleWeights<T> m;
    m.path = path;
    for (const auto& [param, value] : tensors) {
      if (param == "lora_A.weight")
        m.A = value;
      else if (param == "lora_B.weight")
        m.B = value;
      else if (param == "lora_magnitude_vector")
        m.magnitude = value;
      else
        throw ConfigError("lora_adapter_of: module \"" + path + "\" has a tensor \"" + param + "\" that is not LoRA's");
    }
    m.alpha = ad.config.alpha_for(path);
    m.scaling = ad.config.scaling_of(static_cast<int>(m.rank()), m.alpha);
    ad.lora.push_back(std::move(m));
  }
  ad.full = file.full;
  ad.warnings = file.warnings;
  return ad;
}

/// The table (one row per method, in PEFT's peft_type spelling).
template <class T>
const std::vector<MethodFormat<T>>& method_formats() {
  static const std::vector<MethodFormat<T>> table = [] {
    std::vector<MethodFormat<T>> t;

    MethodFormat<T> lora;
    lora.peft_type = "LORA";
    lora.kind = "LoRA";
    lora.config_keys = {"r",
                        "lora_alpha",
                        "lora_dropout",
                        "use_rslora",
                        "use_dora",
                        "rank_pattern",
                        "alpha_pattern",
                        "init_lora_weights",
                        "modules_to_save",
                        "bias",
                        "fan_in_fan_out"};
    lora.params = {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"};
    lora.check = [](const Json& c, const std::string& label) { (void)parse_adapter_config(c, label); };
    lora.prepare = [](const Json& c, const std::vector<std::pair<Index, Index>>&, Rng&, MethodState& s) {
      detail::check_lora_apply(detail::lora_state(s, c, true).config, "apply_method (LoRA)");
    };
    lora.load_model = [](const Json& c, const std::map<std::string, Matrix<T>>&, const std::string&, MethodState& s) {
      (void)detail::lora_state(s, c, false);
    };
    lora.create = [](const Json&, const std::string& path, const std::string&, Index, Index, MethodState&,
                     Rng&) -> std::unique_ptr<AdapterMethod<T>> {
      throw ConfigError("LoRA adapter for \"" + path + "\": needs its host (create_on)");
    };
    lora.create_on = [](const Json& c, const std::string& path, const std::string& adapter,
                        const AdaptedLinear<T>& host, MethodState& s, Rng& rng) -> std::unique_ptr<AdapterMethod<T>> {
      const detail::LoraState& st = detail::lora_state(s, c, true);
      LoraConfig lc = st.config.lora_config_for(path);
      lc.init = st.fresh ? lora_init_of(st.config.init_lora_weights, detail::label_of(c)) : LoraInit::KaimingUniform;
      if (lc.use_dora && !host.merged_adapters().empty())
        throw ConfigError(describe("LoRALinear", host.name()) + ": cannot add DoRA adapter \"" + adapter +
                          "\" while adapters are merged; its magnitude would be taken from the merged weight");
      if (!lc.use_dora)  // plain LoRA needs only the shape (an NF4 base is not dequantized for it)
        return make_lora<T>(adapter, lc, host.in_features(), host.out_features(), rng, "LoRALinear", host.name());
      return make_lora<T>(adapter, lc, host.base_weight(), rng, "LoRALinear", host.name());
    };
    lora.read = [](const std::string& dir) {
      PeftAdapter<T> ad = load_peft_adapter<T>(dir);
      MethodAdapterFile<T> f;
      f.config = ad.config.raw;
      for (LoraModuleWeights<T>& m : ad.lora) {
        ModuleTensors<T>& mt = f.modules[m.path];
        mt["lora_A.weight"] = std::move(m.A);
        mt["lora_B.weight"] = std::move(m.B);
        if (m.magnitude.size() > 0) mt["lora_magnitude_vector"] = std::move(m.magnitude);
      }
      f.full = std::move(ad.full);
      f.warnings = std::move(ad.warnings);
      return f;
    };
    lora.save = [](const std::string& dir, Module<T>& model, const std::string& adapter, const Json& c, DType dtype) {
      const PeftAdapter<T> ad = collect_adapter(model, adapter, parse_adapter_config(c, "save_method_adapter: config"));
      save_peft_adapter(dir, ad, dtype);
      return ad.warnings;
    };
    lora.merge = [](const std::string& base, const MethodAdapterFile<T>& file, const std::string& out,
                    const MergeFileOptions& opt) { return merge_adapter_file(base, lora_adapter_of(file), out, opt); };
    t.push_back(std::move(lora));

    MethodFormat<T> vera;
    vera.peft_type = "VERA";
    vera.kind = "VeRA";
    vera.config_keys = {"r", "vera_dropout", "d_initial", "projection_prng_key", "save_projection", "init_weights"};
    vera.params = {"vera_lambda_b", "vera_lambda_d"};
    vera.model_tensors = {vera_A_file_key(), vera_B_file_key()};
    vera.check = [](const Json& c, const std::string& label) {
      check_vera_file(detail::vera_config(c, label), {vera_A_file_key(), vera_B_file_key()}, label);
    };
    vera.prepare = [](const Json& c, const std::vector<std::pair<Index, Index>>& shapes, Rng& rng, MethodState& s) {
      Index in_max = 0, out_max = 0;
      for (const auto& [out, in] : shapes) {
        out_max = std::max(out_max, out);
        in_max = std::max(in_max, in);
      }
      const VeraConfig v = detail::vera_config(c, detail::label_of(c));
      s.shared["VERA"] = VeraProjections<T>::generate(v.r, in_max, out_max, rng);  // PEFT: A first, then B
    };
    vera.load_model = [](const Json& c, const std::map<std::string, Matrix<T>>& m, const std::string& label,
                         MethodState& s) {
      std::vector<std::string> names;
      for (const auto& kv : m) names.push_back(kv.first);
      check_vera_file(detail::vera_config(c, label), names, label);
      s.shared["VERA"] = VeraProjections<T>::make(m.at(vera_A_file_key()), m.at(vera_B_file_key()));
    };
    vera.save_model = [](const std::vector<AdapterMethod<T>*>& adapters) {
      std::vector<std::pair<std::string, Matrix<T>>> out;
      for (AdapterMethod<T>* a : adapters)
        if (auto* k = dynamic_cast<KernelMethod<T, VeraAdapter<T>>*>(a)) {
          out.emplace_back(vera_A_file_key(), k->kernel().projections()->A);
          out.emplace_back(vera_B_file_key(), k->kernel().projections()->B);
          break;
        }
      return out;
    };
    vera.create = [](const Json& c, const std::string& path, const std::string& adapter, Index in, Index out,
                     MethodState& s, Rng& rng) {
      return make_vera<T>(adapter, in, out, detail::vera_config(c, detail::label_of(c)),
                          detail::vera_projections<T>(s, path), rng, path);
    };
    vera.file_shape = [](const MethodAdapterFile<T>& f, const std::string& path) {
      ModuleFileShape shape;
      const ModuleTensors<T>& m = f.modules.at(path);
      if (m.count("vera_lambda_b")) shape.out = m.at("vera_lambda_b").size();
      if (f.model_tensors.count(vera_A_file_key())) shape.in = f.model_tensors.at(vera_A_file_key()).cols();
      // vera_A is [r, in_max], in_max over the modules of the file (PEFT's _find_dim): a module's own
      // input size is stored nowhere, unless it is the file's only module.
      shape.in_exact = f.modules.size() == 1;
      return shape;
    };
    t.push_back(std::move(vera));

    MethodFormat<T> loha;
    loha.peft_type = "LOHA";
    loha.kind = "LoHa";
    loha.config_keys = {"r",
                        "alpha",
                        "rank_pattern",
                        "alpha_pattern",
                        "rank_dropout",
                        "module_dropout",
                        "use_effective_conv2d",
                        "init_weights"};
    loha.params = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"};
    loha.check = [](const Json& c, const std::string& label) { (void)detail::loha_config(c, "", label); };
    loha.create = [](const Json& c, const std::string& path, const std::string& adapter, Index in, Index out,
                     MethodState&, Rng& rng) {
      return make_loha<T>(adapter, in, out, detail::loha_config(c, path, detail::label_of(c)), rng, path);
    };
    loha.file_shape = [](const MethodAdapterFile<T>& f, const std::string& path) {
      ModuleFileShape shape;  // w1_a [out, r], w1_b [r, in]
      const ModuleTensors<T>& m = f.modules.at(path);
      if (m.count("hada_w1_a")) shape.out = m.at("hada_w1_a").rows();
      if (m.count("hada_w1_b")) shape.in = m.at("hada_w1_b").cols();
      return shape;
    };
    t.push_back(std::move(loha));

    MethodFormat<T> lokr;
    lokr.peft_type = "LOKR";
    lokr.kind = "LoKr";
    lokr.config_keys = {"r",
                        "alpha",
                        "rank_pattern",
                        "alpha_pattern",
                        "decompose_both",
                        "decompose_factor",
                        "rank_dropout",
                        "rank_dropout_scale",
                        "module_dropout",
                        "use_effective_conv2d",
                        "init_weights"};
    lokr.params = {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"};
    lokr.check = [](const Json& c, const std::string& label) { (void)detail::lokr_config(c, "", label); };
    lokr.create = [](const Json& c, const std::string& path, const std::string& adapter, Index in, Index out,
                     MethodState&, Rng& rng) {
      return make_lokr<T>(adapter, in, out, detail::lokr_config(c, path, detail::label_of(c)), rng, path);
    };
    lokr.shaped = [](const Json& c, const std::string& path, const std::string& adapter, Index in, Index out,
                     const ModuleTensors<T>& tensors, MethodState&, Rng& rng) -> std::unique_ptr<AdapterMethod<T>> {
      const LokrConfig k = detail::lokr_config(c, path, detail::label_of(c));
      std::map<std::string, std::pair<Index, Index>> shapes;
      for (const auto& kv : tensors) shapes[kv.first] = {kv.second.rows(), kv.second.cols()};
      const LokrLayout layout = lokr_layout_from_shapes(in, out, k.r, shapes, path);
      return std::make_unique<KernelMethod<T, LokrAdapter<T>>>(adapter, LokrAdapter<T>(in, out, k, layout, rng, path));
    };
    lokr.file_shape = [](const MethodAdapterFile<T>& f, const std::string& path) {
      // ΔW = W1 ⊗ W2: [out, in] = [rows(W1)·rows(W2), cols(W1)·cols(W2)], each factor full or w_a w_b.
      const ModuleTensors<T>& m = f.modules.at(path);
      auto dims = [&](const std::string& w, Index& rows, Index& cols) {
        if (m.count(w)) {
          rows = m.at(w).rows();
          cols = m.at(w).cols();
        } else if (m.count(w + "_a") && m.count(w + "_b")) {
          rows = m.at(w + "_a").rows();
          cols = m.at(w + "_b").cols();
        }
      };
      Index r1 = 0, c1 = 0, r2 = 0, c2 = 0;
      dims("lokr_w1", r1, c1);
      dims("lokr_w2", r2, c2);
      return ModuleFileShape{r1 * r2, c1 * c2, true};
    };
    t.push_back(std::move(lokr));

    MethodFormat<T> ia3;
    ia3.peft_type = "IA3";
    ia3.kind = "(IA)^3";
    ia3.config_keys = {"feedforward_modules", "init_ia3_weights", "fan_in_fan_out"};
    ia3.params = {"ia3_l"};
    ia3.check = [](const Json& c, const std::string& label) {
      if (detail::json_value<bool>(c, "fan_in_fan_out", false, label))
        throw ConfigError("\"" + label + "\": (IA)^3 with fan_in_fan_out = true (Conv1D weights) is not supported");
    };
    ia3.create = [](const Json& c, const std::string& path, const std::string& adapter, Index in, Index out,
                    MethodState&, Rng& rng) -> std::unique_ptr<AdapterMethod<T>> {
      IA3Config config;
      config.feedforward = detail::ia3_feedforward(c, path);
      config.init_ia3_weights = detail::json_value<bool>(c, "init_ia3_weights", true, detail::label_of(c));
      return std::make_unique<IA3Method<T>>(adapter, config, in, out, &rng);
    };
    ia3.no_factors =
        "it scales the base weight's rows or columns (a gain on W, not an additive low-rank delta), so it has no "
        "LoRA-factor form";
    t.push_back(std::move(ia3));
    return t;
  }();
  return table;
}

/// The row of `peft_type`, or nullptr.
template <class T>
const MethodFormat<T>* find_method_format(const std::string& peft_type) {
  for (const auto& f : method_formats<T>())
    if (f.peft_type == peft_type) return &f;
  return nullptr;
}

/// "LORA, VERA, LOHA, LOKR, IA3".
template <class T>
std::string method_format_names() {
  std::string s;
  for (const auto& f : method_formats<T>()) s += (s.empty() ? "" : ", ") + f.peft_type;
  return s;
}

/// Every adapted linear of a model with its dotted path (the model's slots), but the originals and
/// copies inside a ModulesToSave host that holds copies.
template <class T>
std::vector<std::pair<std::string, AdaptedLinear<T>*>> adapted_linears(Module<T>& model) {
  std::vector<std::pair<std::string, AdaptedLinear<T>*>> out;
  const auto hosts = modules_to_save_hosts(model);  // a module to save and its copies are no slots
  model.visit_modules([&](const std::string& path, Module<T>& m) {
    if (auto* l = dynamic_cast<AdaptedLinear<T>*>(&m); l != nullptr && !inside_module_copies(hosts, path))
      out.emplace_back(path, l);
  });
  return out;
}

/// A linear the table may adapt: its dotted path, its host, and whether "all-linear" selects it (a
/// linear that is not the model's output layer).
template <class T>
struct LinearSlot {
  std::string path;
  AdaptedLinear<T>* host = nullptr;
  bool linear_non_head = true;
};

/// The slots of any model: every adapted linear, the output layer recognised by its name
/// (is_output_layer_name). A model that knows its head lists its slots itself (apply_peft).
template <class T>
std::vector<LinearSlot<T>> linear_slots(Module<T>& model) {
  std::vector<LinearSlot<T>> out;
  for (auto& [path, host] : adapted_linears(model)) out.push_back({path, host, !is_output_layer_name(path)});
  return out;
}

namespace detail {
/// A fresh adapter of row `f` for the [out, in] module at `path`: shaped for a file's `tensors`
/// where given and the row has such a layout (LoKr), else built on its `host` where given and the
/// row needs one (DoRA's magnitude), else from the config alone.
template <class T>
std::unique_ptr<AdapterMethod<T>> fresh_adapter(const MethodFormat<T>& f, const Json& config, const std::string& path,
                                                const std::string& adapter, Index in, Index out,
                                                const AdaptedLinear<T>* host, const ModuleTensors<T>* tensors,
                                                MethodState& state, Rng& rng) {
  if (tensors != nullptr && f.shaped) return f.shaped(config, path, adapter, in, out, *tensors, state, rng);
  if (host != nullptr && f.create_on) return f.create_on(config, path, adapter, *host, state, rng);
  return f.create(config, path, adapter, in, out, state, rng);
}

/// The name of a method tensor below its module: its file key without "base_model.model.<path>.".
inline std::string param_name(const std::string& file_key, const std::string& path) {
  const std::string head = std::string(kPeftKeyPrefix) + path + ".";
  return file_key.rfind(head, 0) == 0 ? file_key.substr(head.size()) : file_key.substr(file_key.rfind('.') + 1);
}

/// Whether `host` already has an adapter `name` of method `type` (another method may share the name).
template <class T>
bool has_method(const AdaptedLinear<T>& host, const std::string& name, const std::string& type) {
  for (const auto& m : host.methods())
    if (m.name() == name && type == m.peft_type()) return true;
  return false;
}
}  // namespace detail

namespace detail {
/// apply_method's work for row `f` once the config is checked and its selection read.
template <class T>
std::vector<std::string> apply_row(const MethodFormat<T>& f, const std::vector<LinearSlot<T>>& slots,
                                   const Json& config, const Targeting& targets, MethodState& state,
                                   const std::string& adapter_name, Rng& rng, const std::string& who) {
  std::vector<const LinearSlot<T>*> chosen;
  if (!who.empty()) {
    std::vector<std::pair<std::string, bool>> candidates;
    for (const auto& s : slots) candidates.emplace_back(s.path, s.linear_non_head);
    const std::vector<std::string> names =
        select_modules(candidates, targets.target, targets.exclude, targets.modules_to_save, who, targets.layers);
    for (const auto& s : slots)
      if (std::find(names.begin(), names.end(), s.path) != names.end()) chosen.push_back(&s);
  } else {
    for (const auto& s : slots)
      if (targets(s.path, s.linear_non_head)) chosen.push_back(&s);
    if (chosen.empty()) {
      std::vector<std::string> names;
      for (const auto& s : slots) names.push_back(s.path);
      throw ConfigError("apply_method (" + f.kind +
                        "): target_modules matches no linear; the model's linears: " + join_list(names));
    }
  }
  if (f.prepare) {
    std::vector<std::pair<Index, Index>> shapes;
    for (const LinearSlot<T>* s : chosen) shapes.emplace_back(s->host->out_features(), s->host->in_features());
    f.prepare(config, shapes, rng, state);
  }
  std::vector<std::unique_ptr<AdapterMethod<T>>> made;
  for (const LinearSlot<T>* s : chosen) {
    if (has_method(*s->host, adapter_name, f.peft_type))
      throw ConfigError("apply_method (" + f.kind + "): module \"" + s->path + "\" already has a " + f.kind +
                        " adapter \"" + adapter_name + "\"; nothing was applied");
    made.push_back(fresh_adapter<T>(f, config, s->path, adapter_name, s->host->in_features(), s->host->out_features(),
                                    s->host, nullptr, state, rng));
  }
  std::vector<std::string> paths;
  for (std::size_t i = 0; i < chosen.size(); ++i) {
    chosen[i]->host->add_adapter(std::move(made[i]));
    paths.push_back(chosen[i]->path);
  }
  return paths;
}
}  // namespace detail

/// Adds a `config["peft_type"]` adapter named `adapter_name` to every slot that the config selects
/// (target_modules, exclude_modules, modules_to_save, layers_to_transform: PEFT's get_peft_model /
/// add_adapter for that method), and returns their paths, in slot order. Each new adapter becomes
/// its host's only active one. Every adapter is built before the first is attached, so an error
/// leaves the hosts as they were. ConfigError when nothing matches: listing the model's linears, or,
/// when `who` names a caller, select_modules' message (core/targeting.hpp) in its words.
template <class T>
std::vector<std::string> apply_method(const std::vector<LinearSlot<T>>& slots, const Json& config,
                                      const std::string& adapter_name, Rng& rng, const std::string& who = "") {
  const std::string type = detail::json_value<std::string>(config, "peft_type", "", "adapter config");
  const MethodFormat<T>* f = find_method_format<T>(type);
  if (f == nullptr)
    throw ConfigError("apply_method: peft_type \"" + type + "\" is not in the method table (" +
                      method_format_names<T>() + ")");
  const std::string label = detail::label_of(config);
  f->check(config, label);
  MethodState state;
  return detail::apply_row(*f, slots, config, detail::Targeting(config, label), state, adapter_name, rng, who);
}

/// apply_method with the LoRA row's config already parsed (io::AdapterConfig, e.g. apply_peft's):
/// its selectors and rank / alpha pattern keys were compiled when it was made and are not again.
template <class T>
std::vector<std::string> apply_method(const std::vector<LinearSlot<T>>& slots, const AdapterConfig& config,
                                      const std::string& adapter_name, Rng& rng, const std::string& who = "") {
  if (!config.is_lora())
    throw ConfigError("apply_method: an AdapterConfig applies as LORA, got peft_type \"" + config.peft_type + "\"");
  auto st = std::make_shared<detail::LoraState>();
  st->config = config;
  st->fresh = true;
  MethodState state;
  state.shared["LORA"] = std::move(st);
  detail::Targeting targets;
  targets.target = config.target_modules;
  targets.exclude = config.exclude_modules;
  targets.modules_to_save = config.modules_to_save;
  targets.layers = config.layers;
  return detail::apply_row(*find_method_format<T>("LORA"), slots, to_json(config), targets, state, adapter_name, rng,
                           who);
}

/// apply_method on every adapted linear of `model` (linear_slots), and config["modules_to_save"]
/// (PEFT's _set_trainable): a ModulesToSave host gets a copy for the adapter (active, trainable),
/// a plain module trains in place, shared by every adapter (reported through peft::warn); an
/// entry that matches no module is reported through peft::warn.
template <class T>
std::vector<std::string> apply_method(Module<T>& model, const Json& config, const std::string& adapter_name, Rng& rng) {
  const std::string who = "apply_method";
  const std::vector<SavedModule<T>> saved = resolve_modules_to_save(
      model, detail::Targeting(config, detail::label_of(config)).modules_to_save, adapter_name, who, false);
  std::vector<std::string> paths = apply_method(linear_slots(model), config, adapter_name, rng);
  add_modules_to_save(saved, adapter_name, who);
  return paths;
}

/// Reads `dir` (adapter_config.json + adapter_model.safetensors) for a method of the table:
/// checks the config's options and the weights' digest, groups the tensors by module and refuses
/// unknown or non-finite tensors, naming them.
template <class T>
MethodAdapterFile<T> read_method_adapter(const std::string& dir) {
  if (!is_directory(dir)) throw IoError("\"" + dir + "\" is not a directory");
  const std::string config_path = dir + "/" + kAdapterConfigFile, weights = dir + "/" + kAdapterWeightsFile;
  MethodAdapterFile<T> out;
  const std::string text = read_text_file(config_path, 1u << 20);
  out.config = parse_json_strict(text, config_path);
  if (!out.config.is_object()) throw IoError("\"" + config_path + "\": adapter config must be a JSON object");
  const std::string type = detail::json_value<std::string>(out.config, "peft_type", "", config_path);
  out.format = find_method_format<T>(type);
  if (out.format == nullptr)
    throw ConfigError("\"" + config_path + "\": peft_type \"" + type + "\" is not a method of the table (" +
                      method_format_names<T>() + ")");
  if (out.format->read) {  // the method's own reader (LoRA's, which also checks the digest)
    const MethodFormat<T>* f = out.format;
    out = f->read(dir);
    out.format = f;
    return out;
  }
  out.format->check(out.config, config_path);
  if (!path_exists(weights)) throw IoError("\"" + weights + "\" not found");
  const SafeTensorsFile st(weights);
  if (out.config.contains(kPeftCppConfigKey) && out.config.at(kPeftCppConfigKey).is_object() &&
      out.config.at(kPeftCppConfigKey).contains("weights_sha256")) {
    const std::string want = out.config.at(kPeftCppConfigKey).at("weights_sha256").template get<std::string>();
    const std::string actual = sha256_hex(st.file().data(), st.file().size());
    if (actual != want)
      throw IoError("\"" + config_path + "\" belongs to weights with SHA-256 " + want + ", but \"" + weights +
                    "\" has SHA-256 " + actual + "; refusing the pair");
  }
  for (const TensorInfo& t : st.tensors()) {
    const auto& mt = out.format->model_tensors;
    if (std::find(mt.begin(), mt.end(), t.name) != mt.end()) {
      out.model_tensors[t.name] = detail::load_finite<T>(st, t.name);
      continue;
    }
    bool placed = false;
    if (t.name.rfind(kPeftKeyPrefix, 0) == 0) {
      const std::string rest = t.name.substr(std::char_traits<char>::length(kPeftKeyPrefix));
      for (const std::string& p : out.format->params) {
        std::string path;
        if (detail::ends_with(rest, "." + p, &path) && !path.empty()) {
          ModuleTensors<T>& m = out.modules[path];
          Matrix<T> v = detail::load_finite<T>(st, t.name);
          if (t.shape.size() == 1) v.resize(1, v.size());  // 1-D [n] is kept as [1, n]
          m[p] = std::move(v);
          placed = true;
          break;
        }
      }
    }
    if (!placed)
      throw ConfigError("\"" + weights + "\": tensor \"" + t.name + "\" is not a " + out.format->kind +
                        " tensor (expected base_model.model.<module>.{" + detail::join_list(out.format->params) + "}" +
                        (mt.empty() ? std::string() : " or " + detail::join_list(mt)) + ")");
  }
  if (out.modules.empty()) throw ConfigError("\"" + weights + "\": holds no " + out.format->kind + " module");
  return out;
}

namespace detail {

/// The adapter of module `path` of `file` on an [out, in] base, holding the file's values: every
/// tensor its layout uses is in the file with that layout's shape, and there is no other. `where`
/// names the module in messages. `state`: the file's model-level state (MethodFormat::load_model).
template <class T>
std::unique_ptr<AdapterMethod<T>> method_module(const MethodAdapterFile<T>& file, const std::string& path,
                                                const std::string& adapter_name, Index in, Index out,
                                                MethodState& state, const std::string& where,
                                                const AdaptedLinear<T>* host = nullptr) {
  const MethodFormat<T>& f = *file.format;
  const ModuleTensors<T>& tensors = file.modules.at(path);
  Rng rng(0);  // the values drawn at construction are overwritten below
  std::unique_ptr<AdapterMethod<T>> m =
      fresh_adapter(f, file.config, path, adapter_name, in, out, host, &tensors, state, rng);
  const std::vector<AdapterTensor<T>> want = m->tensors(path);
  for (const AdapterTensor<T>& t : want) {
    const std::string param = param_name(t.file_key, path);
    const auto v = tensors.find(param);
    if (v == tensors.end()) throw ConfigError(where + " has no tensor \"" + param + "\" in the file");
    check::shape(f.kind.c_str(), path, param.c_str(), v->second.rows(), v->second.cols(), t.parameter->value.rows(),
                 t.parameter->value.cols());
  }
  if (want.size() != tensors.size())
    throw ConfigError(where + " has " + std::to_string(tensors.size()) + " tensors in the file, its layout uses " +
                      std::to_string(want.size()));
  for (const AdapterTensor<T>& t : want) t.parameter->value = tensors.at(param_name(t.file_key, path));
  return m;
}

}  // namespace detail

/// Attaches a read adapter to `model` under `adapter_name` (active, as add_adapter makes it): every
/// module of the file must be an adapted linear of the model with the file's shapes; the values are
/// copied exactly, and so are the file's full tensors (modules_to_save, biases) into the model's
/// parameters of those names (a ModulesToSave host's into the copy of `adapter_name`, made when
/// missing). Everything is checked before the model changes. Returns the module
/// paths.
template <class T>
std::vector<std::string> load_method_adapter(Module<T>& model, const MethodAdapterFile<T>& file,
                                             const std::string& adapter_name) {
  const MethodFormat<T>& f = *file.format;
  const std::string label = "adapter (" + f.kind + ")";
  std::map<std::string, AdaptedLinear<T>*> slots;
  for (auto& s : adapted_linears(model)) slots[s.first] = s.second;
  MethodState state;
  if (f.load_model) f.load_model(file.config, file.model_tensors, label, state);
  std::vector<std::unique_ptr<AdapterMethod<T>>> made;
  std::vector<AdaptedLinear<T>*> hosts;
  for (const auto& kv : file.modules) {
    const std::string& path = kv.first;
    const auto it = slots.find(path);
    if (it == slots.end()) {
      std::vector<std::string> names;
      for (const auto& s : slots) names.push_back(s.first);
      throw ConfigError(label + ": module \"" + path +
                        "\" is not an adapted linear of the model; its linears: " + detail::join_list(names));
    }
    AdaptedLinear<T>& linear = *it->second;
    std::unique_ptr<AdapterMethod<T>> m =
        detail::method_module(file, path, adapter_name, linear.in_features(), linear.out_features(), state,
                              label + ": module \"" + path + "\"", &linear);
    made.push_back(std::move(m));
    hosts.push_back(&linear);
  }
  // Full tensors: the model's parameters of those names, shapes checked; a module to save's go to
  // the copy of this adapter (made when missing).
  detail::FullTensorLoader<T> full(model, adapter_name);
  for (const FullTensor<T>& t : file.full)
    full.add(t.name, t.value, " (a full tensor of the adapter: modules_to_save or a bias)");
  // Everything checked: attach (a name clash is refused before any layer changes).
  for (std::size_t i = 0; i < hosts.size(); ++i)
    if (detail::has_method(*hosts[i], adapter_name, f.peft_type))
      throw ConfigError(label + ": module \"" + hosts[i]->name() + "\" already has an adapter \"" + adapter_name +
                        "\"; nothing was loaded");
  std::vector<std::string> paths;
  for (std::size_t i = 0; i < hosts.size(); ++i) hosts[i]->add_adapter(std::move(made[i]));
  full.apply();
  for (const auto& kv : file.modules) paths.push_back(kv.first);
  return paths;
}

/// Saves the adapter `adapter_name` of every adapted linear of `model` that has one as a PEFT
/// directory: `config` (the method's keys, e.g. as given to apply_method or read from a file) is
/// written as adapter_config.json with peft_type and the digest of the weights; tensors under PEFT's
/// keys. Weights first, config last (see peft_format.hpp).
/// A method with its own writer (LoRA: collect_adapter + save_peft_adapter, which reconcile r /
/// lora_alpha with the layers and save modules_to_save) writes through it. Returns the writer's
/// warnings (e.g. a config value replaced by the layers').
template <class T>
std::vector<std::string> save_method_adapter(const std::string& dir, Module<T>& model, const std::string& adapter_name,
                                             Json config, DType dtype = native_dtype<T>()) {
  const std::string type = detail::json_value<std::string>(config, "peft_type", "", "adapter config");
  const MethodFormat<T>* f = find_method_format<T>(type);
  if (f == nullptr)
    throw ConfigError("save_method_adapter: peft_type \"" + type + "\" is not in the method table (" +
                      method_format_names<T>() + ")");
  if (f->save) return f->save(dir, model, adapter_name, config, dtype);
  std::vector<std::pair<std::string, Matrix<T>>> owned;
  std::vector<NamedTensor<T>> tensors;
  std::vector<AdapterMethod<T>*> adapters;
  std::vector<std::string> paths;
  for (auto& [path, linear] : adapted_linears(model)) {
    if (!linear->has_adapter(adapter_name)) continue;
    AdapterMethod<T>& m = linear->method(adapter_name);
    if (m.peft_type() != type)
      throw ConfigError("save_method_adapter: adapter \"" + adapter_name + "\" of \"" + path + "\" is " + m.kind() +
                        ", the config says " + type);
    adapters.push_back(&m);
    paths.push_back(path);
    for (const AdapterTensor<T>& t : m.tensors(path)) {
      const Matrix<T>& v = t.parameter->value;
      tensors.push_back({t.file_key, matrix_shape(v.rows(), v.cols(), t.vector), v.data(), dtype});
    }
  }
  if (adapters.empty())
    throw ConfigError("save_method_adapter: no adapted linear of the model has an adapter \"" + adapter_name + "\"");
  if (f->save_model) owned = f->save_model(adapters);
  for (const auto& [key, value] : owned)
    tensors.push_back({key, matrix_shape(value.rows(), value.cols()), value.data(), dtype});
  config["peft_type"] = type;
  if (!config.contains("target_modules") || config.at("target_modules").is_null()) config["target_modules"] = paths;
  detail::write_adapter_dir<T>(dir, tensors, [&](const std::string& weights) {
    Json c = config;
    c[kPeftCppConfigKey] =
        Json{{"weights_file", kAdapterWeightsFile}, {"weights_sha256", detail::sha256_of_file(weights)}};
    return c.dump(2) + "\n";
  });
  return {};
}

/// Merges a table method's adapter into a safetensors model file (`peft merge`): every module's
/// merged weight (and bias, where the method changes it: (IA)³ on outputs) is what the adapted
/// linear holds after merge() with the base loaded from the file, i.e. PEFT's merge_and_unload.
/// The other tensors are copied unchanged (copy_file_range). One module's weight is in memory at a
/// time. Everything is checked before the output is created; a NaN or Inf aborts the write and
/// nothing is left at `out_path`. opt.scale must be 1 (the methods' gains do not scale linearly).
template <class T>
MergeFileReport merge_method_file(const std::string& base_path, const MethodAdapterFile<T>& file,
                                  const std::string& out_path, const MergeFileOptions& opt = {}) {
  const MethodFormat<T>& f = *file.format;
  if (f.merge) return f.merge(base_path, file, out_path, opt);  // the method's own streaming merge (LoRA)
  if (!file.full.empty())
    throw ConfigError("merge: the " + f.kind + " adapter holds full tensors (e.g. \"" + file.full.front().name +
                      "\"), which this method's merge does not write");
  if (opt.scale != 1.0)
    throw ConfigError("merge: --scale applies to LoRA deltas only; a " + f.kind + " adapter merges as a whole");
  const InputFile base(base_path);
  const SafeTensorsHeader header = read_safetensors_header(base);
  std::map<std::string, const TensorInfo*> by_name;
  for (const TensorInfo& t : header.tensors) by_name[t.name] = &t;
  const std::string who = "merge: base \"" + base_path + "\"";

  // ---- plan: each module's base weight (and bias, if any), shapes checked ----
  struct Target {
    std::string path;  ///< module path in the adapter
    const TensorInfo* w = nullptr;
    const TensorInfo* b = nullptr;
    Matrix<T> merged_w, merged_b;  ///< computed when the first of its tensors is reached
    bool done = false;
  };
  std::vector<Target> targets;
  std::map<std::string, std::size_t> at;  // base tensor name → target
  for (const auto& kv : file.modules) {
    Target tg;
    tg.path = kv.first;
    const std::string wname = opt.mapping(kv.first) + ".weight", bname = opt.mapping(kv.first) + ".bias";
    const auto wf = by_name.find(wname);
    if (wf == by_name.end())
      throw ConfigError(who + " has no tensor \"" + wname + "\" for adapter module \"" + kv.first +
                        "\" (wrong base model, or a name mapping is needed)");
    tg.w = wf->second;
    if (!dtype_is_float(tg.w->dtype) || tg.w->shape.size() != 2)
      throw ShapeError(who + ": tensor \"" + wname + "\" is " + dtype_name(tg.w->dtype) + " " + tg.w->shape_string() +
                       ", expected a float [out, in] weight");
    const auto bf = by_name.find(bname);
    if (bf != by_name.end()) {
      tg.b = bf->second;
      if (!dtype_is_float(tg.b->dtype) || tg.b->numel != static_cast<std::uint64_t>(tg.w->rows()))
        throw ShapeError(who + ": tensor \"" + bname + "\" is " + dtype_name(tg.b->dtype) + " " + tg.b->shape_string() +
                         ", expected a float bias of " + std::to_string(tg.w->rows()));
    }
    at[wname] = targets.size();
    if (tg.b != nullptr) at[bname] = targets.size();
    targets.push_back(std::move(tg));
  }
  // Every module's adapter builds and fits its base (shapes, layout) before anything is written.
  MethodState state;
  if (f.load_model) f.load_model(file.config, file.model_tensors, "adapter (" + f.kind + ")", state);
  auto build = [&](Target& tg, bool keep) {
    const Index out = tg.w->rows(), in = tg.w->cols();
    Linear<T> lin;
    lin.weight = Parameter<T>(out, in, false);
    if (keep) {
      std::vector<unsigned char> raw(static_cast<std::size_t>(tg.w->nbytes()));
      base.read_at(header.data_offset + tg.w->begin, raw.size(), raw.data());
      decode_elements<T>(tg.w->dtype, raw.data(), static_cast<std::size_t>(tg.w->numel), lin.weight.value.data());
      if (tg.b != nullptr) {
        lin.bias = Parameter<T>(1, out, false);
        raw.resize(static_cast<std::size_t>(tg.b->nbytes()));
        base.read_at(header.data_offset + tg.b->begin, raw.size(), raw.data());
        decode_elements<T>(tg.b->dtype, raw.data(), static_cast<std::size_t>(tg.b->numel), lin.bias.value.data());
      }
    } else {
      lin.weight.value.setZero();
      if (tg.b != nullptr) {
        lin.bias = Parameter<T>(1, out, false);
        lin.bias.value.setZero();
      }
    }
    AdaptedLinear<T> host(std::move(lin), tg.path);
    host.add_adapter(detail::method_module(file, tg.path, "default", in, out, state,
                                           who + ": adapter module \"" + tg.path + "\"", &host));
    if (!keep) return;
    host.safe_merge();
    tg.merged_w = std::move(host.weight.value);
    if (tg.b != nullptr) tg.merged_b = std::move(host.bias.value);
  };
  for (Target& tg : targets) build(tg, false);  // checks only

  // ---- stream ----
  std::vector<TensorSpec> specs;
  specs.reserve(header.tensors.size());
  for (const TensorInfo& t : header.tensors) specs.push_back({t.name, t.dtype, t.shape});
  SafeTensorsWriter w(out_path, std::move(specs), header.metadata);
  MergeFileReport rep;
  const std::size_t count = header.tensors.size();
  for (std::size_t ti = 0; ti < count; ++ti) {
    const TensorInfo& t = header.tensors[ti];
    if (opt.on_tensor) opt.on_tensor(ti, count, t);
    const auto it = at.find(t.name);
    if (it == at.end()) {
      w.copy_raw(base.fd(), header.data_offset + t.begin, static_cast<std::size_t>(t.nbytes()), nullptr);
      ++rep.copied;
      continue;
    }
    Target& tg = targets[it->second];
    if (!tg.done) {
      try {
        build(tg, true);
      } catch (const NumericError& e) {
        throw NumericError(std::string(e.what()) + " (adapter module \"" + tg.path + "\"); nothing was written");
      }
      tg.done = true;
    }
    const Matrix<T>& v = &t == tg.w ? tg.merged_w : tg.merged_b;
    w.write<T>(v.data(), static_cast<std::size_t>(v.size()));
    ++rep.merged;
    if (&t == tg.w) tg.merged_w.resize(0, 0);  // one module in memory at a time
  }
  w.commit();
  rep.bytes = w.bytes_written();
  return rep;
}

}  // namespace peft::io

// The test build compiles these once (tests/support/instantiations_io.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_IO_METHODS_TEMPLATES(KW, T) \
  KW template const std::vector<MethodFormat<T>>& method_formats<T>();                                          \
  KW template const MethodFormat<T>* find_method_format<T>(const std::string&);                                  \
  KW template std::string method_format_names<T>();                                                              \
  KW template std::vector<LinearSlot<T>> linear_slots<T>(Module<T>&);                                            \
  KW template std::vector<std::string> apply_method<T>(const std::vector<LinearSlot<T>>&, const Json&,           \
                                                       const std::string&, Rng&, const std::string&);           \
  KW template std::vector<std::string> apply_method<T>(const std::vector<LinearSlot<T>>&, const AdapterConfig&,  \
                                                       const std::string&, Rng&, const std::string&);           \
  KW template std::vector<std::string> apply_method<T>(Module<T>&, const Json&, const std::string&, Rng&);       \
  KW template MethodAdapterFile<T> read_method_adapter<T>(const std::string&);                                   \
  KW template std::vector<std::string> load_method_adapter<T>(Module<T>&, const MethodAdapterFile<T>&,           \
                                                              const std::string&);                              \
  KW template std::vector<std::string> save_method_adapter<T>(const std::string&, Module<T>&, const std::string&, \
                                                              Json, DType);                                     \
  KW template MergeFileReport merge_method_file<T>(const std::string&, const MethodAdapterFile<T>&,              \
                                                   const std::string&, const MergeFileOptions&);
namespace peft::io {
PEFT_IO_METHODS_TEMPLATES(extern, float)
PEFT_IO_METHODS_TEMPLATES(extern, double)
}  // namespace peft::io
#endif
