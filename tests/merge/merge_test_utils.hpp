#pragma once
// Shared fixtures for the merge tests: adapters with unequal ranks, mixed alpha / rsLoRA scalings,
// and independent dense references (plain loops and full sorts, no code shared with the library).
#include <peft/core/rng.hpp>
#include <peft/layers/lora_linear.hpp>
#include <peft/merge/factors.hpp>

#include <Eigen/SVD>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "support/test_utils.hpp"

namespace peft::test {

/// Tolerances for results that pass through an SVD (relative to the norm of the reference).
template <class T>
struct SvdTolerances;
template <>
struct SvdTolerances<float> {
  static constexpr double rel = 2e-4;
};
template <>
struct SvdTolerances<double> {
  static constexpr double rel = 1e-10;
};

/// Three adapters of ranks 2, 3, 4 on a [out, in] layer, scalings from three different configs:
/// alpha/r, alpha/√r (rsLoRA), alpha/r with alpha != r.
template <class T>
std::vector<LoraFactors<T>> make_sources(Index out, Index in, Rng& rng) {
  LoraConfig c0;
  c0.r = 2;
  c0.alpha = 4.0;
  LoraConfig c1;
  c1.r = 3;
  c1.alpha = 5.0;
  c1.use_rslora = true;
  LoraConfig c2;
  c2.r = 4;
  c2.alpha = 1.5;
  std::vector<LoraFactors<T>> fs;
  for (const LoraConfig& c : {c0, c1, c2}) {
    LoraFactors<T> f;
    f.A = random_matrix<T>(c.r, in, rng);
    f.B = random_matrix<T>(out, c.r, rng, 0.5);
    f.scaling = c.scaling();
    fs.push_back(f);
  }
  return fs;
}

inline std::vector<double> mixed_weights() { return {0.7, -1.3, 0.45}; }

/// Σ w_i s_i B_i A_i computed entry by entry in double.
template <class T>
Eigen::MatrixXd ref_weighted_sum(const std::vector<LoraFactors<T>>& fs, const std::vector<double>& w) {
  Eigen::MatrixXd d = Eigen::MatrixXd::Zero(fs[0].B.rows(), fs[0].A.cols());
  for (std::size_t i = 0; i < fs.size(); ++i)
    for (Index o = 0; o < d.rows(); ++o)
      for (Index j = 0; j < d.cols(); ++j) {
        double acc = 0.0;
        for (Index k = 0; k < fs[i].A.rows(); ++k)
          acc += static_cast<double>(fs[i].B(o, k)) * static_cast<double>(fs[i].A(k, j));
        d(o, j) += w[i] * fs[i].scaling * acc;
      }
  return d;
}

/// Singular values of a dense matrix by one-sided Jacobi (independent of the library's BDCSVD).
inline Eigen::VectorXd ref_singular_values(const Eigen::MatrixXd& m) {
  Eigen::JacobiSVD<Eigen::MatrixXd> svd(m);
  return svd.singularValues();
}

/// ‖m − m_k‖_F² for the best rank-k approximation: Σ_{j>k} σ_j².
inline double ref_tail_energy(const Eigen::VectorXd& s, Index k) {
  double e = 0.0;
  for (Index j = k; j < s.size(); ++j) e += s(j) * s(j);
  return e;
}

template <class T>
Eigen::MatrixXd product_d(const LoraFactors<T>& f) {
  return f.scaling * (f.B.template cast<double>() * f.A.template cast<double>());
}

}  // namespace peft::test
