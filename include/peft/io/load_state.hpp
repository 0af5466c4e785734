#pragma once
// Loading pretrained weights into any library model, and saving a whole model's state: PyTorch's
// `model.load_state_dict(safetensors.torch.load_file(f), strict=...)` and
// `safetensors.torch.save_file(model.state_dict(), f)` for a peft::Module.
//
//   load_safetensors(model, "model.safetensors", options) -> LoadStateReport
//   load_safetensors(model, "model.safetensors.index.json", options)   (a sharded checkpoint)
//   save_safetensors(model, "out.safetensors")
//
// Names. A file key is turned into a model parameter name (the dotted names of
// Module::visit_parameters, e.g. "layers.0.attn.q_proj.weight") by LoadStateOptions::rename (exact
// file key → name) if it lists the key, else by LoadStateOptions::name_map (any callable, e.g.
// strip_prefix("model.") or one made with rename_prefixes) if set, else unchanged. A key mapped to
// "" is skipped (reported, never loaded). Two keys mapped to one name are refused.
//
// As torch's load_state_dict: `missing` are model parameters no file key maps to, `unexpected`
// file keys that map to no parameter, `loaded` the parameters given values. strict (the default):
// any missing or unexpected key is a ConfigError listing them. A shape that differs from the
// parameter's (PyTorch shapes: [n] for a bias, [out, in] for a weight) is always a ShapeError
// naming the key, the expected and the actual shape. Values must be finite: a NaN or Inf is a
// NumericError naming the key and the element. F64, F32, F16 and BF16 tensors are converted to the
// model's scalar; an integer or bool tensor (e.g. a bitsandbytes NF4 weight, packed in U8) is a
// ConfigError, never a silent cast of bytes. Every check runs and every value is decoded into a
// staging copy before the first parameter changes: on any error the model is unchanged.
//
// Adapters. A model with adapters attached (AdaptedLinear hosts, bottleneck adapters, prompt
// encoders) has parameters a base checkpoint cannot hold; ignore_adapter_parameters leaves them out
// of `missing` (as PEFT loads the base before the adapters; report.ignored_adapter lists them).
// Which names are an adapter's is decided by is_adapter_parameter (default: a dotted segment that
// starts with a PEFT tuner prefix: lora_, vera_lambda_, hada_, lokr_, ia3_l, adapter_down,
// adapter_up, adapter_attn, prompt_encoder, prefix_encoder, and modules_to_save: PEFT's per-adapter
// copies of a head). Load a base before merging adapters into it: the host's weight then holds
// W₀ + ΔW, and a loaded weight replaces that sum.
//
// Sharded checkpoints: a path ending in ".json" is read as transformers' index
// (`{"metadata": {...}, "weight_map": {key: "model-00001-of-00002.safetensors", ...}}`); every shard
// it names (a plain file name in the index's directory) is opened, each key must be in the shard the
// map names, and the shards' tensors are loaded as one file's. A shard's tensor that the map does
// not list is refused (IoError), as is a key the map puts in a shard that lacks it.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/module.hpp"
#include "peft/core/types.hpp"
#include "peft/io/file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/safetensors.hpp"

