#pragma once
// Prototypical networks (Snell, Swersky & Zemel, 2017, "Prototypical Networks for Few-shot
// Learning", eqs. 1-2): the loss of one episode over embeddings f(x) computed by any encoder.
//
// Support embeddings s_i [D] with episode labels y_i ∈ [0, N), query embeddings q_j with labels t_j:
//   c_k   = (1/n_k) Σ_{i: y_i = k} s_i                       prototypes [N, D], n_k support rows of k
//   d_jk  = ‖q_j − c_k‖² = ‖q_j‖² + ‖c_k‖² − 2 q_j·c_k        squared Euclidean distances [M, N]
//   z_jk  = −d_jk,   p_jk = softmax_k(z_j),   L = −(1/M) Σ_j log p_{j,t_j}   (cross_entropy.hpp)
// Backward, exact through the means (G = ∂L/∂z from the cross-entropy, so ∂L/∂d = −G):
//   ∂L/∂q_j = Σ_k −G_jk · 2(q_j − c_k)          = −2 (rowsum(G)_j q_j − (G C)_j)        [M, D]
//   ∂L/∂c_k = Σ_j −G_jk · (−2)(q_j − c_k)       =  2 ((Gᵀ Q)_k − colsum(G)_k c_k)       [N, D]
//   ∂L/∂s_i = ∂L/∂c_{y_i} / n_{y_i}                                                      [S, D]
// The encoder's backward then takes these as the gradients of its outputs (one encoder called on
// support and query, or on both stacked). Buffers are members, resized only when a shape changes.
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/loss/cross_entropy.hpp"

namespace peft {

template <class T>
class PrototypicalLoss {
 public:
  /// Mean cross-entropy of the queries under softmax(−distance to each prototype); writes the
  /// gradients of the support and query embeddings into *dsupport / *dquery (either may be null).
  /// Every episode label in [0, n_way) must have at least one support row.
  T forward_backward(const ConstMatrixRef<T>& support, const std::vector<std::int64_t>& support_labels,
                     const ConstMatrixRef<T>& query, const std::vector<std::int64_t>& query_labels, Index n_way,
                     Matrix<T>* dsupport, Matrix<T>* dquery);

  /// Only the prototypes and the logits −d (no loss): for prediction.
  void forward(const ConstMatrixRef<T>& support, const std::vector<std::int64_t>& support_labels,
               const ConstMatrixRef<T>& query, Index n_way);

  /// From the last call: prototypes [N, D], logits −d [M, N].
  const Matrix<T>& prototypes() const { return protos_; }
  const Matrix<T>& logits() const { return logits_; }
  /// Query rows whose nearest prototype is their label (last call; `labels` as passed to it).
  Index correct(const std::vector<std::int64_t>& labels) const {
    Index hits = 0;
    for (Index j = 0; j < logits_.rows(); ++j) {
      Index best = 0;
      logits_.row(j).maxCoeff(&best);
      hits += static_cast<std::int64_t>(best) == labels[static_cast<std::size_t>(j)] ? 1 : 0;
    }
    return hits;
  }

 private:
  Matrix<T> protos_, logits_, dlogits_, dprotos_;
  RowVector<T> counts_, qsq_, csq_;
  ColVector<T> gsum_rows_, gsum_cols_;
};

template <class T>
void PrototypicalLoss<T>::forward(const ConstMatrixRef<T>& support, const std::vector<std::int64_t>& support_labels,
                                  const ConstMatrixRef<T>& query, Index n_way) {
  const Index d = support.cols();
  if (n_way < 1) throw ConfigError("PrototypicalLoss: n_way must be >= 1, got " + std::to_string(n_way));
  if (static_cast<Index>(support_labels.size()) != support.rows())
    throw ShapeError("PrototypicalLoss: " + std::to_string(support_labels.size()) + " support labels for " +
                     std::to_string(support.rows()) + " support rows");
  if (query.cols() != d)
    throw ShapeError("PrototypicalLoss: query embeddings have " + std::to_string(query.cols()) +
                     " features, expected " + std::to_string(d) + " (the support's)");
  protos_.setZero(n_way, d);
  counts_.setZero(n_way);
  for (Index i = 0; i < support.rows(); ++i) {
    const std::int64_t y = support_labels[static_cast<std::size_t>(i)];
    if (y < 0 || y >= static_cast<std::int64_t>(n_way))
      throw ShapeError("PrototypicalLoss: support label at row " + std::to_string(i) + " is " + std::to_string(y) +
                       ", expected a class in [0, " + std::to_string(n_way) + ")");
    protos_.row(static_cast<Index>(y)) += support.row(i);
    counts_(static_cast<Index>(y)) += T(1);
  }
  for (Index k = 0; k < n_way; ++k) {
    if (counts_(k) == T(0))
      throw ShapeError("PrototypicalLoss: class " + std::to_string(k) + " has no support row, expected >= 1");
    protos_.row(k) /= counts_(k);  // c_k = mean of its support embeddings
  }
  // −d_jk = 2 q_j·c_k − ‖q_j‖² − ‖c_k‖²   [M, N]
  qsq_ = query.rowwise().squaredNorm().transpose();
  csq_ = protos_.rowwise().squaredNorm().transpose();
  logits_.resize(query.rows(), n_way);
  logits_.noalias() = T(2) * query * protos_.transpose();
  logits_.colwise() -= qsq_.transpose();
  logits_.rowwise() -= csq_;
}

template <class T>
T PrototypicalLoss<T>::forward_backward(const ConstMatrixRef<T>& support,
                                        const std::vector<std::int64_t>& support_labels, const ConstMatrixRef<T>& query,
                                        const std::vector<std::int64_t>& query_labels, Index n_way, Matrix<T>* dsupport,
                                        Matrix<T>* dquery) {
  forward(support, support_labels, query, n_way);
  const T loss = cross_entropy<T>(logits_, query_labels, &dlogits_);  // G = ∂L/∂z   [M, N]
  if (dquery) {
    // ∂L/∂Q = −2 (diag(rowsum G) Q − G C)   [M, D]
    dquery->resize(query.rows(), query.cols());
    dquery->noalias() = T(2) * dlogits_ * protos_;
    gsum_rows_ = dlogits_.rowwise().sum();
    dquery->array() -= T(2) * (query.array().colwise() * gsum_rows_.array());
  }
  if (dsupport) {
    // ∂L/∂C = 2 (Gᵀ Q − diag(colsum G) C)   [N, D], then ∂L/∂s_i = ∂L/∂c_{y_i} / n_{y_i}
    dprotos_.resize(n_way, query.cols());
    dprotos_.noalias() = T(2) * dlogits_.transpose() * query;
    gsum_cols_ = dlogits_.colwise().sum().transpose();
    dprotos_.array() -= T(2) * (protos_.array().colwise() * gsum_cols_.array());
    dsupport->resize(support.rows(), support.cols());
    for (Index i = 0; i < support.rows(); ++i) {
      const Index y = static_cast<Index>(support_labels[static_cast<std::size_t>(i)]);
      dsupport->row(i) = dprotos_.row(y) / counts_(y);
    }
  }
  return loss;
}

}  // namespace peft
