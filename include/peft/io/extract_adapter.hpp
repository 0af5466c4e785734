#pragma once
// Extracting a LoRA adapter directory from a full fine-tune (`peft extract`): given the base and the
// tuned checkpoint (one .safetensors file each, same tensors and shapes), every floating-point
// tensor that differs is classified, and the result is a PEFT LoRA adapter that Hugging Face PEFT
// loads:
//   - a 2-D "<module>.weight" not fully matched by `exclude` becomes a low-rank module: B A is the
//     best rank-k approximation of ΔW = W_tuned − W_base (peft::extract_lora, merge/extract.hpp:
//     truncated SVD, k given or chosen by energy), stored with scaling 1 (alpha = r, rank_pattern
//     where ranks differ; see unit_scaling_adapter_config);
//   - with keep_full, every other changed tensor is saved whole: the bias of a low-rank module as
//     PEFT's bias = "lora_only", anything else as part of its module (the name up to its last dot)
//     in modules_to_save; without keep_full those are reported in not_captured.
// So merging the adapter into the base gives back the tuned model up to the SVD error.
//
// The default exclude pattern keeps embedding tables out of the low-rank part: PEFT gives an
// nn.Embedding a LoRA of its own layout (lora_embedding_A / _B); written as lora_A / lora_B they
// would load as unexpected keys and be dropped. fan_in_fan_out: weights are stored [in, out]
// (GPT-2's Conv1D); ΔW is transposed before the SVD, and the config says fan_in_fan_out.
#include <algorithm>
#include <functional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/regex.hpp"
#include "peft/core/separate.hpp"
#include "peft/io/combine_adapters.hpp"
#include "peft/io/peft_format.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/merge/extract.hpp"

