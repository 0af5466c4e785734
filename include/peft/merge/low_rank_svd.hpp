#pragma once
// Thin SVDs of low-rank products and their optimal truncation (Eckart & Young, 1936).
//
// Factored SVD of M = B̃ Ã with B̃ [out, R], Ã [R, in], R small, never forming the out × in M:
//   B̃ = Q_B R_B,  Ãᵀ = Q_A R_A         (thin Householder QR; Q_B [out, m_B], Q_A [in, m_A])
//   M = Q_B (R_B R_Aᵀ) Q_Aᵀ,  C = R_B R_Aᵀ = U Σ Vᵀ   (SVD of the small [m_B, m_A] core)
//   ⇒ M = (Q_B U) Σ (Q_A V)ᵀ
// at O((out + in) R² + R³) flops instead of O(out · in · min(out, in)) for the dense SVD
// (the "QR then small SVD" step of Halko, Martinsson & Tropp, 2011, §5.1).
//
// Truncation to rank k keeps the k largest triplets; by Eckart–Young it is the best rank-k
// approximation in Frobenius and spectral norm, with
//   ‖M − M_k‖_F² = Σ_{j>k} σ_j²  (the discarded energy),   ‖M − M_k‖_2 = σ_{k+1}.
// The factors are balanced: B' = U_k √Σ_k, A' = √Σ_k V_kᵀ (equal column/row norms, so a later
// fine-tune of the combined adapter sees both factors on the same scale).
//
// The decompositions run in double whatever T is (a float input is widened, the factors are
// narrowed back): float results gain precision, and a program instantiates Eigen's QR and SVD once
// (they are among the slowest templates to compile), not once per scalar type.
#include <Eigen/QR>
#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/separate.hpp"
#include "peft/core/types.hpp"
#include "peft/merge/factors.hpp"

