#pragma once
// Combining LoRA adapters into one new adapter, exactly (weights w_i may be negative).
//
// Source i contributes its delta D_i = s_i B_i A_i [out, in]. Methods:
//   Cat            ΔW = Σ w_i D_i exactly, rank Σ r_i:  A' = [A_1; …; A_n],  B' = [w_1 s_1 B_1, …, w_n s_n B_n].
//                  (Stacking keeps the blocks apart: B'A' = Σ_i w_i s_i B_i A_i, no cross terms B_i A_j.)
//   Svd            the same ΔW re-compressed to rank k by a truncated SVD computed from the stacked
//                  factors (peft/merge/low_rank_svd.hpp), never forming the out × in matrix.
// Dense methods, defined on the delta weights as Hugging Face PEFT's add_weighted_adapter does for its
// "*_svd" combination types (merge_utils.py), then re-factored to rank k by a dense truncated SVD:
//   Linear         ΔW = Σ w_i D_i   (task arithmetic; Ilharco et al., 2023). Same ΔW as Svd, dense.
//   MagnitudePrune ΔW = Σ w_i trim(D_i)
//   Ties           P_i = trim(D_i); e = sign(Σ_i P_i) ("total") or sign(Σ_i sign P_i) ("frequency"),
//                  e = +1 where the sum is 0; ΔW = Σ_{i: sign P_i = e} w_i P_i / max(1, #{i: sign P_i = e})
//                  (TIES-Merging: trim, elect sign, disjoint mean; Yadav et al., 2023).
//   DareLinear     P_i = dare(D_i); ΔW = Σ w_i P_i   (DARE; Yu et al., 2023)
//   DareTies       P_i = dare(D_i), then TIES's sign election and disjoint mean.
// As in PEFT, the sign is elected on the pruned, *unweighted* task deltas P_i, and the weights enter
// afterwards (in the disjoint mean). A negative weight therefore flips a task's contribution without
// changing which entries it votes for.
//   trim(D):  keeps the k = ⌊density · out·in⌋ entries of largest |D| (ties broken by the lower
//             row-major index), zeroes the rest (PEFT: int(density · numel), topk of |D|).
//   dare(D):  keeps each entry with probability `density` and rescales kept ones by 1/density.
//             The mask of adapter i is drawn from Rng(seed + i), one uniform() per entry in
//             row-major order, kept iff u < density: reproducible for a seed, on every platform.
// The dense methods materialize one out × in accumulator at a time (two passes for TIES) and cost a
// dense SVD; Svd and Cat work on the factors only.
//
// Non-finite numbers are refused (NumericError naming the method and the module or sources), never
// written: a weight × scaling or a scaled factor that overflows T (e.g. a huge lora_alpha), a task
// delta or target ΔW that overflows, and a result (factors, singular values, truncation errors) that
// is not finite.
//
// The result has scaling 1 (everything folded into B) and the LoraConfig to store it with
// (peft/merge/factors.hpp: alpha = r, or √r with rsLoRA): the combined adapter's scaling is explicit,
// whatever the sources' ranks, alphas or rsLoRA flags were.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/types.hpp"
#include "peft/core/warnings.hpp"
#include "peft/merge/factors.hpp"
#include "peft/merge/low_rank_svd.hpp"

