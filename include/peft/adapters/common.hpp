#pragma once
// Pieces shared by the adapter methods of this folder (VeRA, LoHa, LoKr): how their tensors are
// named in Hugging Face PEFT files, the structured products that turn their updates into LoRA
// factors, and the LyCORIS-style training-only dropouts (rank dropout, module dropout).
//
//   Kronecker:       kron(P, Q)[i·q_r + p, j·q_c + k] = P[i, j] · Q[p, k]           (torch.kron)
//   face-splitting:  (P1 •row P2)[a, i·r2 + j] = P1[a, i] · P2[a, j]      [m, r1·r2]
//                    (Q1 •col Q2)[i·r2 + j, b] = Q1[i, b] · Q2[j, b]      [r1·r2, n]
//   identity:        (P1 Q1) ⊙ (P2 Q2) = (P1 •row P2) · (Q1 •col Q2)     (Slyusar, 1999)
//   mixed product:   kron(U1 V1, U2 V2) = kron(U1, U2) · kron(V1, V2)
//
// File keys: PEFT saves `base_model.model.<module path>.<param>` and drops the adapter name that
// the in-model state dict carries (`<module path>.<param>.<adapter>`, a ParameterDict entry).
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/parameter.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/types.hpp"

namespace peft {

/// One tensor of an adapter as PEFT names it, and the parameter that holds it.
template <class T>
struct AdapterTensor {
  std::string file_key;    ///< key in adapter_model.safetensors: `base_model.model.<module>.<param>`
  std::string model_name;  ///< name in PEFT's model state dict: `<module>.<param>.<adapter>`
  Parameter<T>* parameter = nullptr;
  bool vector = false;  ///< saved 1-D ([n], stored [1, n]) as PEFT saves it
};

/// `base_model.model.<module_path>.<param>`: the key PEFT writes for a module's adapter tensor.
inline std::string peft_file_key(const std::string& module_path, const std::string& param) {
  return "base_model.model." + module_path + "." + param;
}

/// `<module_path>.<param>.<adapter>`: the name the tensor has in PEFT's model state dict.
inline std::string peft_model_name(const std::string& module_path, const std::string& param,
                                   const std::string& adapter) {
  return (module_path.empty() ? std::string() : module_path + ".") + param + "." + adapter;
}

/// kron(P, Q) [P.rows·Q.rows, P.cols·Q.cols], torch.kron's index convention. Dense: tests, merges.
template <class T>
Matrix<T> kron(const ConstMatrixRef<T>& P, const ConstMatrixRef<T>& Q) {
  Matrix<T> K(P.rows() * Q.rows(), P.cols() * Q.cols());
  for (Index i = 0; i < P.rows(); ++i)
    for (Index j = 0; j < P.cols(); ++j) K.block(i * Q.rows(), j * Q.cols(), Q.rows(), Q.cols()) = P(i, j) * Q;
  return K;
}

/// Row-wise Kronecker (face-splitting) product of P1 [m, r1] and P2 [m, r2]: [m, r1·r2].
template <class T>
Matrix<T> row_kron(const ConstMatrixRef<T>& P1, const ConstMatrixRef<T>& P2) {
  Matrix<T> K(P1.rows(), P1.cols() * P2.cols());
  for (Index i = 0; i < P1.cols(); ++i)
    K.middleCols(i * P2.cols(), P2.cols()) = P2.array().colwise() * P1.col(i).array();
  return K;
}

/// Column-wise Kronecker (Khatri–Rao) product of Q1 [r1, n] and Q2 [r2, n]: [r1·r2, n].
template <class T>
Matrix<T> col_kron(const ConstMatrixRef<T>& Q1, const ConstMatrixRef<T>& Q2) {
  Matrix<T> K(Q1.rows() * Q2.rows(), Q1.cols());
  for (Index i = 0; i < Q1.rows(); ++i)
    K.middleRows(i * Q2.rows(), Q2.rows()) = Q2.array().rowwise() * Q1.row(i).array();
  return K;
}

namespace detail {

/// LyCORIS rank dropout: a 0/1 mask over the out rows of ΔW, kept with probability 1 − p
/// (torch.rand(out) > p), divided by its mean when `rescale` (a mask with no kept row stays 0:
/// PEFT would divide by zero and produce NaN). Fills mask [1, out].
template <class T>
void draw_row_mask(RowVector<T>& mask, Index out, double p, bool rescale, Rng& rng) {
  mask.resize(out);
  Index kept = 0;
  for (Index o = 0; o < out; ++o) {
    const bool keep = rng.uniform() > p;
    mask(o) = keep ? T(1) : T(0);
    kept += keep ? 1 : 0;
  }
  if (rescale && kept > 0) mask *= static_cast<T>(static_cast<double>(out) / static_cast<double>(kept));
}

/// LyCORIS module dropout: the whole adapter term is skipped unless torch.rand(1) > p.
inline bool draw_module_skip(double p, Rng& rng) { return p > 0.0 && !(rng.uniform() > p); }

/// x must be [rows, in] and y [rows, out].
template <class T>
void check_io(const char* kind, const std::string& name, const ConstMatrixRef<T>& x, const Matrix<T>& y, Index in,
              Index out) {
  check::input_features(kind, name, x.cols(), in);
  check::shape(kind, name, "output y", y.rows(), y.cols(), x.rows(), out);
}

/// dy must be [rows, out] and *dx (when given) [rows, in].
template <class T>
void check_grad_io(const char* kind, const std::string& name, const ConstMatrixRef<T>& dy, const Matrix<T>* dx,
                   Index rows, Index in, Index out) {
  check::shape(kind, name, "dy", dy.rows(), dy.cols(), rows, out);
  if (dx != nullptr) check::shape(kind, name, "dx", dx->rows(), dx->cols(), rows, in);
}

}  // namespace detail
}  // namespace peft