namespace peft::io {

/// File key → model parameter name; "" skips the key.
using NameMap = std::function<std::string(const std::string& file_key)>;

/// A NameMap removing `prefix` from the keys that start with it (others are unchanged), e.g.
/// strip_prefix("model.") for a Hugging Face checkpoint of a model whose names start below it.
inline NameMap strip_prefix(std::string prefix) {
  return [prefix = std::move(prefix)](const std::string& key) {
    return key.rfind(prefix, 0) == 0 ? key.substr(prefix.size()) : key;
  };
}

/// A NameMap rewriting the first matching prefix (FROM → TO, in order); keys no rule matches are
/// unchanged. E.g. {{"model.layers.", "layers."}, {"lm_head.", "classifier."}}.
inline NameMap rename_prefixes(std::vector<std::pair<std::string, std::string>> rules) {
  return [rules = std::move(rules)](const std::string& key) {
    for (const auto& r : rules)
      if (key.rfind(r.first, 0) == 0) return r.second + key.substr(r.first.size());
    return key;
  };
}

/// True for a name with a dotted segment that starts with a PEFT tuner prefix (see the file
/// comment): "layers.0.q.lora_A.default.weight", "ia3_l.default", "adapter_attn.adapter_down".
inline bool is_peft_adapter_parameter(const std::string& name) {
  static const char* const kPrefixes[] = {"lora_",          "vera_lambda_",   "hada_",          "lokr_",
                                          "ia3_l",          "adapter_down",   "adapter_up",     "adapter_attn",
                                          "prompt_encoder", "prefix_encoder", "modules_to_save"};
  std::size_t start = 0;
  while (start <= name.size()) {
    for (const char* p : kPrefixes)
      if (name.compare(start, std::char_traits<char>::length(p), p) == 0) return true;
    const std::size_t dot = name.find('.', start);
    if (dot == std::string::npos) break;
    start = dot + 1;
  }
  return false;
}

struct LoadStateOptions {
  /// torch's strict: any missing or unexpected key is an error (and nothing changes).
  bool strict = true;
  /// Exact file key → parameter name ("" skips the key); consulted before name_map.
  std::map<std::string, std::string> rename;
  /// Any file key → parameter name ("" skips the key); unset: names are unchanged.
  NameMap name_map;
  /// Leave adapter parameters out of `missing` (load a base checkpoint into a model with adapters).
  bool ignore_adapter_parameters = false;
  /// Which parameter names are an adapter's (unset: is_peft_adapter_parameter).
  std::function<bool(const std::string& name)> is_adapter_parameter;
};

/// What a load did; names are the model's, except `unexpected` and `skipped` (file keys).
struct LoadStateReport {
  std::vector<std::string> loaded;           ///< parameters given values, in the model's order
  std::vector<std::string> missing;          ///< parameters no key maps to (model order)
  std::vector<std::string> unexpected;       ///< file keys that name no parameter (file order)
  std::vector<std::string> ignored_adapter;  ///< adapter parameters left out of `missing`
  std::vector<std::string> skipped;          ///< file keys the name map sent to ""
  bool complete() const { return missing.empty() && unexpected.empty(); }
};

/// One or more open safetensors files read as one state dict (a checkpoint or the shards of one).
class SafeTensorsState {
 public:
  /// A single .safetensors file, or a sharded checkpoint's index (path ending in ".json").
  explicit SafeTensorsState(const std::string& path) : label_(path) {
    if (path.size() >= 5 && path.compare(path.size() - 5, 5, ".json") == 0)
      open_index(path);
    else
      add_file(std::make_shared<SafeTensorsFile>(path));
  }

  const std::string& label() const { return label_; }
  /// (key, file) pairs: files in the order opened, keys in each file's order.
  const std::vector<std::pair<const TensorInfo*, const SafeTensorsFile*>>& tensors() const { return tensors_; }
  const std::vector<std::shared_ptr<const SafeTensorsFile>>& files() const { return files_; }

 private:
  void add_file(std::shared_ptr<const SafeTensorsFile> f) {
    for (const TensorInfo& t : f->tensors()) tensors_.emplace_back(&t, f.get());
    files_.push_back(std::move(f));
  }

  void open_index(const std::string& path) {
    const Json j = parse_json_strict(read_text_file(path), path);
    if (!j.is_object() || !j.contains("weight_map") || !j.at("weight_map").is_object())
      throw IoError("\"" + path + "\": a sharded checkpoint index needs an object \"weight_map\" {key: shard file}");
    std::map<std::string, std::set<std::string>> keys_of;  // shard → keys the map puts there
    for (const auto& kv : j.at("weight_map").items()) {
      if (!kv.value().is_string())
        throw IoError("\"" + path + "\": weight_map[\"" + kv.key() + "\"] must be a shard file name, got " +
                      kv.value().dump());
      const std::string shard = kv.value().get<std::string>();
      // A plain name in the index's directory: never a path elsewhere.
      if (shard.empty() || shard.find('/') != std::string::npos || shard == "." || shard == "..")
        throw IoError("\"" + path + "\": weight_map[\"" + kv.key() + "\"] = \"" + shard +
                      "\" is not a file name in the index's directory");
      keys_of[shard].insert(kv.key());
    }
    const std::string dir = detail::parent_dir(path);
    std::vector<std::shared_ptr<const SafeTensorsFile>> shards;
    for (const auto& kv : keys_of) {
      shards.push_back(std::make_shared<SafeTensorsFile>(dir + "/" + kv.first));
      for (const std::string& key : kv.second)
        if (!shards.back()->contains(key))
          throw IoError("\"" + path + "\": weight_map puts \"" + key + "\" in \"" + kv.first +
                        "\", which has no such tensor");
    }
    std::size_t i = 0;
    for (const auto& kv : keys_of) {
      for (const TensorInfo& t : shards[i]->tensors())
        if (kv.second.count(t.name) == 0)
          throw IoError("\"" + path + "\": shard \"" + kv.first + "\" holds \"" + t.name +
                        "\", which the weight_map does not list there");
      add_file(std::move(shards[i++]));
    }
  }

