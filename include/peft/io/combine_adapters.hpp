#pragma once
// Combining whole adapter directories into one LoRA adapter directory (`peft combine`), with any
// method that has a LoRA-factor form as a source (LoRA, VeRA, LoHa, LoKr; io/adapter_factors.hpp),
// mixed freely. Per module, the sources' factors go through peft::combine (merge/combine.hpp: cat,
// svd, linear, ties, dare_linear, dare_ties, magnitude_prune) with the same weights for every module;
// the result is a PEFT LoRA adapter with scaling 1 per module (alpha = r, rank_pattern where the
// ranks differ), loadable by Hugging Face PEFT.
//
// The sources must adapt the same modules and agree on fan_in_fan_out. A VeRA module's input size
// comes from another source of the same module, or from CombineAdaptersOptions::shapes (e.g. the
// base model's header); a LoRA source that also carries full tensors (modules_to_save, biases) is
// refused rather than silently losing them.
#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/adapter_factors.hpp"
#include "peft/io/peft_format.hpp"
#include "peft/merge/combine.hpp"

namespace peft::io {

/// A LoRA config storing unit-scaling factors whose ranks may differ per module: r is the most
/// common rank, the others go to rank_pattern (alpha = r everywhere, or √r with rsLoRA, so every
/// scaling is 1). `ranks`: module path → rank, in the order the modules are written.
inline AdapterConfig unit_scaling_adapter_config(const std::vector<std::pair<std::string, Index>>& ranks,
                                                 bool use_rslora, const std::string& base_model) {
  AdapterConfig c;
  c.peft_type = "LORA";
  c.use_rslora = use_rslora;
  c.base_model_name_or_path = base_model;
  std::map<Index, int> count;
  for (const auto& r : ranks) ++count[r.second];
  Index common = 1;
  int best = -1;
  for (const auto& kv : count)
    if (kv.second > best) {
      best = kv.second;
      common = kv.first;
    }
  auto alpha_of = [&](Index r) { return use_rslora ? std::sqrt(static_cast<double>(r)) : static_cast<double>(r); };
  c.r = static_cast<int>(common);
  c.lora_alpha = alpha_of(common);
  std::vector<std::string> paths;
  for (const auto& r : ranks) {
    paths.push_back(r.first);
    if (r.second != common) {
      // The full module path as key, as PEFT writes it (matched by "(.*\.)?(key)$").
      c.rank_pattern.emplace_back(r.first, static_cast<int>(r.second));
      c.alpha_pattern.emplace_back(r.first, alpha_of(r.second));
    }
  }
  c.target_modules = ModuleSelector::list(std::move(paths));
  c.raw = Json::object();
  c.raw["task_type"] = nullptr;
  return c;
}

struct CombineAdaptersOptions {
  /// method, rank, density, seed, majority_sign as peft::combine takes them (use_rslora is ignored:
  /// the result is written with alpha = r).
  CombineOptions combine;
  std::vector<double> weights;  ///< one per source; empty: 1 for each
  /// [out, in] per module path, for VeRA modules whose input size no other source fixes (e.g.
  /// module_shapes_of_safetensors(base model)). Other modules take their shapes from their tensors.
  ModuleShapes shapes;
  /// Called after each module with (modules done, module count), e.g. for a progress line.
  std::function<void(std::size_t done, std::size_t count)> on_module;
};

/// What a combination did (the truncation errors come from peft::combine).
struct CombineAdaptersReport {
  std::size_t adapters = 0;
  std::size_t modules = 0;
  double largest_error = 0.0;  ///< max over modules of ‖ΔW_target − B'A'‖_F (0 when lossless)
};

/// Combines sources already read as factors (read_adapter_factors) into a LoRA adapter with
/// scaling 1 per module (see the file comment). Everything is checked before any module is combined.
template <class T>
PeftAdapter<T> combine_adapters(std::vector<AdapterFactors<T>> sources, const CombineAdaptersOptions& opt = {},
                                CombineAdaptersReport* report = nullptr) {
  const std::size_t n = sources.size();
  if (n == 0) throw ConfigError("combine: needs at least one adapter");
  const std::vector<double> weights = opt.weights.empty() ? std::vector<double>(n, 1.0) : opt.weights;
  if (weights.size() != n)
    throw ConfigError("combine: " + std::to_string(weights.size()) + " weights for " + std::to_string(n) + " adapters");
  const std::string& first = sources[0].source;
  for (const AdapterFactors<T>& s : sources) {
    if (s.fan_in_fan_out != sources[0].fan_in_fan_out)
      throw ConfigError("combine: \"" + s.source + "\" and \"" + first + "\" disagree on fan_in_fan_out");
    if (!s.full_tensors.empty())  // modules_to_save: whole tensors, no factors to combine
      throw ConfigError("combine: \"" + s.source + "\" also holds " + std::to_string(s.full_tensors.size()) +
                        " full tensors (modules_to_save, e.g. \"" + s.full_tensors.front() +
                        "\"); combine works on LoRA factors only and would drop them");
  }
  for (std::size_t i = 1; i < n; ++i) {
    if (sources[i].modules.size() != sources[0].modules.size())
      throw ConfigError("combine: \"" + sources[i].source + "\" adapts " + std::to_string(sources[i].modules.size()) +
                        " modules, \"" + first + "\" adapts " + std::to_string(sources[0].modules.size()));
    for (const auto& kv : sources[0].modules)
      if (sources[i].modules.count(kv.first) == 0)
        throw ConfigError("combine: \"" + sources[i].source + "\" has no module \"" + kv.first +
                          "\" (adapters must target the same modules)");
  }
  // Open input sizes (VeRA): from a source that knows the module's, or from the given shapes.
  for (const auto& kv : sources[0].modules) {
    const std::string& path = kv.first;
    Index in = 0;
    for (const AdapterFactors<T>& s : sources)
      if (s.open_in.count(path) == 0) in = s.modules.at(path).in_features();
    if (in == 0 && opt.shapes.count(path)) in = opt.shapes.at(path).second;
    for (AdapterFactors<T>& s : sources) {
      if (s.open_in.count(path) == 0) continue;
      if (in == 0)
        throw ConfigError(
            "combine: " + s.kind + " module \"" + path + "\" of \"" + s.source +
            "\": its input size is not stored in the adapter directory (the shared vera_A [r, in_max] has " +
            std::to_string(s.modules.at(path).in_features()) +
            " columns, in_max over all its modules); give the base model's shapes (peft combine --base "
            "MODEL.safetensors) or combine it with an adapter of another method on that module");
      fit_input_size(s, path, in, "combine");
    }
  }

  PeftAdapter<T> result;
  std::vector<std::pair<std::string, Index>> ranks;
  CombineAdaptersReport rep;
  rep.adapters = n;
  const std::size_t count = sources[0].modules.size();
  for (const auto& kv : sources[0].modules) {
    const std::string& path = kv.first;
    std::vector<LoraFactors<T>> fs;
    fs.reserve(n);
    for (const AdapterFactors<T>& s : sources) fs.push_back(s.modules.at(path));
    CombineResult<T> r = combine(fs, weights, opt.combine, path);
    LoraModuleWeights<T> w;
    w.path = path;
    w.A = std::move(r.factors.A);
    w.B = std::move(r.factors.B);
    w.scaling = 1.0;
    ranks.emplace_back(w.path, w.A.rows());
    rep.largest_error = std::max(rep.largest_error, r.frobenius_error);
    result.lora.push_back(std::move(w));
    if (opt.on_module) opt.on_module(result.lora.size(), count);
  }
  rep.modules = result.lora.size();
  result.config = unit_scaling_adapter_config(ranks, false, sources[0].base_model_name_or_path);
  result.config.fan_in_fan_out = sources[0].fan_in_fan_out;
  for (auto& m : result.lora) m.alpha = result.config.alpha_for(m.path);
  if (report != nullptr) *report = rep;
  return result;
}

/// Combines the adapter directories `dirs` (LoRA, VeRA, LoHa, LoKr, mixed) and saves the result as
/// a PEFT LoRA adapter directory `out_dir` (written atomically: see save_peft_adapter). Nothing is
/// written unless every source reads and every module combines.
template <class T = double>
CombineAdaptersReport combine_adapter_dirs(const std::vector<std::string>& dirs, const std::string& out_dir,
                                           const CombineAdaptersOptions& opt = {}) {
  if (dirs.empty()) throw ConfigError("combine: needs at least one adapter directory");
  std::vector<AdapterFactors<T>> sources;
  sources.reserve(dirs.size());
  for (const std::string& d : dirs) sources.push_back(read_adapter_factors<T>(d, opt.shapes, "combine"));
  CombineAdaptersReport rep;
  const PeftAdapter<T> result = combine_adapters<T>(std::move(sources), opt, &rep);
  save_peft_adapter(out_dir, result);
  return rep;
}

}  // namespace peft::io

// The test build compiles these once (tests/support/instantiations_io.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_IO_COMBINE_TEMPLATES(KW, T) \
  KW template PeftAdapter<T> combine_adapters<T>(std::vector<AdapterFactors<T>>, const CombineAdaptersOptions&, \
                                                 CombineAdaptersReport*);
namespace peft::io {
PEFT_IO_COMBINE_TEMPLATES(extern, float)
PEFT_IO_COMBINE_TEMPLATES(extern, double)
}  // namespace peft::io
#endif
