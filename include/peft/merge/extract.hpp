#pragma once
// LoRA extraction from a full fine-tune: the best rank-k approximation of ΔW = W_ft − W_0
// (Eckart & Young, 1936; as in LoRA-extraction tools such as mergekit's extract_lora / LoRD).
//
//   ΔW = U Σ Vᵀ (thin SVD),  B = U_k √Σ_k [out, k],  A = √Σ_k V_kᵀ [k, in],  scaling 1
//   ‖ΔW − BA‖_2 = σ_{k+1},   ‖ΔW − BA‖_F = √(Σ_{j>k} σ_j²)
//
// k is given, or chosen as the smallest k keeping at least a fraction τ of the energy Σ_j σ_j².
// ΔW is dense by nature here, so this costs one dense SVD of [out, in].
//
// Finite weights can still have a difference that overflows T (W_ft = +3e38, W_0 = −3e38 in float;
// ±1.7e308 in double): ΔW would hold Inf, the SVD NaN, and the "best approximation" would be junk.
// Such a ΔW, and any non-finite factor, singular value or error, is refused with NumericError.
#include <cmath>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/merge/factors.hpp"
#include "peft/merge/low_rank_svd.hpp"

namespace peft {

struct ExtractOptions {
  Index rank = 0;       ///< k; exactly one of rank and energy must be set
  double energy = 0.0;  ///< τ in (0, 1]: smallest k with Σ_{j≤k} σ_j² ≥ τ Σ_j σ_j²
  bool use_rslora = false;
};

template <class T>
struct ExtractResult {
  LoraFactors<T> factors;               ///< scaling 1
  LoraConfig config;                    ///< alpha = r (√r with rsLoRA): config.scaling() == 1
  std::vector<double> singular_values;  ///< of ΔW, descending (min(out, in) values)
  double sigma_next = 0.0;              ///< σ_{k+1} = ‖ΔW − BA‖_2 (0 when k = min(out, in))
  double frobenius_error = 0.0;         ///< √(Σ_{j>k} σ_j²) = ‖ΔW − BA‖_F
  double energy_kept = 1.0;             ///< Σ_{j≤k} σ_j² / Σ_j σ_j² (1 for a zero ΔW)
};

/// `tensor` names the weight in messages (optional): extract_lora (tensor "x.weight"): ...
template <class T>
ExtractResult<T> extract_lora(const ConstMatrixRef<T>& w_finetuned, const ConstMatrixRef<T>& w_base,
                              const ExtractOptions& opt, const std::string& tensor = "") {
  const std::string who = tensor.empty() ? std::string("extract_lora") : "extract_lora (tensor \"" + tensor + "\")";
  if (w_finetuned.rows() != w_base.rows() || w_finetuned.cols() != w_base.cols())
    throw ShapeError(who + ": fine-tuned weight has shape " + shape_str(w_finetuned) + " but base weight has shape " +
                     shape_str(w_base));
  if (w_base.size() == 0) throw ShapeError(who + ": empty weight " + shape_str(w_base));
  if (!all_finite(w_finetuned)) throw NumericError(who + ": fine-tuned weight contains NaN or Inf");
  if (!all_finite(w_base)) throw NumericError(who + ": base weight contains NaN or Inf");
  const Index max_rank = std::min(w_base.rows(), w_base.cols());
  const bool by_rank = opt.rank != 0, by_energy = opt.energy != 0.0;
  if (by_rank == by_energy)
    throw ConfigError(who + ": set exactly one of rank (got " + std::to_string(opt.rank) + ") and energy (got " +
                      check::num(opt.energy) + ")");
  if (by_rank && (opt.rank < 1 || opt.rank > max_rank))
    throw ConfigError(who + ": rank must be in [1, " + std::to_string(max_rank) + "] = [1, min(out, in)], got " +
                      std::to_string(opt.rank));
  if (by_energy && (!std::isfinite(opt.energy) || opt.energy <= 0.0 || opt.energy > 1.0))
    throw ConfigError(who + ": energy threshold must be in (0, 1], got " + check::num(opt.energy));

  Matrix<T> delta(w_base.rows(), w_base.cols());
  delta.noalias() = w_finetuned - w_base;  // ΔW   [out, in]
  if (!all_finite(delta)) {
    Index at = 0;
    while (std::isfinite(delta.data()[at])) ++at;
    const Index i = at / delta.cols(), j = at % delta.cols();  // row-major
    throw NumericError(who + ": the difference W_ft − W_0 overflows " + detail::scalar_name<T>() + " at (" +
                       std::to_string(i) + ", " + std::to_string(j) +
                       "): " + check::num(static_cast<double>(w_finetuned(i, j))) + " − " +
                       check::num(static_cast<double>(w_base(i, j))) + " is not finite");
  }
  ThinSvd<T> svd = dense_svd<T>(delta);
  const Index k = by_rank ? opt.rank : rank_for_energy(svd.sigma, opt.energy);
  Truncation<T> t = truncate(svd, k);

  ExtractResult<T> res;
  res.factors = std::move(t.factors);
  res.config = unit_scaling_config(k, opt.use_rslora);
  res.sigma_next = t.spectral_error;
  res.frobenius_error = t.frobenius_error;
  double total = 0.0;
  for (double s : svd.sigma) total += s * s;
  res.energy_kept = total > 0.0 ? (total - t.discarded_energy) / total : 1.0;
  res.singular_values = std::move(svd.sigma);
  // A finite ΔW can still overflow inside the SVD (norms of entries near max) or in Σ σ².
  if (!all_finite(res.factors.A) || !all_finite(res.factors.B))
    throw NumericError(who + ": the extracted factors are not finite (the SVD of ΔW overflows " +
                       detail::scalar_name<T>() + ")");
  for (double v : res.singular_values)
    if (!std::isfinite(v)) throw NumericError(who + ": a singular value of ΔW is not finite (" + check::num(v) + ")");
  for (double v : {res.sigma_next, res.frobenius_error, res.energy_kept, total})
    if (!std::isfinite(v))
      throw NumericError(who + ": the truncation error is not finite (" + check::num(v) + "): Σ σ² of ΔW overflows");
  return res;
}

}  // namespace peft
