#pragma once
// Loading a Hugging Face Llama-family checkpoint directory (save_pretrained's layout) into
// models/llama.hpp's LlamaForCausalLM:
//
//   config.json                      model_type llama / mistral / qwen2; rope as transformers 5 writes
//                                    it (rope_parameters: rope_theta, rope_type, llama3 keys) or as 4.x
//                                    did (rope_theta + rope_scaling {rope_type | type, ...})
//   model.safetensors                one file, or
//   model.safetensors.index.json     {"weight_map": {tensor: shard file}} + the shards
//
// Refused by name (ConfigError, nothing loaded): another model_type, hidden_act other than silu,
// a rope type other than default / llama3, partial_rotary_factor ≠ 1, MoE keys (num_local_experts,
// num_experts), a quantization_config, layer_types other than full_attention on llama / mistral.
// Sliding-window attention as transformers configures it: Mistral's sliding_window (null: none;
// absent: MistralConfig's default 4096) on every layer; Qwen2's sliding_window (default 4096) only with
// use_sliding_window, on the layers layer_types marks sliding_attention (absent: the layers i ≥ max_window_layers,
// default 28, as Qwen2Config builds it); a sliding layer without a window (use_sliding_window false, or sliding_window
// null) is refused, as HF's forward fails on it.
//
// Tensors: every parameter of the model must be in the files with its shape (1-D for norms and
// biases), F32 / F16 / BF16 / F64, converted to T; a missing, unexpected, mis-shaped or
// wrongly-typed tensor is a ConfigError / ShapeError naming its key, raised after the headers are
// read and before anything is converted. Accepted and skipped: `*.rotary_emb.inv_freq` (older
// checkpoints store the buffer) and `lm_head.weight` when the embeddings are tied (HF ties it).
// The files are memory-mapped (io::SafeTensorsFile) and each tensor is decoded straight into its
// parameter, so peak memory is about the files' pages plus the model in T.
//
// bitsandbytes checkpoints (save_pretrained of a model loaded with load_in_4bit, nf4, with or without
// double quantization; config.json's quantization_config says so, any other quantization is
// refused): each `<p>.weight` + quant-state group (quant/bnb_format.hpp) becomes the NF4 base of the
// linear <p>, bit for bit; everything else loads as above.
//
// Quantize on load (LlamaLoadOptions::quantize_nf4; transformers' load_in_4bit with bitsandbytes'
// nf4): each decoder layer's seven linears become NF4 hosts (quantize_linear, bit-compatible with
// bitsandbytes' quantizer), layer by layer right after the dense load; embeddings, norms and lm_head
// stay dense (bitsandbytes leaves the output layer out). Adapters added afterwards are QLoRA.
#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/separate.hpp"
#include "peft/core/warnings.hpp"
#include "peft/io/file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/models/llama.hpp"
#include "peft/quant/bnb_format.hpp"
#include "peft/quant/nf4_lora_linear.hpp"

