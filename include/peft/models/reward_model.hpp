#pragma once
// A reward model for preference tuning: a Llama-family backbone (models/llama.hpp's LlamaModel,
// without the LM head) and a scalar head read at each sequence's last non-padding token, as
// transformers' LlamaForSequenceClassification with num_labels = 1 (score: Linear(d, 1, bias=False),
// pooled at the last non-padding position):
//   r_b = h_{b, L_b − 1} · w        h = backbone(ids) [B·S, d],  L_b the length of sequence b
//   backward: dw += Σ_b g_b h_{b, L_b − 1},  ∂L/∂h_{b, L_b − 1} = g_b w (0 on every other row)
// Trained on (chosen, rejected) pairs with loss/bradley_terry.hpp (Ouyang et al., 2022, eq. 1):
// rewards of the N chosen sequences first, then of the N rejected ones. The head is an
// AdaptedLinear host like every backbone linear, so the backbone can carry LoRA (apply_method with
// target_modules naming the backbone's linears) while the head trains in full.
//
// Reward normalisation (as RLHF pipelines do before PPO, e.g. Ouyang et al. 2022, §C.4: the reward
// model's output is shifted so that the SFT model's answers score 0 on average): RewardNormalization
// holds the mean μ and standard deviation σ of the raw rewards over a reference set
// (reward_normalization, e.g. the SFT model's samples), applied at score time as (r − μ) / σ;
// score_sequences scores token sequences in right-padded batches. io/reward_model.hpp saves and
// loads a reward model with its statistics.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/sequence.hpp"
#include "peft/core/types.hpp"
#include "peft/layers/adapted_linear.hpp"
#include "peft/models/llama.hpp"

namespace peft {

template <class T>
class LlamaRewardModel : public Module<T> {
 public:
  struct Cache {
    typename LlamaModel<T>::Cache model;
    typename AdaptedLinear<T>::Cache head;
    Matrix<T> hidden;        ///< backbone output [B·S, d]
    std::vector<Index> row;  ///< the pooled row of each sequence
  };

  LlamaRewardModel() = default;

  /// The backbone of a causal LM (e.g. the SFT model's `model`, moved in) and a fresh score head,
  /// N(0, initializer_range²) and trainable; the backbone's parameters keep their flags.
  LlamaRewardModel(const LlamaConfig& config, LlamaModel<T> backbone, Rng& rng)
      : model(std::move(backbone)), config_(config) {
    config.validate();
    score = detail::llama_linear<T>(config.hidden_size, 1, false, 0x5c0eULL);
    init::normal<T>(score.weight.value, rng, 0.0, config.initializer_range);
    score.weight.set_trainable(true);
    rope_ = RotaryEmbedding<T>(config.rope, config.resolved_head_dim());
    this->set_name(this->name());
  }

  LlamaModel<T> model;
  AdaptedLinear<T> score;  ///< [1, d]

  const LlamaConfig& config() const { return config_; }

  /// ids [B·S] laid out by `layout` → rewards [B, 1] (resized only when its shape differs).
  void forward(const std::vector<Index>& ids, const SequenceLayout& layout, Matrix<T>& rewards, Cache& cache) {
    layout.validate("LlamaRewardModel", this->name(), static_cast<Index>(ids.size()));
    rope_.reserve(layout.seq);
    model.forward(ids, layout, rope_, cache.hidden, cache.model);
    const Index B = layout.batch;
    cache.row.resize(static_cast<std::size_t>(B));
    if (pooled_.rows() != B || pooled_.cols() != cache.hidden.cols()) pooled_.resize(B, cache.hidden.cols());
    for (Index b = 0; b < B; ++b) {
      const Index r = layout.row(b, layout.length(b) - 1);  // the last non-padding token
      cache.row[static_cast<std::size_t>(b)] = r;
      pooled_.row(b) = cache.hidden.row(r);
    }
    score.forward(pooled_, rewards, cache.head);  // r = h_last wᵀ   [B, 1]
  }

  /// drewards [B, 1] → every trainable gradient (+=).
  void backward(const Cache& cache, const ConstMatrixRef<T>& drewards) {
    const Index B = static_cast<Index>(cache.row.size());
    check::shape("LlamaRewardModel", this->name(), "rewards gradient", drewards.rows(), drewards.cols(), B, 1);
    score.backward(cache.head, drewards, &dpooled_);  // dh_last = g w   [B, d]
    if (dhidden_.rows() != cache.hidden.rows() || dhidden_.cols() != cache.hidden.cols())
      dhidden_.resize(cache.hidden.rows(), cache.hidden.cols());
    dhidden_.setZero();
    for (Index b = 0; b < B; ++b) dhidden_.row(cache.row[static_cast<std::size_t>(b)]) += dpooled_.row(b);
    model.backward(cache.model, rope_, dhidden_);
  }

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("model", model);
    fn("score", score);
  }

 private:
  LlamaConfig config_;
  RotaryEmbedding<T> rope_;
  Matrix<T> pooled_, dpooled_, dhidden_;
};