namespace peft {

enum class CombineMethod { Cat, Svd, Linear, MagnitudePrune, Ties, DareLinear, DareTies };
enum class MajoritySign { Total, Frequency };

inline const char* to_string(CombineMethod m) {
  switch (m) {
    case CombineMethod::Cat: return "cat";
    case CombineMethod::Svd: return "svd";
    case CombineMethod::Linear: return "linear";
    case CombineMethod::MagnitudePrune: return "magnitude_prune";
    case CombineMethod::Ties: return "ties";
    case CombineMethod::DareLinear: return "dare_linear";
    case CombineMethod::DareTies: return "dare_ties";
  }
  return "?";
}

/// The method named `s` as to_string() spells it ("cat", "svd", "linear", "ties", "dare_linear",
/// "dare_ties", "magnitude_prune"); false for anything else.
inline bool parse_combine_method(const std::string& s, CombineMethod& m) {
  for (CombineMethod c : {CombineMethod::Cat, CombineMethod::Svd, CombineMethod::Linear, CombineMethod::Ties,
                          CombineMethod::DareLinear, CombineMethod::DareTies, CombineMethod::MagnitudePrune})
    if (s == to_string(c)) {
      m = c;
      return true;
    }
  return false;
}

struct CombineOptions {
  CombineMethod method = CombineMethod::Svd;
  /// Target rank for every method but Cat (which must leave it 0: its rank is Σ r_i).
  /// 0 = lossless: min(Σ r_i, out, in) for Svd and Linear, min(out, in) for the pruning methods.
  Index rank = 0;
  /// Fraction of entries kept by trim / dare, in (0, 1]. Ignored by Cat, Svd, Linear.
  double density = 1.0;
  MajoritySign majority_sign = MajoritySign::Total;  ///< Ties and DareTies
  std::uint64_t seed = 0;                            ///< DareLinear and DareTies
  bool use_rslora = false;                           ///< how the result's config is written
};

template <class T>
struct CombineResult {
  LoraFactors<T> factors;               ///< scaling 1
  LoraConfig config;                    ///< r = rank, alpha = r (√r with rsLoRA): config.scaling() == 1
  std::vector<double> singular_values;  ///< of the target ΔW, descending (empty for Cat)
  double discarded_energy = 0.0;        ///< Σ_{j>k} σ_j² of the target ΔW (0 for Cat)
  double frobenius_error = 0.0;         ///< √(discarded energy) = ‖ΔW_target − B'A'‖_F (Eckart–Young)
  double spectral_error = 0.0;          ///< σ_{k+1}
};

namespace detail {

/// "combine (svd) of module \"m\"", or without a module name the sources: "combine (svd) of
/// adapter 0 (\"a:m\"), adapter 1 (\"b:m\")" (their names carry the module when read from files).
template <class T>
std::string combine_who(CombineMethod method, const std::string& module, const std::vector<LoraFactors<T>>& adapters) {
  std::string who = std::string("combine (") + to_string(method) + ") of ";
  if (!module.empty()) return who + "module \"" + module + "\"";
  for (std::size_t i = 0; i < adapters.size(); ++i) who += (i ? ", " : "") + adapter_label(adapters[i], i);
  return who;
}

/// w_i·s_i, the factor each method applies to B_i (Cat, Svd) or to B_i A_i (dense methods), must be
/// finite in T: a huge lora_alpha overflows here (float: |w·s| > 3.4e38) before any product does.
template <class T>
void check_weighted_scalings(const std::string& who, const std::vector<LoraFactors<T>>& adapters,
                             const std::vector<double>& weights) {
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    const double ws = weights[i] * adapters[i].scaling;
    if (!std::isfinite(static_cast<T>(adapters[i].scaling)) || !std::isfinite(static_cast<T>(ws)))
      throw NumericError(who + ": " + adapter_label(adapters[i], i) + " has scaling " +
                         check::num(adapters[i].scaling) + " (lora_alpha / r) and weight " + check::num(weights[i]) +
                         ": their product " + check::num(ws) + " is not finite in " + scalar_name<T>() +
                         " (lora_alpha too large?)");
  }
}

/// NumericError unless every entry of `m` is finite.
template <class T>
void require_finite(const std::string& who, const ConstMatrixRef<T>& m, const std::string& what) {
  if (!all_finite(m))
    throw NumericError(who + ": " + what + " is not finite (NaN or Inf: the values overflow " + scalar_name<T>() +
                       "); nothing is combined");
}

inline bool uses_density(CombineMethod m) {
  return m == CombineMethod::MagnitudePrune || m == CombineMethod::Ties || m == CombineMethod::DareLinear ||
         m == CombineMethod::DareTies;
}

/// D = s B A into `d` (resized once).
template <class T>
void dense_delta(const LoraFactors<T>& f, Matrix<T>& d) {
  d.resize(f.out_features(), f.in_features());
  d.noalias() = static_cast<T>(f.scaling) * (f.B * f.A);
}

/// Zeroes all but the k largest-|d| entries (ties: lower row-major index wins). `order` is scratch.
template <class T>
void trim_in_place(Matrix<T>& d, double density, std::vector<Index>& order) {
  const Index n = d.size();
  const Index k = static_cast<Index>(std::floor(density * static_cast<double>(n)));
  if (k >= n) return;
  T* v = d.data();
  order.resize(static_cast<std::size_t>(n));
  std::iota(order.begin(), order.end(), Index(0));
  const auto before = [v](Index a, Index b) {
    const T fa = std::abs(v[a]), fb = std::abs(v[b]);
    return fa > fb || (fa == fb && a < b);
  };
  if (k > 0) std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), before);
  // nth_element leaves every element after position k−1 not before it: those are dropped.
  for (auto it = order.begin() + k; it != order.end(); ++it) v[*it] = T(0);
}

