#pragma once
// Token and learned positional embeddings (torch.nn.Embedding; BERT / GPT-2 style absolute positions).
//
//   Embedding:            y_r = E[id_r]              E [num_embeddings, dim], y [rows, dim]
//                         ∂L/∂E[i] += Σ_{r : id_r = i} dy_r   (only rows that were used)
//   PositionalEmbedding:  y_{b·S+t} = x_{b·S+t} + P[t]  P [max_len, dim]
//                         ∂L/∂P[t] += Σ_b dy_{b·S+t},  ∂L/∂x = dy
//
// Embedding backward is sparse-aware: it scatters dy rows into the touched rows of E's gradient and
// never builds a dense [num_embeddings, dim] temporary; a frozen table costs nothing. Init as torch:
// N(0, 1).
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/core/sequence.hpp"

namespace peft {

template <class T>
class Embedding : public Module<T> {
 public:
  /// What backward needs: the ids that were looked up.
  struct Cache {
    std::vector<Index> ids;
  };

  Embedding() = default;

  /// E ~ N(0, 1) like torch.nn.Embedding.
  Embedding(Index num_embeddings, Index dim, Rng& rng, std::string name = "") : Module<T>(std::move(name)) {
    if (num_embeddings <= 0 || dim <= 0)  // before any sizing: a negative size would abort in Eigen
      throw ShapeError(describe("Embedding", this->name()) + ": num_embeddings and dim must be > 0, got " +
                       std::to_string(num_embeddings) + " and " + std::to_string(dim));
    weight = Parameter<T>(num_embeddings, dim, true);
    init::normal<T>(weight.value, rng, 0.0, 1.0);
  }

  /// Wraps an existing table [num_embeddings, dim].
  explicit Embedding(Matrix<T> table, std::string name = "") : Module<T>(std::move(name)) {
    if (table.rows() <= 0 || table.cols() <= 0)
      throw ShapeError(describe("Embedding", this->name()) + ": table must be non-empty, got " + shape_str(table));
    weight.value = std::move(table);
    weight.set_trainable(true);
  }

  Parameter<T> weight;  ///< E [num_embeddings, dim]

  Index num_embeddings() const { return weight.value.rows(); }
  Index dim() const { return weight.value.cols(); }

  /// y = E[ids] [count, dim]. Any id outside [0, num_embeddings) throws ShapeError naming it.
  void forward(const Index* ids, Index count, Matrix<T>& y, Cache& cache) {
    check_ids(ids, count);
    y.resize(count, dim());
    for (Index r = 0; r < count; ++r) y.row(r) = weight.value.row(ids[r]);
    cache.ids.assign(ids, ids + count);
  }
  void forward(const std::vector<Index>& ids, Matrix<T>& y, Cache& cache) {
    forward(ids.data(), static_cast<Index>(ids.size()), y, cache);
  }
  Matrix<T> forward(const std::vector<Index>& ids, Cache& cache) {
    Matrix<T> y;
    forward(ids, y, cache);
    return y;
  }

  /// The same rows with nothing kept for backward (evaluation): `y` is resized only when its shape
  /// changes.
  void forward_inference(const Index* ids, Index count, Matrix<T>& y) const {
    check_ids(ids, count);
    y.resize(count, dim());
    for (Index r = 0; r < count; ++r) y.row(r) = weight.value.row(ids[r]);
  }

  /// E.grad[id_r] += dy_r for every looked-up row (when trainable). Ids carry no gradient.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy) {
    check::shape("Embedding", this->name(), "output gradient", dy.rows(), dy.cols(),
                 static_cast<Index>(cache.ids.size()), dim());
    if (!weight.trainable()) return;
    for (Index r = 0; r < dy.rows(); ++r) weight.grad.row(cache.ids[static_cast<std::size_t>(r)]) += dy.row(r);
  }

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override { fn("weight", weight); }

 private:
  void check_ids(const Index* ids, Index count) const;
};

// ---- Embedding members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
void Embedding<T>::check_ids(const Index* ids, Index count) const {
  for (Index r = 0; r < count; ++r)
    if (ids[r] < 0 || ids[r] >= num_embeddings())
      throw ShapeError(describe("Embedding", this->name()) + ": token id " + std::to_string(ids[r]) + " at position " +
                       std::to_string(r) + " is out of range for vocabulary size " + std::to_string(num_embeddings()));
}

/// Learned absolute positions: adds P[t] to token t of every sequence.
template <class T>
class PositionalEmbedding : public Module<T> {
 public:
  /// What backward needs: the layout (positions of every row).
  struct Cache {
    Index batch = 0;
    Index seq = 0;
  };

  PositionalEmbedding() = default;

  /// P ~ N(0, 1) (torch.nn.Embedding's init; BERT re-initialises with N(0, 0.02) — use init:: to change).
  PositionalEmbedding(Index max_len, Index dim, Rng& rng, std::string name = "") : Module<T>(std::move(name)) {
    if (max_len <= 0 || dim <= 0)  // before any sizing: a negative size would abort in Eigen
      throw ShapeError(describe("PositionalEmbedding", this->name()) + ": max_len and dim must be > 0, got " +
                       std::to_string(max_len) + " and " + std::to_string(dim));
    weight = Parameter<T>(max_len, dim, true);
    init::normal<T>(weight.value, rng, 0.0, 1.0);
  }

  Parameter<T> weight;  ///< P [max_len, dim]

  Index max_len() const { return weight.value.rows(); }
  Index dim() const { return weight.value.cols(); }

  /// x += P[t] for token t of every sequence (padding rows too; attention masks them anyway).
  void forward_inplace(MatrixRef<T> x, const SequenceLayout& layout, Cache& cache);

  /// y = x + P[positions] (copying form of forward_inplace).
  void forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y, Cache& cache) {
    y = x;
    forward_inplace(y, layout, cache);
  }

  /// P.grad[t] += Σ_b dy[b·S + t] (when trainable). The input gradient is dy itself (identity).
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy) {
    check::shape("PositionalEmbedding", this->name(), "output gradient", dy.rows(), dy.cols(), cache.batch * cache.seq,
                 dim());
    if (!weight.trainable()) return;
    for (Index b = 0; b < cache.batch; ++b) weight.grad.topRows(cache.seq) += dy.middleRows(b * cache.seq, cache.seq);
  }

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override { fn("weight", weight); }
};

// ---- PositionalEmbedding members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
void PositionalEmbedding<T>::forward_inplace(MatrixRef<T> x, const SequenceLayout& layout, Cache& cache) {
  layout.validate("PositionalEmbedding", this->name(), x.rows());
  layout.require_right_padded("PositionalEmbedding", this->name());
  check::input_features("PositionalEmbedding", this->name(), x.cols(), dim());
  if (layout.seq > max_len())
    throw ShapeError(describe("PositionalEmbedding", this->name()) + ": sequence length " + std::to_string(layout.seq) +
                     " exceeds max_len " + std::to_string(max_len()));
  for (Index b = 0; b < layout.batch; ++b) x.middleRows(b * layout.seq, layout.seq) += weight.value.topRows(layout.seq);
  cache.batch = layout.batch;
  cache.seq = layout.seq;
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class Embedding<float>;
extern template class Embedding<double>;
extern template class PositionalEmbedding<float>;
extern template class PositionalEmbedding<double>;
}  // namespace peft
#endif
