#pragma once
// What an adapter is, computed from its factors without forming the out × in delta ΔW = s B A.
//
//   spectrum      σ(ΔW) by the factored SVD (peft/merge/low_rank_svd.hpp): QR of B and Aᵀ, SVD of r × r
//   ‖ΔW‖_F²     = s² tr((BᵀB)(AAᵀ)) = s² Σ_ij (BᵀB)_ij (AAᵀ)_ij    (two r × r Gram matrices)
//   ‖ΔW‖_2      = σ_1,   ‖ΔW‖_* = Σ σ_j
//   numerical rank  #{j : σ_j > rtol · σ_1}
//   effective rank  exp(−Σ p_j ln p_j), p_j = σ_j / Σ σ_k   (Roy & Vetterli, 2007)
//   stable rank     ‖ΔW‖_F² / ‖ΔW‖_2²
//   parameters      r (in + out) vs in · out dense; compression ratio = in · out / (r (in + out))
// Inverse-variance merge weights (treating each task delta as an estimate with variance ∝ its
// squared norm): λ_i = ‖ΔW_i‖_F⁻² / Σ_j ‖ΔW_j‖_F⁻², which sum to 1.
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/merge/factors.hpp"
#include "peft/merge/low_rank_svd.hpp"

namespace peft {

struct AdapterStats {
  std::vector<double> singular_values;  ///< σ(s B A), descending, min(r, out, in) values
  double frobenius_norm = 0.0;          ///< ‖s B A‖_F from the Gram matrices
  double spectral_norm = 0.0;           ///< σ_1
  double nuclear_norm = 0.0;            ///< Σ σ_j
  Index rank = 0;                       ///< r (the stored rank)
  Index numerical_rank = 0;             ///< #{σ_j > rtol σ_1}
  double effective_rank = 0.0;          ///< entropy effective rank (0 for a zero delta)
  double stable_rank = 0.0;             ///< ‖·‖_F² / ‖·‖_2² (0 for a zero delta)
  Index parameters = 0;                 ///< r (in + out)
  Index dense_parameters = 0;           ///< in · out
  double compression_ratio = 0.0;       ///< dense_parameters / parameters
};

/// ‖s B A‖_F without forming B A.
template <class T>
double delta_frobenius_norm(const LoraFactors<T>& f) {
  detail::validate_factors("delta_frobenius_norm", f, 0);
  Matrix<T> btb(f.rank(), f.rank()), aat(f.rank(), f.rank());
  btb.noalias() = f.B.transpose() * f.B;                                     // BᵀB   [r, r]
  aat.noalias() = f.A * f.A.transpose();                                     // AAᵀ   [r, r]
  const double tr = static_cast<double>((btb.array() * aat.array()).sum());  // tr((BᵀB)(AAᵀ)), both symmetric
  return std::abs(f.scaling) * std::sqrt(std::max(0.0, tr));
}

/// σ(s B A), descending, from the factors.
template <class T>
std::vector<double> delta_singular_values(const LoraFactors<T>& f) {
  detail::validate_factors("delta_singular_values", f, 0);
  Matrix<T> sb = static_cast<T>(f.scaling) * f.B;
  return factored_svd<T>(sb, f.A).sigma;
}

/// Spectrum, norms, ranks and sizes of one adapter. rtol < 0 picks max(out, in) · ε(T).
template <class T>
AdapterStats analyze_adapter(const LoraFactors<T>& f, double rtol = -1.0) {
  if (std::isnan(rtol) || rtol > 1.0)
    throw ConfigError("analyze_adapter: rtol must be in [0, 1] (or < 0 for the default), got " + check::num(rtol));
  AdapterStats st;
  st.singular_values = delta_singular_values(f);
  st.frobenius_norm = delta_frobenius_norm(f);
  if (rtol < 0.0)
    rtol = static_cast<double>(std::max(f.in_features(), f.out_features())) *
           static_cast<double>(std::numeric_limits<T>::epsilon());
  st.spectral_norm = st.singular_values.empty() ? 0.0 : st.singular_values.front();
  double sum = 0.0;
  for (double s : st.singular_values) {
    st.nuclear_norm += s;
    if (s > rtol * st.spectral_norm) ++st.numerical_rank;
    sum += s;
  }
  if (sum > 0.0) {
    double h = 0.0;
    for (double s : st.singular_values)
      if (s > 0.0) h -= (s / sum) * std::log(s / sum);
    st.effective_rank = std::exp(h);
    st.stable_rank = st.frobenius_norm * st.frobenius_norm / (st.spectral_norm * st.spectral_norm);
  }
  st.rank = f.rank();
  st.parameters = f.rank() * (f.in_features() + f.out_features());
  st.dense_parameters = f.in_features() * f.out_features();
  st.compression_ratio = static_cast<double>(st.dense_parameters) / static_cast<double>(st.parameters);
  return st;
}

/// λ_i = ‖ΔW_i‖_F⁻² / Σ_j ‖ΔW_j‖_F⁻² (sums to 1). A zero delta has no finite weight: ConfigError.
template <class T>
std::vector<double> inverse_variance_weights(const std::vector<LoraFactors<T>>& adapters) {
  detail::validate_sources("inverse_variance_weights", adapters);
  std::vector<double> w(adapters.size());
  double total = 0.0;
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const double n = delta_frobenius_norm(adapters[i]);
    if (!(n > 0.0))
      throw ConfigError("inverse_variance_weights: " + detail::adapter_label(adapters[i], i) +
                        " has a zero delta, so its inverse-variance weight is infinite");
    w[i] = 1.0 / (n * n);
    total += w[i];
  }
  for (double& x : w) x /= total;
  return w;
}

}  // namespace peft