/// Keeps each entry with probability `density` (uniform() < density), rescaled by 1/density.
template <class T>
void dare_in_place(Matrix<T>& d, double density, std::uint64_t seed) {
  Rng rng(seed);
  const T rescale = static_cast<T>(1.0 / density);
  T* v = d.data();  // row-major: entry order is row by row
  for (Index j = 0; j < d.size(); ++j) v[j] = rng.uniform() < density ? v[j] * rescale : T(0);
}

template <class T>
T sign_of(T x) {
  return static_cast<T>((x > T(0)) - (x < T(0)));
}

/// P_i for the pruning methods (D_i itself for Linear).
template <class T>
void task_tensor(const LoraFactors<T>& f, std::size_t i, const CombineOptions& opt, Matrix<T>& d,
                 std::vector<Index>& order) {
  dense_delta(f, d);
  switch (opt.method) {
    case CombineMethod::MagnitudePrune:
    case CombineMethod::Ties: trim_in_place(d, opt.density, order); break;
    case CombineMethod::DareLinear:
    case CombineMethod::DareTies: dare_in_place(d, opt.density, opt.seed + static_cast<std::uint64_t>(i)); break;
    default: break;
  }
}

}  // namespace detail

/// The dense target ΔW [out, in] of a dense method (Linear, MagnitudePrune, Ties, DareLinear,
/// DareTies) before re-factoring; for Cat and Svd, the exact Σ w_i D_i. Validates like combine().
/// Refuses (NumericError) a task delta P_i or a target that is not finite in T. `module` names the
/// module in messages (optional).
template <class T>
Matrix<T> combination_target(const std::vector<LoraFactors<T>>& adapters, const std::vector<double>& weights,
                             const CombineOptions& opt, const std::string& module = "") {
  const char* who = "combine";
  detail::validate_sources(who, adapters);
  detail::validate_weights(who, weights, adapters.size());
  if (detail::uses_density(opt.method) && (!std::isfinite(opt.density) || opt.density <= 0.0 || opt.density > 1.0))
    throw ConfigError(std::string(who) + " (" + to_string(opt.method) + "): density must be in (0, 1], got " +
                      check::num(opt.density));
  const std::string where = detail::combine_who(opt.method, module, adapters);
  detail::check_weighted_scalings(where, adapters, weights);
  // Every P_i (and so every term w_i P_i and the sum) is checked: the first overflow is named.
  const auto task = [&](std::size_t i, Matrix<T>& p, std::vector<Index>& order) {
    detail::task_tensor(adapters[i], i, opt, p, order);
    detail::require_finite<T>(where, p, "the delta s·B·A of " + detail::adapter_label(adapters[i], i));
  };
  const Index out = adapters[0].out_features(), in = adapters[0].in_features();
  Matrix<T> acc = Matrix<T>::Zero(out, in);
  Matrix<T> p;
  std::vector<Index> order;
  const bool ties = opt.method == CombineMethod::Ties || opt.method == CombineMethod::DareTies;
  if (!ties) {
    for (std::size_t i = 0; i < adapters.size(); ++i) {
      task(i, p, order);
      acc.noalias() += static_cast<T>(weights[i]) * p;  // Σ w_i P_i
    }
    detail::require_finite<T>(where, acc, "the combined delta Σ w_i P_i");
    return acc;
  }
  // Pass 1: elect the sign per entry from the unweighted pruned deltas.
  Matrix<T> elect = Matrix<T>::Zero(out, in);
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    task(i, p, order);
    if (opt.majority_sign == MajoritySign::Total)
      elect += p;  // Σ_i P_i
    else
      elect += p.unaryExpr([](T x) { return detail::sign_of(x); });  // Σ_i sign(P_i)
  }
  // Σ_i P_i of finite P_i can still overflow (and an Inf would elect its sign arbitrarily).
  detail::require_finite<T>(where, elect, "the sign election Σ_i P_i");
  elect = elect.unaryExpr([](T x) { return x >= T(0) ? T(1) : T(-1); });  // e ∈ {+1, −1}
  // Pass 2 (the same P_i: trim is deterministic, dare reseeds per adapter): disjoint weighted mean.
  Matrix<T> count = Matrix<T>::Zero(out, in);
  for (std::size_t i = 0; i < adapters.size(); ++i) {
    detail::task_tensor(adapters[i], i, opt, p, order);
    const T w = static_cast<T>(weights[i]);
    for (Index j = 0; j < p.size(); ++j) {
      const T v = p.data()[j];
      if (detail::sign_of(v) == elect.data()[j]) {  // zero entries agree with neither sign
        acc.data()[j] += w * v;
        count.data()[j] += T(1);
      }
    }
  }
  acc.array() /= count.array().max(T(1));
  detail::require_finite<T>(where, acc, "the combined delta (disjoint mean)");
  return acc;
}

