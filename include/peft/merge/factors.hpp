#pragma once
// LoRA factors as plain data: the common currency of combine, extract and analysis, so the same
// functions serve adapters held by a LoRALinear and adapters read from files (Hu et al., 2021).
//
//   ΔW = s · B · A,   A [r, in], B [out, r],   s = alpha / r  (alpha / √r with rsLoRA)
//
// Everything this folder produces has s folded into B, i.e. `scaling == 1`, and comes with the
// LoraConfig to store it under: r = rank and alpha = r (alpha = √r when the target uses rsLoRA),
// so that LoraConfig::scaling() is exactly 1 (x / x == 1 in IEEE arithmetic) and the stored
// adapter reproduces the intended delta with no second scaling. (Storing alpha = r with rsLoRA
// would give s = √r: the over-scaling the issue warns about.)
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/layers/lora_linear.hpp"
#include "peft/merge/lora_factors.hpp"

namespace peft {

/// The factors of a LoRALinear adapter (copies A and B; keeps its scaling). DoRA adapters are refused;
/// `layer` names the owning layer in that message.
template <class T>
LoraFactors<T> factors_of(const LoraAdapter<T>& adapter, const std::string& layer = "") {
  if (adapter.config.use_dora)  // the magnitude rescales rows: the delta is not s·B·A
    throw ConfigError((layer.empty() ? std::string() : describe("LoRALinear", layer) + ": ") + "adapter \"" +
                      adapter.name +
                      "\" uses DoRA: its delta is not s·B·A, so it cannot be treated as plain LoRA factors");
  return LoraFactors<T>{adapter.A.value, adapter.B.value, adapter.scaling(), adapter.name};
}

/// The config that stores factors with unit scaling: r = rank, alpha = r (alpha = √r with rsLoRA),
/// so config.scaling() == 1 exactly.
inline LoraConfig unit_scaling_config(Index rank, bool use_rslora = false) {
  if (rank <= 0) throw ConfigError("unit_scaling_config: rank must be >= 1, got " + std::to_string(rank));
  LoraConfig c;
  c.r = static_cast<int>(rank);
  c.alpha = use_rslora ? std::sqrt(static_cast<double>(rank)) : static_cast<double>(rank);
  c.use_rslora = use_rslora;
  c.dropout = 0.0;
  c.init = LoraInit::None;
  return c;
}

namespace detail {

/// "float" or "double", for messages about values that overflow T.
template <class T>
const char* scalar_name() {
  return sizeof(T) == sizeof(float) ? "float" : "double";
}

/// "adapter 2" or "adapter 2 (\"name\")" for messages.
template <class T>
std::string adapter_label(const LoraFactors<T>& f, std::size_t i) {
  std::string s = "adapter " + std::to_string(i);
  if (!f.name.empty()) s += " (\"" + f.name + "\")";
  return s;
}

/// Checks one set of factors: consistent rank, rank >= 1, finite scaling and entries.
template <class T>
void validate_factors(const char* who, const LoraFactors<T>& f, std::size_t i) {
  const std::string label = std::string(who) + ": " + adapter_label(f, i);
  if (f.A.rows() != f.B.cols())
    throw ShapeError(label + ": A has shape " + shape_str(f.A) + " but B has shape " + shape_str(f.B) +
                     " (B must have as many columns as A has rows)");
  if (f.A.rows() == 0) throw ShapeError(label + ": rank is 0 (A has shape " + shape_str(f.A) + ")");
  if (f.A.cols() == 0 || f.B.rows() == 0)
    throw ShapeError(label + ": empty delta shape " + shape_str(f.B.rows(), f.A.cols()));
  if (!std::isfinite(f.scaling)) throw NumericError(label + ": scaling is not finite (" + check::num(f.scaling) + ")");
  if (!f.A.allFinite()) throw NumericError(label + ": A contains NaN or Inf");
  if (!f.B.allFinite()) throw NumericError(label + ": B contains NaN or Inf");
}

/// Checks a list of adapters to combine: non-empty, each valid, all with adapter 0's delta shape.
template <class T>
void validate_sources(const char* who, const std::vector<LoraFactors<T>>& adapters) {
  if (adapters.empty()) throw ConfigError(std::string(who) + ": no adapters given");
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    validate_factors(who, adapters[i], i);
    const LoraFactors<T>& f = adapters[i];
    const LoraFactors<T>& f0 = adapters[0];
    if (f.out_features() != f0.out_features() || f.in_features() != f0.in_features())
      throw ShapeError(std::string(who) + ": " + adapter_label(f, i) + " has delta shape " +
                       shape_str(f.out_features(), f.in_features()) + " but " + adapter_label(f0, 0) +
                       " has delta shape " + shape_str(f0.out_features(), f0.in_features()));
  }
}

/// One finite weight per adapter.
inline void validate_weights(const char* who, const std::vector<double>& weights, std::size_t n) {
  if (weights.size() != n)
    throw ConfigError(std::string(who) + ": " + std::to_string(weights.size()) + " weights given for " +
                      std::to_string(n) + " adapters");
  for (std::size_t i = 0; i < n; ++i)
    if (!std::isfinite(weights[i]))
      throw ConfigError(std::string(who) + ": weight of adapter " + std::to_string(i) + " is not finite (" +
                        check::num(weights[i]) + ")");
}

}  // namespace detail

/// Adds `factors` (scaling folded into B first, if it is not 1) to `layer` as a new adapter named
/// `adapter_name`, stored under unit_scaling_config: layer.delta_weight(adapter_name) equals
/// factors.delta() up to one rounding of the fold.
template <class T>
LoraAdapter<T>& add_factors_as_adapter(LoRALinear<T>& layer, const std::string& adapter_name,
                                       const LoraFactors<T>& factors, bool use_rslora = false) {
  const std::string who = describe("LoRALinear", layer.name());
  detail::validate_factors(who.c_str(), factors, 0);  // consistent, non-empty, finite (scaling too)
  if (factors.in_features() != layer.in_features() || factors.out_features() != layer.out_features())
    throw ShapeError(who + ": adapter \"" + adapter_name + "\" has delta shape " +
                     shape_str(factors.out_features(), factors.in_features()) + ", layer weight has shape " +
                     shape_str(layer.out_features(), layer.in_features()));
  Rng unused(0);  // LoraInit::None draws values that are overwritten below
  LoraAdapter<T>& a = layer.add_adapter(adapter_name, unit_scaling_config(factors.rank(), use_rslora), unused);
  a.A.value = factors.A;
  if (factors.scaling == 1.0)
    a.B.value = factors.B;
  else
    a.B.value = static_cast<T>(factors.scaling) * factors.B;
  return a;
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_FACTORS_TEMPLATES(KW, T) \
  KW template void detail::validate_factors<T>(const char*, const LoraFactors<T>&, std::size_t);
namespace peft {
PEFT_FACTORS_TEMPLATES(extern, float)
PEFT_FACTORS_TEMPLATES(extern, double)
}  // namespace peft
#endif
