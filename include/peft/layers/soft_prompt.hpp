#pragma once
// SoftPrompt: prompt tuning (Lester, Al-Rfou & Constant, 2021, "The Power of Scale for
// Parameter-Efficient Prompt Tuning").
//
// n learned "virtual token" embeddings P ∈ R^{n×d} are prepended to every sequence's input
// embeddings; the frozen model then runs on the longer sequences:
//
//   for each sequence b:  Y_b = [ P ; X_b ]        X_b [seq, d] → Y_b [n + seq, d]
//   lengths:  len'_b = n + len_b                   (prompt positions are always attended to)
//   labels:   [ignore × n ; labels_b]              (prompt positions are never scored)
//
// Backward: dP = Σ_b dY_b[0:n]   (every sequence shares the same prompt), dX_b = dY_b[n:].
// Parameter count n·d.
//
// Layout: a batch of sequences is one contiguous [batch·seq, d] block plus a SequenceLayout
// (peft/core/sequence.hpp); the output block is [batch·(n+seq), d] with layout.prepended(n): the
// prompt first in every sequence, so real position t of sequence b moves to row b·(n+seq) + n + t.
//
// Names: the table is `embedding.weight` [n, d], as Hugging Face PEFT's PromptEmbedding
// (`prompt_encoder.<adapter>.embedding.weight`); PEFT saves the same tensor under the key
// `prompt_embeddings` with shape [num_virtual_tokens, token_dim] (kHfSaveKey below).
//
// Inits (PEFT's PromptTuningInit): RANDOM draws N(0, 1)·scale (PEFT's nn.Embedding default is
// N(0, 1), i.e. scale = 1); TEXT copies the embeddings of given token ids, repeated cyclically
// when fewer than n and truncated when more; SAMPLE_VOCAB copies n rows of the vocabulary drawn
// uniformly at random (with replacement).
#include <algorithm>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/core/sequence.hpp"

namespace peft {

enum class PromptInit {
  Random,       ///< N(0, 1)·scale
  FromTokens,   ///< copies of given token ids' embeddings (PEFT's TEXT init, ids already tokenized)
  SampleVocab,  ///< rows of the vocabulary sampled uniformly (PEFT's SAMPLE_VOCAB)
};

template <class T>
class SoftPrompt : public Module<T> {
 public:
  /// Key under which Hugging Face PEFT saves the prompt table ([num_virtual_tokens, token_dim]).
  static constexpr const char* kHfSaveKey = "prompt_embeddings";

  /// What backward needs: the prepended layout (the map itself is a copy).
  struct Cache {
    SequenceLayout out_layout;
  };

  SoftPrompt() = default;

  /// n virtual tokens of width d, initialized N(0, 1)·scale.
  SoftPrompt(Index num_virtual_tokens, Index dim, Rng& rng, double scale = 1.0, std::string name = "")
      : Module<T>(std::move(name)) {
    if (num_virtual_tokens <= 0 || dim <= 0)
      throw ConfigError(describe("SoftPrompt", this->name()) + ": num_virtual_tokens and token_dim must be > 0, got " +
                        std::to_string(num_virtual_tokens) + " and " + std::to_string(dim));
    embedding = Parameter<T>(num_virtual_tokens, dim, true);
    init_random(rng, scale);
  }

  Parameter<T> embedding;  ///< P [n, d]

  Index num_virtual_tokens() const { return embedding.value.rows(); }
  Index dim() const { return embedding.value.cols(); }

  /// P ~ N(0, 1)·scale.
  void init_random(Rng& rng, double scale = 1.0) {
    check::positive("SoftPrompt", this->name(), "init scale", scale);
    init::normal<T>(embedding.value, rng, 0.0, scale);
  }

  /// P_i = E[ids[i mod |ids|]]: the embeddings of the given tokens, repeated cyclically when there
  /// are fewer ids than virtual tokens and truncated when there are more (PEFT's TEXT init).
  void init_from_tokens(const ConstMatrixRef<T>& vocab, const std::vector<Index>& ids);

  /// P_i = E[u_i], u_i uniform over the vocabulary (with replacement; PEFT's SAMPLE_VOCAB).
  void init_from_vocab_sample(const ConstMatrixRef<T>& vocab, Rng& rng) {
    check_vocab(vocab);
    for (Index i = 0; i < num_virtual_tokens(); ++i)
      embedding.value.row(i) = vocab.row(static_cast<Index>(rng.uniform_int(static_cast<std::uint64_t>(vocab.rows()))));
  }