namespace peft::io {

namespace detail {
inline bool json_has(const Json& j, const char* key) { return j.contains(key) && !j.at(key).is_null(); }

template <class V>
V json_get(const Json& j, const char* key, const std::string& label) {
  try {
    return j.at(key).template get<V>();
  } catch (const std::exception& e) {
    throw IoError(label + ": key \"" + key + "\" has the wrong type or value (" + e.what() + ")");
  }
}

template <class V>
V json_get_or(const Json& j, const char* key, V fallback, const std::string& label) {
  return json_has(j, key) ? json_get<V>(j, key, label) : fallback;
}

/// An integer key (a JSON integer, not a float: a float outside int64 would not convert).
inline Index json_index(const Json& j, const char* key, const std::string& label) {
  if (!json_has(j, key)) throw ConfigError(label + ": required key \"" + key + "\" is missing");
  if (!j.at(key).is_number_integer()) throw IoError(label + ": key \"" + key + "\" must be an integer");
  return static_cast<Index>(json_get<std::int64_t>(j, key, label));
}
inline Index json_index_or(const Json& j, const char* key, Index fallback, const std::string& label) {
  return json_has(j, key) ? json_index(j, key, label) : fallback;
}

}  // namespace detail

/// A LlamaConfig from a parsed config.json (label names the file in messages).
PEFT_SEPARATE_INLINE LlamaConfig llama_config_from_json(const Json& j, const std::string& label);

// Compiled once in the project's test build (peft/core/separate.hpp).
#if PEFT_SEPARATE_BODIES
namespace detail {
/// The rope settings of a config: transformers 5's rope_parameters or 4.x's rope_theta + rope_scaling.
inline RopeConfig llama_rope(const Json& j, const std::string& label) {
  RopeConfig r;
  const Json* scaling = nullptr;
  std::string where;
  if (json_has(j, "rope_parameters")) {
    scaling = &j.at("rope_parameters");
    where = "rope_parameters";
    if (!scaling->is_object()) throw IoError(label + ": \"rope_parameters\" must be an object");
    r.theta = json_get_or<double>(*scaling, "rope_theta", json_get_or<double>(j, "rope_theta", 10000.0, label), label);
  } else {
    r.theta = json_get_or<double>(j, "rope_theta", 10000.0, label);
    if (json_has(j, "rope_scaling")) {
      scaling = &j.at("rope_scaling");
      where = "rope_scaling";
      if (!scaling->is_object()) throw IoError(label + ": \"rope_scaling\" must be an object");
    }
  }
  if (scaling != nullptr) {
    std::string type = json_get_or<std::string>(*scaling, "rope_type", "", label);
    if (type.empty()) type = json_get_or<std::string>(*scaling, "type", "default", label);
    if (type != "default" && type != "llama3")
      throw ConfigError(label + ": " + where + ".rope_type \"" + type +
                        "\" is not supported (default and llama3 are); refusing the checkpoint");
    const double partial = json_get_or<double>(*scaling, "partial_rotary_factor", 1.0, label);
    if (partial != 1.0)
      throw ConfigError(label + ": " + where + ".partial_rotary_factor " + check::num(partial) +
                        " is not supported (1 only)");
    r.type = type;
    if (type == "llama3") {
      for (const char* k : {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"})
        if (!json_has(*scaling, k)) throw ConfigError(label + ": " + where + " (llama3) needs \"" + k + "\"");
      r.factor = json_get<double>(*scaling, "factor", label);
      r.low_freq_factor = json_get<double>(*scaling, "low_freq_factor", label);
      r.high_freq_factor = json_get<double>(*scaling, "high_freq_factor", label);
      r.original_max_position_embeddings = json_get<double>(*scaling, "original_max_position_embeddings", label);
    }
  }
  const double partial = json_get_or<double>(j, "partial_rotary_factor", 1.0, label);
  if (partial != 1.0)
    throw ConfigError(label + ": partial_rotary_factor " + check::num(partial) + " is not supported (1 only)");
  return r;
}
}  // namespace detail

PEFT_SEPARATE_INLINE LlamaConfig llama_config_from_json(const Json& j, const std::string& label) {
  if (!j.is_object()) throw IoError(label + ": config must be a JSON object");
  LlamaConfig c;
  c.model_type = detail::json_get_or<std::string>(j, "model_type", "", label);
  if (c.model_type != "llama" && c.model_type != "mistral" && c.model_type != "qwen2")
    throw ConfigError(label + ": model_type \"" + c.model_type +
                      "\" is not supported (llama, mistral, qwen2); refusing the checkpoint");
  const std::string act = detail::json_get_or<std::string>(j, "hidden_act", "silu", label);
  if (act != "silu") throw ConfigError(label + ": hidden_act \"" + act + "\" is not supported (silu only)");
  for (const char* k : {"num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size"})
    if (detail::json_has(j, k) && !(j.at(k).is_number() && j.at(k).get<double>() == 0.0))
      throw ConfigError(label + ": \"" + k + "\" is set: mixture-of-experts models are not supported");
  if (detail::json_has(j, "quantization_config")) {  // bitsandbytes 4-bit nf4 only (load_llama_weights reads it)
    const Json& q = j.at("quantization_config");
    const bool obj = q.is_object();
    const std::string method = obj ? detail::json_get_or<std::string>(q, "quant_method", "", label) : "";
    const bool four =
        obj && q.contains("load_in_4bit") && q.at("load_in_4bit").is_boolean() && q.at("load_in_4bit").get<bool>();
    const std::string qt = obj ? detail::json_get_or<std::string>(q, "bnb_4bit_quant_type", "fp4", label) : "";
    if (method != "bitsandbytes" || !four || qt != "nf4")
      throw ConfigError(label + ": \"quantization_config\" (quant_method \"" + method + "\", load_in_4bit " +
                        (four ? "true" : "false") + ", bnb_4bit_quant_type \"" + qt +
                        "\"): only bitsandbytes 4-bit nf4 checkpoints are supported");
  }
  const bool qwen2 = c.model_type == "qwen2";
  if (detail::json_has(j, "layer_types")) {
    const Json& lt = j.at("layer_types");
    if (!lt.is_array()) throw IoError(label + ": \"layer_types\" must be an array");
    for (const Json& t : lt) {
      const std::string name = t.is_string() ? t.get<std::string>() : t.dump();
      if (name != "full_attention" && !(qwen2 && name == "sliding_attention"))
        throw ConfigError(label + ": layer_types holds \"" + name + "\": only full_attention layers are supported" +
                          (qwen2 ? " (and sliding_attention)" : " for model_type " + c.model_type));
      c.layer_types.push_back(name);
    }
  }
  c.vocab_size = detail::json_index(j, "vocab_size", label);
  c.hidden_size = detail::json_index(j, "hidden_size", label);
  c.intermediate_size = detail::json_index(j, "intermediate_size", label);
  c.num_hidden_layers = detail::json_index(j, "num_hidden_layers", label);
  c.num_attention_heads = detail::json_index(j, "num_attention_heads", label);
  c.num_key_value_heads = detail::json_has(j, "num_key_value_heads")
                              ? detail::json_index(j, "num_key_value_heads", label)
                              : c.num_attention_heads;
  c.head_dim = detail::json_has(j, "head_dim") ? detail::json_index(j, "head_dim", label) : 0;
  c.rms_norm_eps = detail::json_get_or<double>(j, "rms_norm_eps", 1e-6, label);
  c.max_position_embeddings = detail::json_index_or(j, "max_position_embeddings", 2048, label);
  c.tie_word_embeddings = detail::json_get_or<bool>(j, "tie_word_embeddings", false, label);
  c.initializer_range = detail::json_get_or<double>(j, "initializer_range", 0.02, label);
  c.rope = detail::llama_rope(j, label);
  if (c.model_type == "qwen2") {
    c.qkv_bias = true;  // Qwen2Attention: q/k/v always biased, o_proj never
  } else {
    c.qkv_bias = c.o_bias = detail::json_get_or<bool>(j, "attention_bias", false, label);
    c.mlp_bias = detail::json_get_or<bool>(j, "mlp_bias", false, label);
  }
  if (c.model_type == "mistral") {  // MistralConfig: absent → 4096, null → None; every layer slides
    c.sliding_window = !j.contains("sliding_window") ? 4096 : detail::json_index_or(j, "sliding_window", 0, label);
    c.layer_types.clear();  // all full_attention (checked above); MistralModel ignores them
  } else if (c.model_type != "qwen2") {
    c.layer_types.clear();  // LlamaConfig has no window
  } else {                  // Qwen2Config: sliding_window = sliding_window if use_sliding_window else None
    const bool use = detail::json_get_or<bool>(j, "use_sliding_window", false, label);
    const bool has = j.contains("sliding_window");  // absent: Qwen2Config's default 4096; null: None
    c.sliding_window = use ? (has ? detail::json_index_or(j, "sliding_window", 0, label) : 4096) : 0;
    if (c.sliding_window < 0) throw ConfigError(label + ": sliding_window must be >= 0");
    if (c.layer_types.empty()) {  // Qwen2Config: sliding iff a window is set and i >= max_window_layers
      c.max_window_layers = detail::json_index_or(j, "max_window_layers", 28, label);
    } else if (c.sliding_window == 0 &&
               std::find(c.layer_types.begin(), c.layer_types.end(), "sliding_attention") != c.layer_types.end()) {
      throw ConfigError(label + ": layer_types holds sliding_attention but " +
                        (use ? "sliding_window is null" : "use_sliding_window is false") +
                        " (transformers' forward has no window for those layers)");
    }
  }
  const double dropout = detail::json_get_or<double>(j, "attention_dropout", 0.0, label);
  if (dropout != 0.0)
    warn(label + ": attention_dropout " + check::num(dropout) + " is ignored (no attention dropout is applied)");
  try {
    c.validate();
  } catch (const ConfigError& e) {
    throw ConfigError(label + ": " + e.what());
  }
  return c;
}
#endif  // PEFT_SEPARATE_BODIES

/// Reads and checks a config.json.
inline LlamaConfig read_llama_config(const std::string& path) {
  return llama_config_from_json(parse_json_strict(read_text_file(path, 1u << 20), path), path);
}

/// What a load did.
struct LlamaLoadReport {
  std::vector<std::string> files;  ///< the safetensors files read
  std::uint64_t file_bytes = 0;    ///< their total size
  std::size_t tensors = 0;         ///< tensors converted
  double seconds = 0.0;            ///< wall time of the weight conversion (headers included)
};

/// Fills every parameter of `model` (built from the checkpoint's config, no adapters yet) from the
/// safetensors files of `dir`. All tensors are checked (names, shapes, dtypes) before any is
/// converted; on error the model is unchanged. Trainable flags are left as they are.
template <class T>
LlamaLoadReport load_llama_weights(LlamaForCausalLM<T>& model, const std::string& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  LlamaLoadReport report;
  const std::string index_path = dir + "/model.safetensors.index.json";
  const std::string single = dir + "/model.safetensors";
  std::vector<std::string> shard_names;
  std::map<std::string, std::string> weight_map;  // tensor → shard (sharded checkpoints)
  if (path_exists(index_path)) {
    const Json idx = parse_json_strict(read_text_file(index_path, 64u << 20), index_path);
    if (!idx.is_object() || !idx.contains("weight_map") || !idx.at("weight_map").is_object())
      throw IoError("\"" + index_path + "\": expected an object with a \"weight_map\" object");
    for (const auto& kv : idx.at("weight_map").items()) {
      if (!kv.value().is_string())
        throw IoError("\"" + index_path + "\": weight_map entry \"" + kv.key() + "\" is not a file name");
      const std::string f = kv.value().template get<std::string>();
      if (f.empty() || f.find('/') != std::string::npos || f == "." || f == "..")
        throw IoError("\"" + index_path + "\": weight_map entry \"" + kv.key() + "\" names \"" + f +
                      "\", expected a file name in the checkpoint directory");
      weight_map[kv.key()] = f;
      if (std::find(shard_names.begin(), shard_names.end(), f) == shard_names.end()) shard_names.push_back(f);
    }
  } else if (path_exists(single)) {
    shard_names.push_back("model.safetensors");
  } else {
    throw IoError("\"" + dir + "\": neither model.safetensors nor model.safetensors.index.json found");
  }

  std::map<std::string, Parameter<T>*> params;
  model.visit_parameters([&](const std::string& n, Parameter<T>& p) { params[n] = &p; });
  const bool tied = model.tied();
  struct Plan {
    const SafeTensorsFile* file;
    const TensorInfo* info;
    Parameter<T>* param;
  };
  std::map<std::string, AdaptedLinear<T>*> hosts;
  model.visit_modules([&](const std::string& path, Module<T>& m) {
    if (auto* a = dynamic_cast<AdaptedLinear<T>*>(&m)) hosts[path] = a;
  });
  std::vector<std::unique_ptr<SafeTensorsFile>> files;
  std::vector<Plan> plan;
  std::vector<std::pair<AdaptedLinear<T>*, quant::NF4Tensor>> nf4;  // bitsandbytes 4-bit bases
  std::set<std::string> seen;
  for (const std::string& name : shard_names) {
    const std::string path = dir + "/" + name;
    files.push_back(std::make_unique<SafeTensorsFile>(path));
    const SafeTensorsFile& st = *files.back();
    report.files.push_back(path);
    report.file_bytes += st.file().size();
    const std::vector<std::string> quantized = quant::bnb_4bit_prefixes(st);
    for (const std::string& prefix : quantized) {
      const auto h = hosts.find(prefix);
      if (h == hosts.end() || h->second->quantized())
        throw ConfigError("\"" + path + "\": 4-bit weight \"" + prefix + ".weight\": the model has no linear \"" +
                          prefix + "\" to hold it");
      quant::NF4Tensor q = quant::read_bnb_nf4(st, prefix);
      if (q.rows() != h->second->out_features() || q.cols() != h->second->in_features())
        throw ShapeError("\"" + path + "\": 4-bit weight \"" + prefix + ".weight\" has shape " +
                         shape_str(static_cast<Index>(q.rows()), static_cast<Index>(q.cols())) +
                         ", the model expects " + shape_str(h->second->out_features(), h->second->in_features()));
      if (!seen.insert(prefix + ".weight").second)
        throw ConfigError("\"" + path + "\": tensor \"" + prefix + ".weight\" appears twice");
      nf4.emplace_back(h->second, std::move(q));
    }
    auto is_quant_part = [&](const std::string& key) {
      for (const std::string& p : quantized)
        if (key.compare(0, p.size() + 7, p + ".weight") == 0 &&
            (key.size() == p.size() + 7 || key[p.size() + 7] == '.'))
          return true;
      return false;
    };
    for (const TensorInfo& t : st.tensors()) {
      const std::string& key = t.name;
      if (is_quant_part(key)) continue;  // read above
      if (!weight_map.empty()) {
        const auto w = weight_map.find(key);
        if (w == weight_map.end() || w->second != name)
          throw ConfigError("\"" + path + "\": tensor \"" + key + "\" is not listed for this shard in \"" + index_path +
                            "\"");
      }
      const bool inv_freq = key.size() > 20 && key.compare(key.size() - 20, 20, ".rotary_emb.inv_freq") == 0;
      if (inv_freq || (tied && key == "lm_head.weight")) continue;  // HF's buffer / HF re-ties it
      const auto it = params.find(key);
      if (it == params.end())
        throw ConfigError("\"" + path + "\": unexpected tensor \"" + key + "\" " + t.shape_string() +
                          ": the model (model_type " + model.config().model_type + ") has no such parameter");
      if (!seen.insert(key).second) throw ConfigError("\"" + path + "\": tensor \"" + key + "\" appears twice");
      Parameter<T>& p = *it->second;
      const std::vector<std::int64_t> want = p.shape();
      if (t.shape != want) {
        std::string w = "[";
        for (std::size_t i = 0; i < want.size(); ++i) w += (i ? ", " : "") + std::to_string(want[i]);
        throw ShapeError("\"" + path + "\": tensor \"" + key + "\" has shape " + t.shape_string() +
                         ", the model expects " + w + "]");
      }
      if (t.dtype != DType::F32 && t.dtype != DType::F16 && t.dtype != DType::BF16 && t.dtype != DType::F64)
        throw ConfigError("\"" + path + "\": tensor \"" + key + "\" has dtype " + dtype_name(t.dtype) +
                          ", expected F32, F16, BF16 or F64");
      plan.push_back({&st, &t, &p});
    }
  }
  for (const auto& kv : params)
    if (!seen.count(kv.first))
      throw ConfigError("\"" + dir + "\": missing tensor \"" + kv.first + "\" (shape " +
                        shape_str(kv.second->value.rows(), kv.second->value.cols()) + ")");
  for (const Plan& s : plan) s.file->template load_into<T>(*s.info, s.param->value.data());  // decode straight into W
  for (auto& [host, q] : nf4) {  // the 4-bit base replaces the (empty) dense one; the bias was loaded above
    RowVector<T> b;
    if (host->has_bias()) b = host->bias.value.row(0);
    const std::string name = host->name();
    *host = AdaptedLinear<T>(std::move(q), b, name);
  }
  if (!nf4.empty()) model.set_name(model.name());
  report.tensors = plan.size();
  report.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return report;
}

/// How load_llama builds the model.
struct LlamaLoadOptions {
  bool quantize_nf4 = false;  ///< NF4 base for every decoder linear (QLoRA), see the file comment
  quant::NF4Options nf4;      ///< blocksize, double quantization, ...
};

/// Replaces every decoder linear that is still dense by its NF4 quantization (bias dense, frozen);
/// lm_head and the embeddings stay dense. Refused (ConfigError naming the layer) for a linear that
/// already holds adapters. Returns the quantized paths.
template <class T>
std::vector<std::string> quantize_llama_nf4(LlamaForCausalLM<T>& model, const quant::NF4Options& opt = {}) {
  std::vector<std::string> done;
  for (LlamaDecoderLayer<T>& layer : model.model.layers) {
    for (AdaptedLinear<T>* lin :
         {&layer.self_attn.q_proj, &layer.self_attn.k_proj, &layer.self_attn.v_proj, &layer.self_attn.o_proj,
          &layer.mlp.gate_proj, &layer.mlp.up_proj, &layer.mlp.down_proj}) {
      if (lin->quantized()) continue;
      if (lin->num_adapters() > 0)
        throw ConfigError("quantize_llama_nf4: \"" + lin->name() +
                          "\" already holds adapters; quantize the base first");
      Linear<T> base;
      base.weight = lin->weight;
      if (lin->has_bias()) base.bias = lin->bias;
      const std::string name = lin->name();
      *lin = quantize_linear<T>(base, opt, name);
      done.push_back(name);
    }
  }
  model.set_name(model.name());
  return done;
}

/// Builds the model of `dir`/config.json and loads its weights. The model comes frozen (every
/// parameter; PEFT's get_peft_model freezes the base anyway): adapters added afterwards train, and
/// Parameter::set_trainable(true) makes any base parameter train.
template <class T>
LlamaForCausalLM<T> load_llama(const std::string& dir, LlamaLoadReport* report = nullptr) {
  if (!is_directory(dir)) throw IoError("\"" + dir + "\" is not a directory");
  LlamaForCausalLM<T> model(read_llama_config(dir + "/config.json"));
  const LlamaLoadReport r = load_llama_weights(model, dir);
  if (report != nullptr) *report = r;
  return model;
}

/// load_llama with options: `options.quantize_nf4` gives an NF4 base (see the file comment).
template <class T>
LlamaForCausalLM<T> load_llama(const std::string& dir, const LlamaLoadOptions& options,
                               LlamaLoadReport* report = nullptr) {
  LlamaForCausalLM<T> model = load_llama<T>(dir, report);
  if (options.quantize_nf4) quantize_llama_nf4(model, options.nf4);
  return model;
}

}  // namespace peft::io

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_IO_LLAMA_CHECKPOINT_TEMPLATES(KW, T) \
  KW template LlamaLoadReport load_llama_weights<T>(LlamaForCausalLM<T>&, const std::string&);
namespace peft::io {
PEFT_IO_LLAMA_CHECKPOINT_TEMPLATES(extern, float)
PEFT_IO_LLAMA_CHECKPOINT_TEMPLATES(extern, double)
}  // namespace peft::io
#endif