namespace detail {

/// The last check before a result leaves combine: finite factors, singular values and errors.
template <class T>
void require_finite_result(const std::string& who, const CombineResult<T>& r) {
  require_finite<T>(who, r.factors.A, "the combined factor A'");
  require_finite<T>(who, r.factors.B, "the combined factor B'");
  for (double v : r.singular_values)
    if (!std::isfinite(v))
      throw NumericError(who + ": a singular value of the target ΔW is not finite (" + check::num(v) +
                         "): the values overflow " + scalar_name<T>() + "; nothing is combined");
  for (double v : {r.discarded_energy, r.frobenius_error, r.spectral_error})
    if (!std::isfinite(v))
      throw NumericError(who + ": the truncation error is not finite (" + check::num(v) +
                         "): the values overflow; nothing is combined");
}

}  // namespace detail

/// Combines adapters into one new adapter (see the header comment for each method). `module`
/// names the module in error messages (optional; without it the sources are named). Non-finite
/// inputs or results are refused with NumericError.
template <class T>
CombineResult<T> combine(const std::vector<LoraFactors<T>>& adapters, const std::vector<double>& weights,
                         const CombineOptions& opt = {}, const std::string& module = "") {
  const std::string who = std::string("combine (") + to_string(opt.method) + ")";
  detail::validate_sources("combine", adapters);
  detail::validate_weights("combine", weights, adapters.size());
  const std::string where = detail::combine_who(opt.method, module, adapters);
  detail::check_weighted_scalings(where, adapters, weights);
  const Index out = adapters[0].out_features(), in = adapters[0].in_features();
  const Index max_rank = std::min(out, in);
  Index total_rank = 0;
  for (const auto& f : adapters) total_rank += f.rank();
  if (opt.rank < 0 || opt.rank > max_rank)
    throw ConfigError(who + ": rank must be in [0, " + std::to_string(max_rank) + "] = [0, min(out, in)], got " +
                      std::to_string(opt.rank));

  CombineResult<T> res;
  if (opt.method == CombineMethod::Cat) {
    if (opt.rank != 0)
      throw ConfigError(who + ": the rank of a concatenation is Σ r_i = " + std::to_string(total_rank) +
                        "; leave rank = 0 (got " + std::to_string(opt.rank) + ") or use svd to choose it");
    if (total_rank > max_rank)  // legal (as a LoRA rank above min(in, out)), exact, but wasteful
      warn(where + ": Σ r_i = " + std::to_string(total_rank) + " exceeds min(out, in) = " + std::to_string(max_rank) +
           "; the concatenation is exact but holds more rank than ΔW can have (svd re-compresses it)");
    res.factors.A.resize(total_rank, in);
    res.factors.B.resize(out, total_rank);
    Index at = 0;
    for (std::size_t i = 0; i < adapters.size(); ++i) {
      const LoraFactors<T>& f = adapters[i];
      res.factors.A.middleRows(at, f.rank()) = f.A;                                           // A' = [A_1; …]
      res.factors.B.middleCols(at, f.rank()) = static_cast<T>(weights[i] * f.scaling) * f.B;  // w_i s_i B_i
      at += f.rank();
    }
    res.factors.scaling = 1.0;
    res.config = unit_scaling_config(total_rank, opt.use_rslora);
    detail::require_finite_result(where, res);
    return res;
  }

  ThinSvd<T> svd;
  Index k = opt.rank;
  if (opt.method == CombineMethod::Svd) {
    // Stack B̃ = [w_1 s_1 B_1, …] [out, R] and Ã = [A_1; …] [R, in]: B̃Ã = Σ w_i s_i B_i A_i exactly.
    Matrix<T> Bt(out, total_rank), At(total_rank, in);
    Index at = 0;
    for (std::size_t i = 0; i < adapters.size(); ++i) {
      const LoraFactors<T>& f = adapters[i];
      At.middleRows(at, f.rank()) = f.A;
      Bt.middleCols(at, f.rank()) = static_cast<T>(weights[i] * f.scaling) * f.B;
      at += f.rank();
    }
    detail::require_finite<T>(where, Bt, "a weighted factor w_i s_i B_i");
    svd = factored_svd<T>(Bt, At);
    if (k == 0) k = std::min(total_rank, max_rank);
  } else {
    svd = dense_svd<T>(combination_target(adapters, weights, opt, module));
    if (k == 0) k = opt.method == CombineMethod::Linear ? std::min(total_rank, max_rank) : max_rank;
  }
  Truncation<T> t = truncate(svd, k);
  res.factors = std::move(t.factors);
  res.config = unit_scaling_config(k, opt.use_rslora);
  res.singular_values = std::move(svd.sigma);
  res.discarded_energy = t.discarded_energy;
  res.frobenius_error = t.frobenius_error;
  res.spectral_error = t.spectral_error;
  detail::require_finite_result(where, res);
  return res;
}

