#pragma once
// LoftQ initialization (Li et al. 2023, "LoftQ: LoRA-Fine-Tuning-Aware Quantization for Large
// Language Models", Algorithm 1): choose the quantized base Q and the adapter (B, A) together so that
//   deq(Q) + s·B·A ≈ W
// instead of QLoRA's Q = quantize(W), B = 0, which leaves the whole quantization error in the model.
// Alternating minimization, T steps, starting from B·A = 0:
//   Q_t      = quantize(W − s·B_{t−1} A_{t−1})
//   R_t      = W − deq(Q_t) = U Σ Vᵀ,   L = U_r √Σ_r,  Rr = √Σ_r V_rᵀ   (best rank-r fit, Eckart–Young)
//   B_t      = L / √s,  A_t = Rr / √s   so that s·B_t A_t = U_r Σ_r V_rᵀ exactly.
// Hugging Face PEFT's loftq_utils stores A = Rr, B = L without the 1/√s, which is only right for
// s = alpha/r = 1; folding the scaling here keeps deq(Q) + s·B·A the fitted approximation for any s.
// Each step can only lower e_t = ‖W − deq(Q_t) − s·B_t A_t‖_F below the plain QLoRA error
// e_QLoRA = ‖W − deq(quantize(W))‖_F: step 1 is QLoRA's Q plus the SVD of its error.
#include <cmath>
#include <string>
#include <vector>

#include <Eigen/SVD>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/quant/nf4.hpp"

namespace peft::quant {

template <class T>
struct LoftQResult {
  NF4Tensor weight;            ///< Q_T
  Matrix<T> A;                 ///< [r, in]
  Matrix<T> B;                 ///< [out, r]
  double qlora_error = 0.0;    ///< ‖W − deq(quantize(W))‖_F (B = 0)
  std::vector<double> errors;  ///< e_t = ‖W − deq(Q_t) − s·B_t A_t‖_F, t = 1..T
};

/// LoftQ with `steps` alternating steps for rank r and LoRA scaling s (LoraConfig::scaling()).
template <class T>
LoftQResult<T> loftq_init(const ConstMatrixRef<T>& w, int r, double scaling, int steps, const NF4Options& opt = {}) {
  const Index out = w.rows();
  const Index in = w.cols();
  if (out <= 0 || in <= 0) throw ShapeError("loftq_init: weight has shape " + shape_str(out, in));
  if (r <= 0 || r > std::min(out, in))
    throw ConfigError("loftq_init: rank r must be in [1, " + std::to_string(std::min(out, in)) + "], got " +
                      std::to_string(r));
  if (!(scaling > 0.0) || !std::isfinite(scaling))
    throw ConfigError("loftq_init: scaling must be finite and > 0, got " + std::to_string(scaling));
  if (steps <= 0) throw ConfigError("loftq_init: steps must be >= 1, got " + std::to_string(steps));

  using MatD = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic>;  // column-major for the SVD
  const MatD wd = w.template cast<double>();
  LoftQResult<T> res;
  MatD low = MatD::Zero(out, in);  // s·B·A of the previous step
  for (int t = 0; t < steps; ++t) {
    const Matrix<T> target = (wd - low).template cast<T>();
    res.weight = quantize_nf4<T>(target, opt);
    const MatD deq = dequantize_nf4<double>(res.weight);
    const MatD resid = wd - deq;  // R_t = W − deq(Q_t)
    if (t == 0) res.qlora_error = resid.norm();
    Eigen::BDCSVD<MatD> svd(resid, Eigen::ComputeThinU | Eigen::ComputeThinV);
    const Eigen::VectorXd root = (svd.singularValues().head(r) / scaling).cwiseSqrt();       // √(σ / s)
    res.B = (svd.matrixU().leftCols(r) * root.asDiagonal()).template cast<T>();              // [out, r]
    res.A = (root.asDiagonal() * svd.matrixV().leftCols(r).transpose()).template cast<T>();  // [r, in]
    low = scaling * (res.B.template cast<double>() * res.A.template cast<double>());
    res.errors.push_back((resid - low).norm());
  }
  return res;
}

}  // namespace peft::quant