namespace peft {

/// M = U diag(σ) Vᵀ with σ descending; U [out, m], V [in, m].
template <class T>
struct ThinSvd {
  Matrix<T> U;
  std::vector<double> sigma;
  Matrix<T> V;
};

/// A rank-k truncation of a thin SVD: factors (scaling 1) and what was thrown away.
template <class T>
struct Truncation {
  LoraFactors<T> factors;
  double discarded_energy = 0.0;  ///< Σ_{j>k} σ_j²
  double frobenius_error = 0.0;   ///< √(discarded energy) = ‖M − B'A'‖_F
  double spectral_error = 0.0;    ///< σ_{k+1} = ‖M − B'A'‖_2 (0 when nothing was discarded)
};

namespace detail {

template <class T>
using ColMajor = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic>;
using ColMajorD = ColMajor<double>;

/// Thin SVD of m (in double): U, σ (descending), V.
PEFT_SEPARATE_INLINE void svd_of(const ColMajorD& m, ColMajorD& u, std::vector<double>& sigma, ColMajorD& v);
/// Thin QR of a tall-or-wide [n, R] matrix: Q [n, m], Rf [m, R] upper trapezoidal, m = min(n, R).
PEFT_SEPARATE_INLINE void thin_qr(const ColMajorD& x, ColMajorD& q, ColMajorD& r);

#if PEFT_SEPARATE_BODIES  // (peft/core/separate.hpp)
PEFT_SEPARATE_INLINE void svd_of(const ColMajorD& m, ColMajorD& u, std::vector<double>& sigma, ColMajorD& v) {
#if EIGEN_VERSION_AT_LEAST(3, 4, 90)
  Eigen::BDCSVD<ColMajorD, Eigen::ComputeThinU | Eigen::ComputeThinV> svd(m);
#else
  Eigen::BDCSVD<ColMajorD> svd(m, Eigen::ComputeThinU | Eigen::ComputeThinV);
#endif
  u = svd.matrixU();
  v = svd.matrixV();
  const auto& s = svd.singularValues();
  sigma.resize(static_cast<std::size_t>(s.size()));
  for (Index j = 0; j < s.size(); ++j) sigma[static_cast<std::size_t>(j)] = s(j);
}

PEFT_SEPARATE_INLINE void thin_qr(const ColMajorD& x, ColMajorD& q, ColMajorD& r) {
  const Index m = std::min(x.rows(), x.cols());
  Eigen::HouseholderQR<ColMajorD> qr(x);
  q = qr.householderQ() * ColMajorD::Identity(x.rows(), m);
  r = qr.matrixQR().topRows(m).template triangularView<Eigen::Upper>();
}
#endif  // PEFT_SEPARATE_BODIES

}  // namespace detail

/// Thin SVD of the product B̃ Ã from its factors (see the header comment). B̃ [out, R], Ã [R, in].
template <class T>
ThinSvd<T> factored_svd(const ConstMatrixRef<T>& Bt, const ConstMatrixRef<T>& At) {
  if (Bt.cols() != At.rows())
    throw ShapeError("factored_svd: B has shape " + shape_str(Bt) + " and A has shape " + shape_str(At) +
                     "; B must have as many columns as A has rows");
  using CM = detail::ColMajorD;
  CM qb, rb, qa, ra;
  detail::thin_qr(Bt.template cast<double>(), qb, rb);              // B̃ = Q_B R_B
  detail::thin_qr(At.transpose().template cast<double>(), qa, ra);  // Ãᵀ = Q_A R_A
  CM core(rb.rows(), ra.rows());
  core.noalias() = rb * ra.transpose();  // C = R_B R_Aᵀ   [m_B, m_A]
  CM u, v;
  ThinSvd<T> out;
  detail::svd_of(core, u, out.sigma, v);  // C = U Σ Vᵀ
  out.U = (qb * u).template cast<T>();    // Q_B U   [out, m]
  out.V = (qa * v).template cast<T>();    // Q_A V   [in, m]
  return out;
}

/// Thin SVD of a dense matrix (divide-and-conquer BDCSVD).
template <class T>
ThinSvd<T> dense_svd(const ConstMatrixRef<T>& M) {
  detail::ColMajorD u, v;
  ThinSvd<T> out;
  detail::svd_of(M.template cast<double>(), u, out.sigma, v);
  out.U = u.template cast<T>();
  out.V = v.template cast<T>();
  return out;
}

/// Best rank-k factors of U diag(σ) Vᵀ: B' = U_k √Σ_k, A' = √Σ_k V_kᵀ, scaling 1. When k exceeds
/// the number of triplets, the extra rows of A' and columns of B' are zero (the delta is exact and
/// the adapter still has the requested rank k).
template <class T>
Truncation<T> truncate(const ThinSvd<T>& svd, Index k) {
  const Index m = static_cast<Index>(svd.sigma.size());
  if (k <= 0) throw ConfigError("truncate: rank must be >= 1, got " + std::to_string(k));
  const Index in = svd.V.rows(), out = svd.U.rows();
  const Index kept = std::min(k, m);
  Truncation<T> t;
  t.factors.A = Matrix<T>::Zero(k, in);
  t.factors.B = Matrix<T>::Zero(out, k);
  for (Index j = 0; j < kept; ++j) {
    const T root = static_cast<T>(std::sqrt(svd.sigma[static_cast<std::size_t>(j)]));
    t.factors.B.col(j) = root * svd.U.col(j);
    t.factors.A.row(j) = root * svd.V.col(j).transpose();
  }
  double discarded = 0.0;
  for (Index j = m - 1; j >= kept; --j) {  // smallest first: sums small terms before large ones
    const double s = svd.sigma[static_cast<std::size_t>(j)];
    discarded += s * s;
  }
  t.discarded_energy = discarded;
  t.frobenius_error = std::sqrt(discarded);
  t.spectral_error = kept < m ? svd.sigma[static_cast<std::size_t>(kept)] : 0.0;
  return t;
}

/// Smallest k with Σ_{j≤k} σ_j² ≥ tau · Σ_j σ_j² (tau in (0, 1]); at least 1.
inline Index rank_for_energy(const std::vector<double>& sigma, double tau) {
  if (!std::isfinite(tau) || tau <= 0.0 || tau > 1.0)
    throw ConfigError("rank_for_energy: energy threshold must be in (0, 1], got " + check::num(tau));
  double total = 0.0;
  for (double s : sigma) total += s * s;
  double kept = 0.0;
  for (std::size_t j = 0; j < sigma.size(); ++j) {
    kept += sigma[j] * sigma[j];
    if (kept >= tau * total) return static_cast<Index>(j + 1);
  }
  return std::max<Index>(1, static_cast<Index>(sigma.size()));
}

}  // namespace peft
