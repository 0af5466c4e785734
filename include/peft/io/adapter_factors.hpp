#pragma once
// An adapter directory of any method as its per-module update in LoRA-factor form,
// ΔW = scaling · B · A (merge/lora_factors.hpp): the common currency of combine and analysis.
//
//   LoRA   the file's factors as they are (s = alpha / r, or alpha / √r with rsLoRA)
//   VeRA   exactly at rank r:  B' = diag(λ_b) B_l,  A' = diag(λ_d) A_l,  s = 1
//   LoHa   exactly at rank ≤ r²  (row / column Khatri–Rao products of the four factors)
//   LoKr   exactly at rank ≤ rank(W1) · r  (Kronecker products of the factors' splits)
// each method's own to_factors() (adapters/*.hpp) on the module's adapter built from the file.
// Refused by name: DoRA (W' = m ⊙ V / ‖V‖_row is not W + s·B·A), (IA)³ (a gain on W, no additive
// delta), prompt methods (no weight update at all).
//
// No base model is needed, with one exception: a VeRA file stores one shared vera_A [r, in_max]
// and no module's own input size. A module's A is the first `in` columns of the shared one, so its
// factors are read at in_max and marked open (`open_in`): the caller's `shapes` (e.g. the base
// model's header, module_shapes_of_safetensors) or another adapter of the same module closes them
// (fit_input_size). A file with a single module is exact (in_max is that module's).
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/io/methods.hpp"
#include "peft/io/peft_format.hpp"
#include "peft/io/safetensors.hpp"
#include "peft/merge/lora_factors.hpp"

