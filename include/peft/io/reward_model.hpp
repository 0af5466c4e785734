#pragma once
// A reward model (models/reward_model.hpp) on disk: the base checkpoint stays where it is, and one
// directory holds what training added to it:
//
//   DIR/adapter_config.json + adapter_model.safetensors   the backbone's adapter, in PEFT's format
//                                                          (save_method_adapter: any method of the table)
//   DIR/reward_head.safetensors                            "score.weight" [1, hidden] (the scalar head)
//   DIR/reward_model.json                                  {"format": "peft-cpp reward model", "version": 1,
//                                                           "adapter": name, "hidden_size": d,
//                                                           "normalization": {"mean", "std", "count"}}
//
//   io::save_reward_model(dir, rm, "reward", lora_config, normalization);   // one atomic commit
//   LlamaRewardModel<float> rm2(config, std::move(base.model), rng);         // the same base
//   const RewardNormalization n = io::load_reward_model(dir, rm2);           // adapter + head + stats
//
// Loading gives back every parameter bit for bit (the tensors are stored in the model's precision
// and copied exactly) and the statistics exactly, hence the same raw and normalised rewards when
// scored the same way (the same batches, from a fresh model: a model's reused buffers keep the
// shapes of earlier batches, and Eigen's vectorised kernels may then round differently in the last
// bit). Needs nlohmann-json.
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/file.hpp"
#include "peft/io/json.hpp"
#include "peft/io/methods.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/models/reward_model.hpp"

namespace peft::io {

inline constexpr const char* kRewardHeadFile = "reward_head.safetensors";
inline constexpr const char* kRewardModelFile = "reward_model.json";
inline constexpr const char* kRewardModelFormat = "peft-cpp reward model";

/// Writes `rm`'s adapter `adapter_name` (described by `adapter_config`, e.g. the JSON given to
/// apply_method), its head and `normalization` into `dir` (see the file comment), all committed
/// together (AtomicDirectory). ConfigError when no layer holds the adapter or the statistics are
/// invalid.
template <class T>
void save_reward_model(const std::string& dir, LlamaRewardModel<T>& rm, const std::string& adapter_name,
                       const Json& adapter_config, const RewardNormalization& normalization) {
  const std::string who = "save_reward_model \"" + dir + "\"";
  normalization.validate(who);
  bool found = false;
  for (auto& [path, host] : adapted_linears(rm)) found = found || host->has_adapter(adapter_name);
  if (!found) throw ConfigError(who + ": no layer of the reward model holds adapter \"" + adapter_name + "\"");
  AtomicDirectory out(dir);
  save_method_adapter(out.staging(), rm, adapter_name, adapter_config);
  const Matrix<T>& w = rm.score.weight.value;
  save_safetensors<T>(out.staging() + "/" + kRewardHeadFile,
                      {NamedTensor<T>("score.weight", {w.rows(), w.cols()}, w.data())});
  Json meta = {
      {"format", kRewardModelFormat},
      {"version", 1},
      {"adapter", adapter_name},
      {"hidden_size", static_cast<std::int64_t>(w.cols())},
      {"normalization", {{"mean", normalization.mean}, {"std", normalization.std}, {"count", normalization.count}}}};
  write_file_atomic(out.staging() + "/" + kRewardModelFile, meta.dump(2) + "\n");
  out.commit();
}

/// Reads `dir`'s reward_model.json: the adapter name and the statistics (validated).
inline RewardNormalization read_reward_model_info(const std::string& dir, std::string* adapter_name = nullptr,
                                                  std::int64_t* hidden_size = nullptr) {
  const std::string path = dir + "/" + kRewardModelFile;
  const Json j = parse_json_strict(read_text_file(path, 1u << 20), path);
  const auto field = [&](const Json& obj, const char* key, const char* where) -> const Json& {
    if (!obj.is_object() || !obj.contains(key))
      throw IoError("\"" + path + "\": missing key \"" + std::string(key) + "\"" + where);
    return obj.at(key);
  };
  if (!j.is_object() || !j.contains("format") || j.at("format") != kRewardModelFormat)
    throw IoError("\"" + path + "\": not a reward model file (\"format\" must be \"" + kRewardModelFormat + "\")");
  const Json& n = field(j, "normalization", "");
  RewardNormalization out;
  const Json &mean = field(n, "mean", " in \"normalization\""), &sd = field(n, "std", " in \"normalization\""),
             &count = field(n, "count", " in \"normalization\"");
  if (!mean.is_number() || !sd.is_number() || !count.is_number_integer())
    throw IoError("\"" + path + "\": \"normalization\" needs numbers mean and std and an integer count");
  out.mean = mean.get<double>();
  out.std = sd.get<double>();
  out.count = count.get<std::int64_t>();
  out.validate("\"" + path + "\"");
  const Json& adapter = field(j, "adapter", "");
  const Json& hidden = field(j, "hidden_size", "");
  if (!adapter.is_string() || !hidden.is_number_integer())
    throw IoError("\"" + path + "\": \"adapter\" must be a string and \"hidden_size\" an integer");
  if (adapter_name != nullptr) *adapter_name = adapter.get<std::string>();
  if (hidden_size != nullptr) *hidden_size = hidden.get<std::int64_t>();
  return out;
}

/// Loads what save_reward_model wrote into `rm` (its backbone the same base the reward model was
/// trained on, without that adapter): the adapter under its saved name (active), the head's
/// weight, and returns the statistics. Everything is read and checked before the model changes.
template <class T>
RewardNormalization load_reward_model(const std::string& dir, LlamaRewardModel<T>& rm) {
  if (!is_directory(dir)) throw IoError("\"" + dir + "\" is not a directory");
  std::string adapter;
  std::int64_t hidden = 0;
  const RewardNormalization n = read_reward_model_info(dir, &adapter, &hidden);
  const Index d = rm.score.in_features();
  if (hidden != static_cast<std::int64_t>(d))
    throw ShapeError("load_reward_model \"" + dir + "\": the reward model was saved with hidden_size " +
                     std::to_string(hidden) + ", this model has " + std::to_string(d));
  const std::string head_path = dir + "/" + kRewardHeadFile;
  const SafeTensorsFile head = open_safetensors(head_path, "the reward model's head (score.weight)");
  if (!head.contains("score.weight")) throw IoError("\"" + head_path + "\": no tensor \"score.weight\"");
  Matrix<T> w = head.load<T>("score.weight");
  if (w.rows() != 1 || w.cols() != d)
    throw ShapeError("\"" + head_path + "\": score.weight has shape " + shape_str(w.rows(), w.cols()) + ", expected " +
                     shape_str(1, d));
  if (!w.allFinite()) throw NumericError("\"" + head_path + "\": score.weight holds NaN or Inf");
  const MethodAdapterFile<T> file = read_method_adapter<T>(dir);
  load_method_adapter(rm, file, adapter);
  rm.score.weight.value = w;
  return n;
}

}  // namespace peft::io