  std::string label_;
  std::vector<std::shared_ptr<const SafeTensorsFile>> files_;
  std::vector<std::pair<const TensorInfo*, const SafeTensorsFile*>> tensors_;
};

namespace detail {

/// "a", "b", "c" and 4 more (names quoted, at most `max` listed).
inline std::string name_list(const std::vector<std::string>& names, std::size_t max = 20) {
  std::string s;
  for (std::size_t i = 0; i < names.size() && i < max; ++i) s += (i ? ", \"" : "\"") + names[i] + "\"";
  if (names.size() > max) s += " and " + std::to_string(names.size() - max) + " more";
  return s;
}

inline std::string shape_list(const std::vector<std::int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

}  // namespace detail

/// Loads the tensors of `state` into `model`'s parameters (see the file comment); on any error
/// the model is unchanged.
template <class T>
LoadStateReport load_safetensors(Module<T>& model, const SafeTensorsState& state, const LoadStateOptions& opt = {}) {
  const std::string who = "load_safetensors \"" + state.label() + "\"";
  std::vector<std::pair<std::string, Parameter<T>*>> params;
  std::unordered_map<std::string, std::size_t> index;
  model.visit_parameters([&](const std::string& name, Parameter<T>& p) {
    if (index.emplace(name, params.size()).second) params.emplace_back(name, &p);
  });

  LoadStateReport rep;
  struct Planned {
    std::size_t param;
    const TensorInfo* info;
    const SafeTensorsFile* file;
  };
  std::vector<Planned> plan;
  std::vector<std::string> source_of(params.size());  // the file key each parameter comes from
  std::vector<std::string> shape_errors;
  for (const auto& entry : state.tensors()) {
    const TensorInfo& t = *entry.first;
    std::string name = t.name;
    const auto r = opt.rename.find(t.name);
    if (r != opt.rename.end())
      name = r->second;
    else if (opt.name_map)
      name = opt.name_map(t.name);
    if (name.empty()) {
      rep.skipped.push_back(t.name);
      continue;
    }
    const auto it = index.find(name);
    if (it == index.end()) {
      rep.unexpected.push_back(t.name);
      continue;
    }
    if (!source_of[it->second].empty())
      throw ConfigError(who + ": file keys \"" + source_of[it->second] + "\" and \"" + t.name +
                        "\" both map to parameter \"" + name + "\"");
    source_of[it->second] = t.name;
    const Parameter<T>& p = *params[it->second].second;
    const std::vector<std::int64_t> want = p.shape();
    if (t.shape != want) {
      shape_errors.push_back("\"" + t.name + "\"" + (name != t.name ? " (parameter \"" + name + "\")" : "") +
                             ": expected " + detail::shape_list(want) + ", file has " + t.shape_string());
      continue;
    }
    if (!dtype_is_float(t.dtype))
      throw ConfigError(who + ": tensor \"" + t.name + "\" is " + dtype_name(t.dtype) +
                        "; only F64, F32, F16 and BF16 tensors load into parameters (a quantized weight needs its own "
                        "loader)");
    plan.push_back({it->second, &t, entry.second});
  }
  if (!shape_errors.empty()) {
    std::string msg = who + ": " + std::to_string(shape_errors.size()) + " tensor" +
                      (shape_errors.size() == 1 ? "" : "s") + " of the wrong shape: ";
    for (std::size_t i = 0; i < shape_errors.size() && i < 20; ++i) msg += (i ? "; " : "") + shape_errors[i];
    if (shape_errors.size() > 20) msg += "; and " + std::to_string(shape_errors.size() - 20) + " more";
    throw ShapeError(msg + " (nothing was loaded)");
  }
  const auto is_adapter = opt.is_adapter_parameter ? opt.is_adapter_parameter : is_peft_adapter_parameter;
  for (std::size_t i = 0; i < params.size(); ++i) {
    if (!source_of[i].empty()) continue;
    if (opt.ignore_adapter_parameters && is_adapter(params[i].first))
      rep.ignored_adapter.push_back(params[i].first);
    else
      rep.missing.push_back(params[i].first);
  }
  if (opt.strict && !rep.complete()) {
    std::string msg = who + ": strict load: ";
    if (!rep.missing.empty())
      msg += std::to_string(rep.missing.size()) +
             " missing (model parameters the file lacks): " + detail::name_list(rep.missing);
    if (!rep.unexpected.empty())
      msg += std::string(rep.missing.empty() ? "" : "; ") + std::to_string(rep.unexpected.size()) +
             " unexpected (file tensors that name no parameter): " + detail::name_list(rep.unexpected);
    throw ConfigError(msg + " (nothing was loaded; strict = false loads the rest, a name map renames keys)");
  }

  // Decode into staging copies (model order), check them, then install: nothing there can fail.
  std::sort(plan.begin(), plan.end(), [](const Planned& a, const Planned& b) { return a.param < b.param; });
  std::vector<Matrix<T>> staged(plan.size());
  for (std::size_t k = 0; k < plan.size(); ++k) {
    const Planned& s = plan[k];
    const Parameter<T>& p = *params[s.param].second;
    Matrix<T>& m = staged[k];
    m.resize(p.value.rows(), p.value.cols());
    s.file->template load_into<T>(*s.info, m.data());
    if (!all_finite(m)) {
      Index at = 0;
      while (std::isfinite(m.data()[at])) ++at;
      // A finite F64 beyond float's range becomes Inf on conversion: say so.
      const bool narrowed = dtype_size(s.info->dtype) > sizeof(T);
      throw NumericError(who + ": tensor \"" + s.info->name + "\" element " + std::to_string(at) + " is " +
                         check::num(static_cast<double>(m.data()[at])) + " as " + dtype_name(native_dtype<T>()) + " (" +
                         dtype_name(s.info->dtype) + " in the file" + (narrowed ? ", perhaps beyond its range" : "") +
                         "); a parameter may not hold NaN or Inf, nothing was loaded");
    }
  }
  for (std::size_t k = 0; k < plan.size(); ++k) {
    params[plan[k].param].second->value.swap(staged[k]);
    rep.loaded.push_back(params[plan[k].param].first);
  }
  return rep;
}

/// Loads a .safetensors file, or a sharded checkpoint's index (".json"), into `model`.
template <class T>
LoadStateReport load_safetensors(Module<T>& model, const std::string& path, const LoadStateOptions& opt = {}) {
  return load_safetensors(model, SafeTensorsState(path), opt);
}

/// load_safetensors with only a name map (strict unless told otherwise).
template <class T>
LoadStateReport load_safetensors(Module<T>& model, const std::string& path, NameMap name_map, bool strict = true) {
  LoadStateOptions opt;
  opt.name_map = std::move(name_map);
  opt.strict = strict;
  return load_safetensors(model, SafeTensorsState(path), opt);
}

struct SaveStateOptions {
  /// File dtype of every tensor (F32, F64, F16 or BF16); F32 / F64 by default (T's own).
  DType dtype = native_dtype<float>();
  bool native = true;                           ///< ignore `dtype` and store T's own type (bit-exact round trip)
  bool trainable_only = false;                  ///< only trainable parameters (e.g. the adapters of a frozen base)
  std::map<std::string, std::string> metadata;  ///< the file's __metadata__ (e.g. {"format", "pt"})
};

/// Saves every parameter of `model` (its state dict) under its dotted name with its PyTorch shape,
/// atomically (io::save_safetensors: temporary + rename, the mode of a replaced file kept). A NaN or
/// Inf refuses (NumericError) and nothing is written; so does a value beyond F16 / BF16's range.
template <class T>
void save_safetensors(Module<T>& model, const std::string& path, const SaveStateOptions& opt = {}) {
  const DType dtype = opt.native ? native_dtype<T>() : opt.dtype;
  if (!dtype_is_float(dtype))
    throw ConfigError("save_safetensors \"" + path + "\": dtype " + dtype_name(dtype) +
                      " is not a floating-point type (F64, F32, F16, BF16)");
  std::vector<NamedTensor<T>> out;
  model.visit_parameters([&](const std::string& name, Parameter<T>& p) {
    if (!opt.trainable_only || p.trainable()) out.emplace_back(name, p.shape(), p.value.data(), dtype);
  });
  save_safetensors<T>(path, out, opt.metadata);
}

}  // namespace peft::io