/// Hugging Face PEFT's add_weighted_adapter, done exactly: combines the named adapters of `layer`
/// and adds the result as `new_name` (stored with scaling 1). Refuses DoRA sources. Like
/// add_adapter, the result becomes the only active (and trainable) adapter; the sources stay on
/// the layer, inactive — set_active() chooses otherwise.
template <class T>
CombineResult<T> add_combined_adapter(LoRALinear<T>& layer, const std::string& new_name,
                                      const std::vector<std::string>& sources, const std::vector<double>& weights,
                                      const CombineOptions& opt = {}) {
  std::vector<LoraFactors<T>> fs;
  fs.reserve(sources.size());
  for (const auto& s : sources) fs.push_back(factors_of(layer.adapter(s), layer.name()));
  CombineResult<T> res = combine(fs, weights, opt, layer.name());
  add_factors_as_adapter(layer, new_name, res.factors, opt.use_rslora);
  return res;
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_COMBINE_TEMPLATES(KW, T)                                                                         \
  KW template Matrix<T> combination_target<T>(const std::vector<LoraFactors<T>>&, const std::vector<double>&, \
                                              const CombineOptions&, const std::string&);                     \
  KW template CombineResult<T> combine<T>(const std::vector<LoraFactors<T>>&, const std::vector<double>&,     \
                                          const CombineOptions&, const std::string&);
namespace peft {
PEFT_COMBINE_TEMPLATES(extern, float)
PEFT_COMBINE_TEMPLATES(extern, double)
}  // namespace peft
#endif
