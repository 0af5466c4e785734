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

}  // namespace peft