namespace peft::io {

/// Default ExtractAdapterOptions::exclude: embedding tables (see the file comment).
constexpr const char* kExtractExclude = R"((.*\.)?([a-z_]*embed[a-z_]*|wte|wpe)\.weight)";

struct ExtractAdapterOptions {
  /// rank k or energy τ (exactly one), use_rslora (alpha = √r instead of r; scaling stays 1).
  ExtractOptions svd;
  /// Tensors fully matching this regex are never low rank.
  std::string exclude = kExtractExclude;
  /// How messages name the exclude pattern (the CLI: "--exclude").
  std::string exclude_label = "the exclude pattern";
  bool fan_in_fan_out = false;  ///< weights stored [in, out] (GPT-2 Conv1D)
  bool keep_full = false;       ///< save changed tensors that are not low rank whole
  /// Called after each low-rank module with (modules done, module count), e.g. for a progress line.
  std::function<void(std::size_t done, std::size_t count)> on_module;
};

/// One low-rank module: its rank and how well B A fits ΔW.
struct ExtractedModule {
  std::string path;
  Index rank = 0;
  double energy_kept = 1.0;      ///< Σ_{j≤k} σ_j² / Σ_j σ_j²
  double frobenius_error = 0.0;  ///< ‖ΔW − BA‖_F
  double sigma_next = 0.0;       ///< σ_{k+1} = ‖ΔW − BA‖_2
};

struct ExtractAdapterReport {
  std::vector<ExtractedModule> modules;      ///< low-rank modules, in file order
  std::vector<std::string> kept_full;        ///< changed tensors saved whole (keep_full)
  std::vector<std::string> not_captured;     ///< changed tensors neither low rank nor kept
  std::vector<std::string> modules_to_save;  ///< modules whose tensors were kept whole
  bool lora_biases = false;                  ///< bias = "lora_only" (a low-rank module's bias changed)
};

/// The adapter extracted from `base` and `tuned` (see the file comment); the report says what
/// became what. ConfigError when the files hold different tensors or nothing low-rank changed,
/// ShapeError when a tensor's shape differs, NumericError when a difference overflows.
PEFT_SEPARATE_INLINE PeftAdapter<double> extract_adapter(const SafeTensorsFile& base, const SafeTensorsFile& tuned,
                                                         const ExtractAdapterOptions& opt,
                                                         ExtractAdapterReport* report = nullptr);
/// Extracts the adapter of `tuned_file` over `base_file` and saves it as a PEFT LoRA adapter
/// directory `out_dir` (atomically, see save_peft_adapter): nothing is written unless every module
/// extracts. A JSON file given for a checkpoint is named as such (open_safetensors).
PEFT_SEPARATE_INLINE ExtractAdapterReport extract_adapter_dir(const std::string& base_file,
                                                              const std::string& tuned_file, const std::string& out_dir,
                                                              const ExtractAdapterOptions& opt);

#if PEFT_SEPARATE_BODIES  // (peft/core/separate.hpp)
PEFT_SEPARATE_INLINE PeftAdapter<double> extract_adapter(const SafeTensorsFile& base, const SafeTensorsFile& tuned,
                                                         const ExtractAdapterOptions& opt,
                                                         ExtractAdapterReport* report) {
  const Regex exclude = compile_name_regex(opt.exclude, "extract: " + opt.exclude_label);
  for (const TensorInfo& u : tuned.tensors())
    if (!base.contains(u.name))
      throw ConfigError("extract: the base \"" + base.path() + "\" has no tensor \"" + u.name +
                        "\" (the tuned model has it)");

  // Pass 1: which float tensors changed, and which of them become low-rank modules.
  std::vector<const TensorInfo*> changed;
  std::set<std::string> lora_paths;
  for (const TensorInfo& t : base.tensors()) {
    if (!tuned.contains(t.name))
      throw ConfigError("extract: the tuned model \"" + tuned.path() + "\" has no tensor \"" + t.name +
                        "\" (the base has it)");
    const TensorInfo& u = tuned.info(t.name);
    if (u.shape != t.shape)
      throw ShapeError("extract: tensor \"" + t.name + "\" is " + t.shape_string() + " in the base but " +
                       u.shape_string() + " in the tuned model");
    if (!dtype_is_float(t.dtype)) continue;
    const bool same_bytes = t.nbytes() == u.nbytes() && u.dtype == t.dtype &&
                            std::equal(base.bytes(t), base.bytes(t) + t.nbytes(), tuned.bytes(u));
    if (same_bytes) continue;
    changed.push_back(&t);
    std::string path;
    if (t.shape.size() == 2 && detail::ends_with(t.name, ".weight", &path) &&
        !regex_full_match(t.name, exclude, "extract: " + opt.exclude_label))
      lora_paths.insert(path);
  }

  // Pass 2: factors for the low-rank modules; everything else changed is saved whole or reported.
  PeftAdapter<double> ad;
  ExtractAdapterReport rep;
  std::vector<std::pair<std::string, Index>> ranks;
  for (const TensorInfo* t : changed) {
    std::string path;
    const bool low_rank = detail::ends_with(t->name, ".weight", &path) && lora_paths.count(path) != 0;
    if (!low_rank) {
      if (!opt.keep_full) {
        rep.not_captured.push_back(t->name);
        continue;
      }
      const std::size_t dot = t->name.rfind('.');
      const std::string module = dot == std::string::npos ? t->name : t->name.substr(0, dot);
      if (detail::ends_with(t->name, ".bias", &path) && lora_paths.count(path) != 0)
        rep.lora_biases = true;
      else if (std::find(rep.modules_to_save.begin(), rep.modules_to_save.end(), module) == rep.modules_to_save.end())
        rep.modules_to_save.push_back(module);
      ad.full.push_back({t->name, t->shape, tuned.load<double>(t->name)});
      rep.kept_full.push_back(t->name);
      continue;
    }
    Matrix<double> w0 = base.load<double>(t->name), w1 = tuned.load<double>(t->name);
    if (opt.fan_in_fan_out) {  // ΔW [out, in] is the transpose of the stored difference
      w0.transposeInPlace();
      w1.transposeInPlace();
    }
    ExtractOptions o = opt.svd;
    if (o.rank > std::min(w0.rows(), w0.cols())) o.rank = std::min(w0.rows(), w0.cols());
    ExtractResult<double> r = extract_lora<double>(w1, w0, o, t->name);
    LoraModuleWeights<double> m;
    m.path = path;
    m.A = std::move(r.factors.A);
    m.B = std::move(r.factors.B);
    m.scaling = 1.0;
    ranks.emplace_back(path, m.A.rows());
    rep.modules.push_back({path, m.A.rows(), r.energy_kept, r.frobenius_error, r.sigma_next});
    ad.lora.push_back(std::move(m));
    if (opt.on_module) opt.on_module(ad.lora.size(), lora_paths.size());
  }
  if (ad.lora.empty())
    throw ConfigError("extract: no 2-D \".weight\" tensor outside " + opt.exclude_label +
                      " differs between the two files");
  ad.config = unit_scaling_adapter_config(ranks, opt.svd.use_rslora, "");
  ad.config.fan_in_fan_out = opt.fan_in_fan_out;
  ad.config.modules_to_save = rep.modules_to_save;
  if (rep.lora_biases) ad.config.bias = "lora_only";
  for (auto& m : ad.lora) m.alpha = ad.config.alpha_for(m.path);
  if (report != nullptr) *report = std::move(rep);
  return ad;
}

PEFT_SEPARATE_INLINE ExtractAdapterReport extract_adapter_dir(const std::string& base_file,
                                                              const std::string& tuned_file, const std::string& out_dir,
                                                              const ExtractAdapterOptions& opt) {
  (void)compile_name_regex(opt.exclude, "extract: " + opt.exclude_label);  // before opening anything
  const SafeTensorsFile base = open_safetensors(base_file, "the base model's .safetensors file");
  const SafeTensorsFile tuned = open_safetensors(tuned_file, "the tuned model's .safetensors file");
  ExtractAdapterReport rep;
  const PeftAdapter<double> ad = extract_adapter(base, tuned, opt, &rep);
  save_peft_adapter(out_dir, ad);
  return rep;
}
#endif  // PEFT_SEPARATE_BODIES

}  // namespace peft::io