  /// Y = per sequence [P ; X_b]. x is [batch·seq, d] laid out by `layout`; y becomes
  /// [batch·(n + seq), d] laid out by `out_layout` = layout.prepended(n) (also kept in the cache).
  void forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y, SequenceLayout& out_layout,
               Cache& cache) const {
    check::input_features("SoftPrompt", this->name(), x.cols(), dim());
    layout.validate("SoftPrompt", this->name(), x.rows());
    prepend_rows<T>(x, layout, embedding.value, y, out_layout, num_virtual_tokens());
    cache.out_layout = out_layout;
  }

  Matrix<T> forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, SequenceLayout& out_layout,
                    Cache& cache) const {
    Matrix<T> y;
    forward(x, layout, y, out_layout, cache);
    return y;
  }

  /// The same output with no cache (evaluation): out_layout reuses its storage, y is resized only
  /// when its shape changes.
  void forward_inference(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y,
                         SequenceLayout& out_layout) const {
    check::input_features("SoftPrompt", this->name(), x.cols(), dim());
    layout.validate("SoftPrompt", this->name(), x.rows());
    prepend_rows<T>(x, layout, embedding.value, y, out_layout, num_virtual_tokens());
  }

  /// dP += Σ_b dY_b[0:n] (when trainable); *dx = the real rows of dY, [batch·seq, d].
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
    check::shape("SoftPrompt", this->name(), "output gradient", dy.rows(), dy.cols(), cache.out_layout.rows(), dim());
    // dX_b = dY_b[n:];  dP += Σ_b dY_b[0:n] (only when trainable: a frozen prompt has no grad buffer)
    split_prepended_rows<T>(dy, cache.out_layout, num_virtual_tokens(), dx,
                            embedding.trainable() ? &embedding.grad : nullptr);
  }

  /// The layout seen by the model after the prompt: seq + n, len'_b = n + len_b (prompt positions
  /// are valid, attended positions).
  SequenceLayout extend_layout(const SequenceLayout& layout) const { return layout.prepended(num_virtual_tokens()); }

  /// Per-position labels [batch·seq] → [batch·(n + seq)] with `ignore_index` (PEFT/torch: -100)
  /// at the prompt positions, so a token-level loss never scores them.
  std::vector<Index> extend_labels(const std::vector<Index>& labels, const SequenceLayout& layout,
                                   Index ignore_index = -100) const;

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    fn("embedding.weight", embedding);
  }

 private:
  void check_vocab(const ConstMatrixRef<T>& vocab) const {
    if (vocab.rows() <= 0 || vocab.cols() != dim())
      throw ShapeError(describe("SoftPrompt", this->name()) + ": vocabulary table has shape " +
                       shape_str(vocab.rows(), vocab.cols()) + ", expected [vocab > 0, " + std::to_string(dim()) + "]");
  }
};

// ---- SoftPrompt members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
void SoftPrompt<T>::init_from_tokens(const ConstMatrixRef<T>& vocab, const std::vector<Index>& ids) {
  check_vocab(vocab);
  if (ids.empty()) throw ConfigError(describe("SoftPrompt", this->name()) + ": init token id list is empty");
  for (Index id : ids)
    if (id < 0 || id >= vocab.rows())
      throw ConfigError(describe("SoftPrompt", this->name()) + ": init token id " + std::to_string(id) +
                        " is outside the vocabulary [0, " + std::to_string(vocab.rows()) + ")");
  const Index count = static_cast<Index>(ids.size());
  for (Index i = 0; i < num_virtual_tokens(); ++i)
    embedding.value.row(i) = vocab.row(ids[static_cast<std::size_t>(i % count)]);
}

template <class T>
std::vector<Index> SoftPrompt<T>::extend_labels(const std::vector<Index>& labels, const SequenceLayout& layout,
                                                Index ignore_index) const {
  layout.validate("SoftPrompt", this->name(), static_cast<Index>(labels.size()));
  const Index n = num_virtual_tokens();
  const Index seq = layout.seq;
  std::vector<Index> out(static_cast<std::size_t>(layout.batch * (n + seq)), ignore_index);
  const auto src = labels.begin();
  const auto dst = out.begin();
  for (Index b = 0; b < layout.batch; ++b)  // each sequence's labels shift right by n
    std::copy_n(src + b * seq, seq, dst + b * (n + seq) + n);
  return out;
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class SoftPrompt<float>;
extern template class SoftPrompt<double>;
}  // namespace peft
#endif