namespace peft::io {

/// [out, in] of modules by PEFT module path (no "base_model.model." prefix).
using ModuleShapes = std::map<std::string, std::pair<Index, Index>>;

/// An adapter directory read as LoRA factors, one entry per module (in path order).
template <class T>
struct AdapterFactors {
  std::string source;     ///< the directory (messages)
  std::string peft_type;  ///< "LORA", "VERA", "LOHA", "LOKR"
  std::string kind;       ///< for messages: "LoRA", "VeRA", "LoHa", "LoKr"
  bool fan_in_fan_out = false;
  std::string base_model_name_or_path;
  std::map<std::string, LoraFactors<T>> modules;  ///< path → ΔW = s·B·A (name "<source>:<path>")
  /// Modules whose input size the directory does not store (VeRA with several modules): their A
  /// has the shared projection's in_max columns; the module's A is the first `in` of them.
  std::set<std::string> open_in;
  /// Full tensors the directory also carries (LoRA's modules_to_save / biases): not factors.
  std::vector<std::string> full_tensors;
};

/// Closes an open input size (AdapterFactors::open_in): A keeps its first `in` columns, which are
/// exactly the module's own factor (VeRA: A_l = vera_A[:, :in]). ShapeError when `in` exceeds them.
template <class T>
void fit_input_size(AdapterFactors<T>& f, const std::string& path, Index in, const std::string& who) {
  LoraFactors<T>& m = f.modules.at(path);
  if (in <= 0 || in > m.A.cols())
    throw ShapeError(who + ": " + f.kind + " module \"" + path + "\" of \"" + f.source + "\" is given input size " +
                     std::to_string(in) + ", but its shared projection has " + std::to_string(m.A.cols()) +
                     " columns (in_max); expected 1 <= in <= " + std::to_string(m.A.cols()));
  if (in < m.A.cols()) m.A = Matrix<T>(m.A.leftCols(in));
  f.open_in.erase(path);
}

/// The peft_type an adapter directory's config states ("" when it has none or is unreadable as
/// such: the LoRA loader then reports what is wrong).
inline std::string adapter_dir_peft_type(const std::string& dir) {
  const std::string path = dir + "/" + kAdapterConfigFile;
  if (!path_exists(path)) return "";
  const Json j = parse_json_strict(read_text_file(path, 1u << 20), path);
  if (!j.is_object() || !j.contains("peft_type") || !j.at("peft_type").is_string()) return "";
  return j.at("peft_type").get<std::string>();
}

/// A table method's file (read_method_adapter) as factors; `who` starts the messages.
template <class T>
AdapterFactors<T> method_adapter_factors(const MethodAdapterFile<T>& file, const std::string& source,
                                         const ModuleShapes& shapes = {}, const std::string& who = "adapter factors") {
  const MethodFormat<T>& f = *file.format;
  const std::string what = "\"" + source + "\" is a" + (f.kind[0] == '(' ? "n " : " ") + f.kind + " adapter: ";
  if (!f.no_factors.empty()) throw ConfigError(who + ": " + what + f.no_factors);
  if (!f.file_shape) throw ConfigError(who + ": " + what + "its modules' shapes cannot be read from the file");
  AdapterFactors<T> out;
  out.source = source;
  out.peft_type = f.peft_type;
  out.kind = f.kind;
  out.fan_in_fan_out = detail::json_value<bool>(file.config, "fan_in_fan_out", false, source);
  out.base_model_name_or_path = detail::json_value<std::string>(file.config, "base_model_name_or_path", "", source);
  MethodState state;
  if (f.load_model) f.load_model(file.config, file.model_tensors, "adapter (" + f.kind + ")", state);
  for (const auto& kv : file.modules) {
    const std::string& path = kv.first;
    const std::string where = who + ": " + f.kind + " module \"" + path + "\" of \"" + source + "\"";
    const ModuleFileShape shape = f.file_shape(file, path);
    if (shape.out <= 0 || shape.in <= 0)
      throw ConfigError(where + ": its [out, in] cannot be told from its tensors (expected {" +
                        detail::join_list(f.params) + "} as the method's layout has them)");
    std::unique_ptr<AdapterMethod<T>> m =
        detail::method_module(file, path, "default", shape.in, shape.out, state, where);
    if (!m->has_factors()) throw ConfigError(where + ": has no LoRA-factor form");
    LoraFactors<T> factors = m->to_factors();
    factors.name = source + ":" + path;
    out.modules.emplace(path, std::move(factors));
    if (shape.in_exact) continue;
    out.open_in.insert(path);
    const auto given = shapes.find(path);
    if (given == shapes.end()) continue;
    if (given->second.first != shape.out)
      throw ShapeError(where + ": its tensors give " + std::to_string(shape.out) +
                       " output features, the given shape " + shape_str(given->second.first, given->second.second) +
                       " has " + std::to_string(given->second.first));
    fit_input_size(out, path, given->second.second, who);
  }
  return out;
}

/// Reads the adapter directory `dir` of any method with a LoRA-factor form (LoRA, VeRA, LoHa,
/// LoKr) as its per-module factors (see the file comment). `shapes` closes VeRA's input sizes where
/// it names the module; `who` starts the messages. Refuses DoRA, (IA)³ and prompt adapters by name.
template <class T>
AdapterFactors<T> read_adapter_factors(const std::string& dir, const ModuleShapes& shapes = {},
                                       const std::string& who = "read_adapter_factors") {
  if (!is_directory(dir)) throw IoError("\"" + dir + "\" is not a directory");
  const std::string type = adapter_dir_peft_type(dir);
  // LoRA's factors are its file's tensors as they are (and its full tensors are reported), so it
  // is read here rather than rebuilt through its row's adapters.
  if (type != "LORA" && find_method_format<T>(type) != nullptr)
    return method_adapter_factors<T>(read_method_adapter<T>(dir), dir, shapes, who);
  const PeftAdapter<T> ad = load_peft_adapter<T>(dir);
  if (!ad.config.is_lora()) throw ConfigError(who + ": \"" + dir + "\" is not a LoRA adapter");
  if (ad.config.use_dora) throw ConfigError(who + ": \"" + dir + "\" is a DoRA adapter (its delta is not s·B·A)");
  AdapterFactors<T> out;
  out.source = dir;
  out.peft_type = "LORA";
  out.kind = "LoRA";
  out.fan_in_fan_out = ad.config.fan_in_fan_out;
  out.base_model_name_or_path = ad.config.base_model_name_or_path;
  for (const auto& m : ad.lora) out.modules.emplace(m.path, LoraFactors<T>{m.A, m.B, m.scaling, dir + ":" + m.path});
  for (const auto& t : ad.full) out.full_tensors.push_back(t.name);
  return out;
}

/// [out, in] of every 2-D float "<path>.weight" tensor of a safetensors model, by module path
/// (only the header is read): the shapes read_adapter_factors needs for VeRA's modules.
inline ModuleShapes module_shapes_of_safetensors(const std::string& path) {
  const InputFile f(path);
  ModuleShapes shapes;
  for (const TensorInfo& t : read_safetensors_header(f).tensors) {
    std::string module;
    if (t.shape.size() == 2 && dtype_is_float(t.dtype) && detail::ends_with(t.name, ".weight", &module))
      shapes[module] = {static_cast<Index>(t.shape[0]), static_cast<Index>(t.shape[1])};
  }
  return shapes;
}

}  // namespace peft::io

// The test build compiles these once (tests/support/instantiations_io.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_IO_ADAPTER_FACTORS_TEMPLATES(KW, T) \
  KW template AdapterFactors<T> read_adapter_factors<T>(const std::string&, const ModuleShapes&,               \
                                                        const std::string&);                                  \
  KW template AdapterFactors<T> method_adapter_factors<T>(const MethodAdapterFile<T>&, const std::string&,      \
                                                          const ModuleShapes&, const std::string&);
namespace peft::io {
PEFT_IO_ADAPTER_FACTORS_TEMPLATES(extern, float)
PEFT_IO_ADAPTER_FACTORS_TEMPLATES(extern, double)
}  // namespace peft::io
#endif