/// Mean and standard deviation of raw rewards over a reference set; apply() maps r to (r − μ) / σ.
/// The default (μ 0, σ 1, count 0) is the identity.
struct RewardNormalization {
  double mean = 0.0;
  double std = 1.0;
  std::int64_t count = 0;  ///< rewards the statistics were computed over (0: none, the identity)

  /// ConfigError naming `who` unless μ is finite and σ finite and > 0.
  void validate(const std::string& who) const {
    if (!std::isfinite(mean) || !std::isfinite(std) || !(std > 0.0) || count < 0)
      throw ConfigError(who +
                        ": reward normalisation needs a finite mean and a finite std > 0 (and count >= 0), got "
                        "mean " +
                        std::to_string(mean) + ", std " + std::to_string(std) + ", count " + std::to_string(count));
  }

  /// rewards ← (rewards − μ) / σ, element by element, in double then rounded to T.
  template <class T>
  void apply(MatrixRef<T> rewards) const {
    for (Index i = 0; i < rewards.rows(); ++i)
      for (Index j = 0; j < rewards.cols(); ++j)
        rewards(i, j) = static_cast<T>((static_cast<double>(rewards(i, j)) - mean) / std);
  }
};

/// μ and σ (population standard deviation, two passes in double) of raw rewards [n, 1].
/// NumericError for a non-finite reward or σ = 0 (every reward equal: nothing to normalise by);
/// ShapeError for an empty or non-column input.
template <class T>
RewardNormalization reward_normalization(const ConstMatrixRef<T>& raw) {
  if (raw.cols() != 1 || raw.rows() < 1)
    throw ShapeError("reward_normalization: raw rewards of shape " + shape_str(raw.rows(), raw.cols()) +
                     ", expected [n, 1] with n >= 1");
  double sum = 0.0;
  for (Index i = 0; i < raw.rows(); ++i) {
    const double r = static_cast<double>(raw(i, 0));
    if (!std::isfinite(r))
      throw NumericError("reward_normalization: raw reward " + std::to_string(i) + " is not finite");
    sum += r;
  }
  RewardNormalization n;
  n.count = static_cast<std::int64_t>(raw.rows());
  n.mean = sum / static_cast<double>(raw.rows());
  double sq = 0.0;
  for (Index i = 0; i < raw.rows(); ++i) {
    const double d = static_cast<double>(raw(i, 0)) - n.mean;
    sq += d * d;
  }
  n.std = std::sqrt(sq / static_cast<double>(raw.rows()));
  if (!(n.std > 0.0))
    throw NumericError("reward_normalization: the " + std::to_string(raw.rows()) +
                       " raw rewards are all equal (std 0); nothing to normalise by");
  return n;
}

/// Raw rewards [n, 1] of token sequences (each non-empty), scored in right-padded batches of at
/// most `batch` sequences (padding id `pad_id`). The same sequences and batch give the same bits.
template <class T>
void score_sequences(LlamaRewardModel<T>& rm, const std::vector<std::vector<Index>>& sequences, Matrix<T>& rewards,
                     Index batch = 16, Index pad_id = 0) {
  if (batch < 1) throw ConfigError("score_sequences: batch must be >= 1, got " + std::to_string(batch));
  const Index n = static_cast<Index>(sequences.size());
  rewards.resize(n, 1);
  typename LlamaRewardModel<T>::Cache cache;
  Matrix<T> r;
  std::vector<Index> ids, lengths;
  for (Index b0 = 0; b0 < n; b0 += batch) {
    const Index B = std::min(batch, n - b0);
    lengths.clear();
    Index S = 0;
    for (Index b = 0; b < B; ++b) {
      const auto& seq = sequences[static_cast<std::size_t>(b0 + b)];
      if (seq.empty())
        throw ShapeError("score_sequences: sequence " + std::to_string(b0 + b) +
                         " is empty (a reward is read at "
                         "its last token)");
      lengths.push_back(static_cast<Index>(seq.size()));
      S = std::max(S, static_cast<Index>(seq.size()));
    }
    ids.assign(static_cast<std::size_t>(B * S), pad_id);
    for (Index b = 0; b < B; ++b) {
      const auto& seq = sequences[static_cast<std::size_t>(b0 + b)];
      std::copy(seq.begin(), seq.end(), ids.begin() + b * S);
    }
    rm.forward(ids, SequenceLayout(B, S, lengths), r, cache);
    rewards.middleRows(b0, B) = r;
  }
}

/// The statistics of `rm`'s raw rewards over `sequences` (score_sequences, then the function above).
template <class T>
RewardNormalization reward_normalization(LlamaRewardModel<T>& rm, const std::vector<std::vector<Index>>& sequences,
                                         Index batch = 16, Index pad_id = 0) {
  Matrix<T> raw;
  score_sequences<T>(rm, sequences, raw, batch, pad_id);
  return reward_normalization<T>(raw);
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class LlamaRewardModel<float>;
extern template class LlamaRewardModel<double>;
}  // namespace peft
#endif
