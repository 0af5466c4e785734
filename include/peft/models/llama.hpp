#pragma once
// Llama-family causal language models (Llama 2 / 3, Mistral, Qwen2, SmolLM, TinyLlama: one
// architecture), with the module names of a Hugging Face checkpoint so that PEFT's target_modules
// and adapter keys mean what they mean there:
//
//   model.embed_tokens                     Embedding [vocab, d]
//   model.layers.N.input_layernorm         RMSNorm
//   model.layers.N.self_attn.{q,k,v,o}_proj   AdaptedLinear (q [H·hd, d], k / v [KV·hd, d], o [d, H·hd])
//   model.layers.N.post_attention_layernorm RMSNorm
//   model.layers.N.mlp.{gate,up,down}_proj AdaptedLinear
//   model.norm                             RMSNorm
//   lm_head                                AdaptedLinear [vocab, d]; absent with tie_word_embeddings
//                                          (logits = h Eᵀ with the embedding table itself)
//
// Per block (pre-norm, residual):  h = x + Attn(RMSNorm₁(x));  y = h + MLP(RMSNorm₂(h))
//   Attn: Q = q_proj(u), K = k_proj(u), V = v_proj(u) (biases: Qwen2 always on q/k/v, Llama's
//         attention_bias on q/k/v/o); RoPE on Q and K per head (layers/rotary.hpp, position t of
//         each sequence = t); grouped-query attention: query head h reads kv head h / (H / KV)
//         (HF's repeat_kv); A = softmax(Q_h K_gᵀ / √hd + causal mask); C_h = A V_g; y = o_proj(C).
//   MLP:  down_proj(silu(gate_proj(v)) ⊙ up_proj(v))   (SwiGLU; mlp_bias on all three)
//
// Right padding (SequenceLayout lengths): query t of sequence b sees keys t' ≤ t, all valid. The
// attention output of a padding row is exactly 0 and backward drops dy on those rows; the other
// per-row layers just process padding rows, which never reach a valid row. So valid rows' logits
// equal Hugging Face's with attention_mask; padding rows' logits are not HF's (nor meaningful).
//
// Backward: exact, by hand, every step commented. Attention keeps each row's softmax max and
// normaliser and recomputes the probabilities in backward (as layers/attention.hpp), so memory is
// one [S, S] block at a time. Frozen parameters cost no weight-gradient GEMM; the input gradient of
// the lowest block is computed only when the embedding table (or something below) trains.
// After the first call with given shapes, forward + backward allocate nothing.
#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/module.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/sequence.hpp"
#include "peft/layers/adapted_linear.hpp"
#include "peft/layers/embedding.hpp"
#include "peft/layers/rms_norm.hpp"
#include "peft/layers/rotary.hpp"

namespace peft {

/// The architecture's hyper-parameters (config.json: io/llama_checkpoint.hpp reads them).
struct LlamaConfig {
  std::string model_type = "llama";  ///< llama, mistral, qwen2
  Index vocab_size = 0;
  Index hidden_size = 0;
  Index intermediate_size = 0;
  Index num_hidden_layers = 0;
  Index num_attention_heads = 0;
  Index num_key_value_heads = 0;  ///< 0: num_attention_heads
  Index head_dim = 0;             ///< 0: hidden_size / num_attention_heads
  double rms_norm_eps = 1e-6;
  RopeConfig rope;
  Index max_position_embeddings = 2048;
  bool qkv_bias = false;  ///< biases on q/k/v (Qwen2; Llama's attention_bias)
  bool o_bias = false;    ///< bias on o_proj (Llama's attention_bias)
  bool mlp_bias = false;  ///< biases on gate/up/down (Llama's mlp_bias)
  bool tie_word_embeddings = false;
  Index sliding_window = 0;  ///< > 0: Mistral's window; a longer sequence is refused (not implemented)
  double initializer_range = 0.02;

  Index kv_heads() const { return num_key_value_heads > 0 ? num_key_value_heads : num_attention_heads; }
  Index resolved_head_dim() const {
    return head_dim > 0 ? head_dim : (num_attention_heads > 0 ? hidden_size / num_attention_heads : 0);
  }

  /// Largest accepted size of any one dimension (a config is input: sizes are bounded before any
  /// allocation; the largest real checkpoints are far below).
  static constexpr Index kMaxDimension = Index(1) << 24;

  /// ConfigError naming the first invalid field.
  void validate() const {
    const std::string who = "LlamaConfig";
    auto pos = [&](const char* key, Index v) {
      if (v <= 0 || v > kMaxDimension)
        throw ConfigError(who + ": " + key + " must be in [1, kMaxDimension = " + std::to_string(kMaxDimension) +
                          "], got " + std::to_string(v));
    };
    pos("vocab_size", vocab_size);
    pos("hidden_size", hidden_size);
    pos("intermediate_size", intermediate_size);
    pos("num_hidden_layers", num_hidden_layers);
    pos("num_attention_heads", num_attention_heads);
    pos("num_key_value_heads", kv_heads());
    if (head_dim != 0) pos("head_dim", head_dim);
    if (sliding_window < 0) throw ConfigError(who + ": sliding_window must be >= 0");
    if (num_attention_heads % kv_heads() != 0)
      throw ConfigError(who + ": num_attention_heads " + std::to_string(num_attention_heads) +
                        " is not a multiple of num_key_value_heads " + std::to_string(kv_heads()));
    if (head_dim <= 0 && hidden_size % num_attention_heads != 0)
      throw ConfigError(who + ": hidden_size " + std::to_string(hidden_size) + " is not divisible by " +
                        "num_attention_heads " + std::to_string(num_attention_heads) + " (and head_dim is not set)");
    if (resolved_head_dim() % 2 != 0)
      throw ConfigError(who + ": head_dim must be even for rotary embeddings, got " +
                        std::to_string(resolved_head_dim()));
    if (!(rms_norm_eps > 0.0)) throw ConfigError(who + ": rms_norm_eps must be > 0");
    (void)rope_inverse_frequencies(rope, resolved_head_dim());  // rope_type and its parameters
  }
};

namespace detail {
/// A frozen adapted linear of the given shape, weights zero (filled by a loader or an init).
template <class T>
AdaptedLinear<T> llama_linear(Index in, Index out, bool bias, std::uint64_t seed) {
  Linear<T> base;
  base.weight = Parameter<T>(out, in, false);
  if (bias) base.bias = Parameter<T>(1, out, false, true);
  return AdaptedLinear<T>(std::move(base), "", seed);
}
}  // namespace detail

/// Keys (rotated) and values of the positions generated so far, per layer, for one sequence
/// (LlamaForCausalLM::make_kv_cache / forward_cached). Filled up to `length` of `capacity` rows.
template <class T>
struct LlamaKVCache {
  std::vector<Matrix<T>> k, v;  ///< per layer [capacity, KV·hd]
  Index length = 0;
  Index capacity() const { return k.empty() ? 0 : k.front().rows(); }
  void reset() { length = 0; }
};

// ------------------------------------------------------------------------------------------------
// Grouped-query self-attention with rotary embeddings.
// ------------------------------------------------------------------------------------------------
template <class T>
class LlamaAttention : public Module<T> {
 public:
  using LinearCache = typename AdaptedLinear<T>::Cache;

  /// What backward needs. Q and K are stored rotated; the softmax statistics of query t of (b, h)
  /// are entry (b·H + h)·S + t of row_max / row_sum (padding queries: 0).
  struct Cache {
    SequenceLayout layout;
    LinearCache q, k, v, o;
    Matrix<T> Q, K, V;  ///< [B·S, H·hd], [B·S, KV·hd] ×2
    ColVector<T> row_max, row_sum;
  };

  LlamaAttention() = default;
  LlamaAttention(const LlamaConfig& c, std::uint64_t seed)
      : num_heads_(c.num_attention_heads), num_kv_heads_(c.kv_heads()), head_dim_(c.resolved_head_dim()) {
    const Index d = c.hidden_size, hd = head_dim_;
    q_proj = detail::llama_linear<T>(d, num_heads_ * hd, c.qkv_bias, seed + 1);
    k_proj = detail::llama_linear<T>(d, num_kv_heads_ * hd, c.qkv_bias, seed + 2);
    v_proj = detail::llama_linear<T>(d, num_kv_heads_ * hd, c.qkv_bias, seed + 3);
    o_proj = detail::llama_linear<T>(num_heads_ * hd, d, c.o_bias, seed + 4);
  }

  AdaptedLinear<T> q_proj, k_proj, v_proj, o_proj;

  Index num_heads() const { return num_heads_; }
  Index num_kv_heads() const { return num_kv_heads_; }
  Index head_dim() const { return head_dim_; }
  Index dim() const { return q_proj.in_features(); }

  /// x [B·S, d] laid out by `layout`; rope must cover S positions (RotaryEmbedding::reserve).
  void forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, const RotaryEmbedding<T>& rope, Matrix<T>& y,
               Cache& cache);
  /// Accumulates trainable gradients; writes dx [B·S, d] unless null.
  void backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dy, Matrix<T>* dx);

  /// Inference on m new rows x [m, d] of one sequence at positions n .. n + m − 1 (n = rows already
  /// in k_cache / v_cache [capacity, KV·hd], which receive the new keys and values): causal
  /// attention over positions 0 .. n + r. Keeps nothing for backward.
  void forward_cached(const ConstMatrixRef<T>& x, Index n, const RotaryEmbedding<T>& rope, Matrix<T>& k_cache,
                      Matrix<T>& v_cache, Matrix<T>& y);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("q_proj", q_proj);
    fn("k_proj", k_proj);
    fn("v_proj", v_proj);
    fn("o_proj", o_proj);
  }

 private:
  /// P = softmax-ready scaled scores Q_{b,h} K_{b,g}ᵀ / √hd [L, L] (masked entries 0).
  void scaled_scores(const Cache& cache, Index b, Index h, Eigen::Block<Matrix<T>> P) const;

  Index num_heads_ = 1, num_kv_heads_ = 1, head_dim_ = 2;
  Matrix<T> q_inf_, k_inf_, v_inf_;  // forward_cached scratch
  RowVector<T> p_inf_;
  Matrix<T> context_, dy_, dcontext_, dQ_, dK_, dV_, scores_, dprobs_, dx_part_;
};

// ------------------------------------------------------------------------------------------------
// SwiGLU MLP.
// ------------------------------------------------------------------------------------------------
template <class T>
class LlamaMLP : public Module<T> {
 public:
  using LinearCache = typename AdaptedLinear<T>::Cache;
  /// What backward needs: the linears' caches and the two pre-activations.
  struct Cache {
    LinearCache gate, up, down;
    Matrix<T> g, u;  ///< gate_proj(x), up_proj(x)   [rows, I]
  };

  LlamaMLP() = default;
  LlamaMLP(const LlamaConfig& c, std::uint64_t seed) {
    gate_proj = detail::llama_linear<T>(c.hidden_size, c.intermediate_size, c.mlp_bias, seed + 5);
    up_proj = detail::llama_linear<T>(c.hidden_size, c.intermediate_size, c.mlp_bias, seed + 6);
    down_proj = detail::llama_linear<T>(c.intermediate_size, c.hidden_size, c.mlp_bias, seed + 7);
  }

  AdaptedLinear<T> gate_proj, up_proj, down_proj;

  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache);
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx);
  /// Inference: keeps nothing for backward.
  void forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("gate_proj", gate_proj);
    fn("up_proj", up_proj);
    fn("down_proj", down_proj);
  }

 private:
  Matrix<T> h_, dh_, dg_, du_, dx_part_, g_inf_, u_inf_;
};

// ------------------------------------------------------------------------------------------------
// One decoder block.
// ------------------------------------------------------------------------------------------------
template <class T>
class LlamaDecoderLayer : public Module<T> {
 public:
  struct Cache {
    typename RMSNorm<T>::Cache norm1, norm2;
    typename LlamaAttention<T>::Cache attn;
    typename LlamaMLP<T>::Cache mlp;
  };

  LlamaDecoderLayer() = default;
  LlamaDecoderLayer(const LlamaConfig& c, std::uint64_t seed)
      : input_layernorm(c.hidden_size, c.rms_norm_eps),
        self_attn(c, seed),
        post_attention_layernorm(c.hidden_size, c.rms_norm_eps),
        mlp(c, seed) {
    input_layernorm.weight.set_trainable(false);
    post_attention_layernorm.weight.set_trainable(false);
  }

  RMSNorm<T> input_layernorm;
  LlamaAttention<T> self_attn;
  RMSNorm<T> post_attention_layernorm;
  LlamaMLP<T> mlp;

  /// `y` must not share storage with `x`.
  void forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, const RotaryEmbedding<T>& rope, Matrix<T>& y,
               Cache& cache);
  /// dx written unless null (then the attention's input gradient is skipped unless norm1 trains).
  void backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dy, Matrix<T>* dx);
  /// Inference on m new rows of one sequence (see LlamaAttention::forward_cached).
  void forward_cached(const ConstMatrixRef<T>& x, Index n, const RotaryEmbedding<T>& rope, Matrix<T>& k_cache,
                      Matrix<T>& v_cache, Matrix<T>& y);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("input_layernorm", input_layernorm);
    fn("self_attn", self_attn);
    fn("post_attention_layernorm", post_attention_layernorm);
    fn("mlp", mlp);
  }

 private:
  Matrix<T> u_, a_, v_, f_, dh_, dv_, du_, dtmp_;
  typename RMSNorm<T>::Cache norm_inf_;
};

// ------------------------------------------------------------------------------------------------
// The decoder stack (HF's LlamaModel: `model.*`).
// ------------------------------------------------------------------------------------------------
template <class T>
class LlamaModel : public Module<T> {
 public:
  struct Cache {
    typename Embedding<T>::Cache embed;
    std::vector<typename LlamaDecoderLayer<T>::Cache> layers;
    typename RMSNorm<T>::Cache norm;
    SequenceLayout layout;
  };

  LlamaModel() = default;
  explicit LlamaModel(const LlamaConfig& c) : norm(c.hidden_size, c.rms_norm_eps) {
    embed_tokens.weight = Parameter<T>(c.vocab_size, c.hidden_size, false);
    embed_tokens.weight.value.setZero();
    for (Index i = 0; i < c.num_hidden_layers; ++i)
      layers.emplace_back(c, 0x11a3a000ULL + 16ULL * static_cast<std::uint64_t>(i));
    norm.weight.set_trainable(false);
  }

  Embedding<T> embed_tokens;
  std::vector<LlamaDecoderLayer<T>> layers;
  RMSNorm<T> norm;

  /// ids [B·S] → final hidden states [B·S, d] (after `norm`).
  void forward(const std::vector<Index>& ids, const SequenceLayout& layout, const RotaryEmbedding<T>& rope,
               Matrix<T>& hidden, Cache& cache);
  /// dhidden [B·S, d] → every trainable gradient (embedding table included).
  void backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dhidden);
  /// Inference on m new tokens of one sequence: hidden [m, d]; appends to `kv`.
  void forward_cached(const std::vector<Index>& ids, const RotaryEmbedding<T>& rope, LlamaKVCache<T>& kv,
                      Matrix<T>& hidden);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("embed_tokens", embed_tokens);
    for (std::size_t i = 0; i < layers.size(); ++i) fn("layers." + std::to_string(i), layers[i]);
    fn("norm", norm);
  }

 private:
  bool below_trainable() const;
  Matrix<T> x_, y_, da_, db_;
  typename Embedding<T>::Cache embed_inf_;
  typename RMSNorm<T>::Cache norm_inf_;
};

// ------------------------------------------------------------------------------------------------
// The causal LM (HF's LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM).
// ------------------------------------------------------------------------------------------------
template <class T>
class LlamaForCausalLM : public Module<T> {
 public:
  struct Cache {
    typename LlamaModel<T>::Cache model;
    typename AdaptedLinear<T>::Cache head;
    Matrix<T> hidden;  ///< final hidden states [B·S, d] (kept for the tied head's gradient)
  };

  LlamaForCausalLM() = default;

  /// Weights allocated, zero and frozen (a loader fills them: io/llama_checkpoint.hpp).
  explicit LlamaForCausalLM(const LlamaConfig& config) : config_(config) {
    config.validate();
    model = LlamaModel<T>(config);
    if (!config.tie_word_embeddings)
      lm_head = detail::llama_linear<T>(config.hidden_size, config.vocab_size, false, 0x1e4dULL);
    rope_ = RotaryEmbedding<T>(config.rope, config.resolved_head_dim());
    this->set_name(this->name());
  }

  /// Hugging Face's init (_init_weights): linears and embeddings N(0, initializer_range²), biases
  /// 0, norms 1; every parameter trainable.
  LlamaForCausalLM(const LlamaConfig& config, Rng& rng) : LlamaForCausalLM(config) {
    this->visit_parameters([&](const std::string& n, Parameter<T>& p) {
      const bool is_norm = n.size() >= 13 && n.find("norm.weight") != std::string::npos;
      const bool is_bias = n.size() >= 5 && n.compare(n.size() - 5, 5, ".bias") == 0;
      if (is_norm)
        p.value.setOnes();
      else if (is_bias)
        p.value.setZero();
      else
        init::normal<T>(p.value, rng, 0.0, config.initializer_range);
      p.set_trainable(true);
    });
  }

  LlamaModel<T> model;
  AdaptedLinear<T> lm_head;  ///< empty when tied

  const LlamaConfig& config() const { return config_; }
  bool tied() const { return config_.tie_word_embeddings; }
  Index vocab_size() const { return config_.vocab_size; }
  RotaryEmbedding<T>& rotary() { return rope_; }

  /// Freezes every parameter (get_peft_model's first step); adapters added later train.
  void freeze_all() {
    this->visit_parameters([](const std::string&, Parameter<T>& p) { p.set_trainable(false); });
  }

  /// Dotted names of every linear with whether "all-linear" selects it (lm_head: no).
  std::vector<std::pair<std::string, bool>> linear_names();

  /// ids [B·S] laid out by `layout` (padding ids must be valid ids, e.g. 0) → logits [B·S, vocab].
  void forward(const std::vector<Index>& ids, const SequenceLayout& layout, Matrix<T>& logits, Cache& cache);
  Matrix<T> forward(const std::vector<Index>& ids, const SequenceLayout& layout, Cache& cache) {
    Matrix<T> logits;
    forward(ids, layout, logits, cache);
    return logits;
  }
  /// dlogits [B·S, vocab] → every trainable gradient (+=).
  void backward(const Cache& cache, const ConstMatrixRef<T>& dlogits);

  // ---- inference with a KV cache (one sequence; models/generation.hpp samples from it) ---------

  /// A KV cache for up to `capacity` positions.
  LlamaKVCache<T> make_kv_cache(Index capacity) const;
  /// Appends `ids` (m ≥ 1 tokens) to the sequence held by `kv` and writes their logits [m, vocab]
  /// (row r: the distribution of the token after ids[r]). Adapters apply as in forward (active,
  /// disabled or merged); dropout is off whatever the mode. Keeps nothing for backward.
  void forward_cached(const std::vector<Index>& ids, LlamaKVCache<T>& kv, Matrix<T>& logits);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("model", model);
    if (!tied()) fn("lm_head", lm_head);
  }

 private:
  LlamaConfig config_;
  RotaryEmbedding<T> rope_;
  Matrix<T> dhidden_, hidden_inf_;
};

// ---- members defined outside the class bodies (the test build's extern template declaration then
// covers them; see docs/CONTRIBUTING.md) ----

template <class T>
void LlamaAttention<T>::scaled_scores(const Cache& cache, Index b, Index h, Eigen::Block<Matrix<T>> P) const {
  const Index S = cache.layout.seq, hd = head_dim_, L = P.rows(), g = h / (num_heads_ / num_kv_heads_);
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  P.noalias() = cache.Q.block(b * S, h * hd, L, hd) * cache.K.block(b * S, g * hd, L, hd).transpose();  // Q Kᵀ
  for (Index t = 0; t < L; ++t) {
    P.row(t).head(t + 1) *= scale;                      // causal: keys t' ≤ t
    if (t + 1 < L) P.row(t).tail(L - t - 1).setZero();  // masked
  }
}

template <class T>
void LlamaAttention<T>::forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout,
                                const RotaryEmbedding<T>& rope, Matrix<T>& y, Cache& cache) {
  layout.validate("LlamaAttention", this->name(), x.rows());
  check::input_features("LlamaAttention", this->name(), x.cols(), dim());
  const Index H = num_heads_, KV = num_kv_heads_, hd = head_dim_, B = layout.batch, S = layout.seq;
  if (rope.positions() < S || rope.head_dim() != hd)
    throw ConfigError(describe("LlamaAttention", this->name()) + ": rotary tables cover " +
                      std::to_string(rope.positions()) + " positions of head_dim " + std::to_string(rope.head_dim()) +
                      ", need " + std::to_string(S) + " of " + std::to_string(hd));
  cache.layout = layout;
  q_proj.forward(x, cache.Q, cache.q);  // Q = x W_qᵀ (+ b_q) (+ adapters)   [B·S, H·hd]
  k_proj.forward(x, cache.K, cache.k);  // K   [B·S, KV·hd]
  v_proj.forward(x, cache.V, cache.v);  // V   [B·S, KV·hd]
  for (Index b = 0; b < B; ++b) {       // RoPE on valid rows: position t of sequence b is t
    const Index Lb = layout.length(b);
    for (Index h = 0; h < H; ++h) rope.rotate(cache.Q.block(b * S, h * hd, Lb, hd), 0);
    for (Index g = 0; g < KV; ++g) rope.rotate(cache.K.block(b * S, g * hd, Lb, hd), 0);
  }
  cache.row_max.setZero(B * H * S);
  cache.row_sum.setZero(B * H * S);
  context_.setZero(B * S, H * hd);  // padding query rows stay 0
  if (scores_.rows() < S || scores_.cols() < S) scores_.resize(S, S);
  const Index rep = H / KV;
  for (Index b = 0; b < B; ++b) {
    const Index Lb = layout.length(b);
    for (Index h = 0; h < H; ++h) {
      auto P = scores_.topLeftCorner(Lb, Lb);
      scaled_scores(cache, b, h, P);
      const Index first = (b * H + h) * S;
      for (Index t = 0; t < Lb; ++t) {
        auto row = P.row(t).head(t + 1);
        const T m = row.maxCoeff();
        row.array() = (row.array() - m).exp();  // exp(s − max s) ≤ 1
        const T z = row.sum();
        row /= z;
        cache.row_max(first + t) = m;
        cache.row_sum(first + t) = z;
      }
      context_.block(b * S, h * hd, Lb, hd).noalias() = P * cache.V.block(b * S, (h / rep) * hd, Lb, hd);  // A V_g
    }
  }
  o_proj.forward(context_, y, cache.o);  // y = C W_oᵀ (+ b_o)   [B·S, d]
  for (Index b = 0; b < B; ++b)          // padding rows: exactly 0
    if (layout.length(b) < S) y.middleRows(b * S + layout.length(b), S - layout.length(b)).setZero();
}

template <class T>
void LlamaAttention<T>::backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dy,
                                 Matrix<T>* dx) {
  const SequenceLayout& layout = cache.layout;
  const Index H = num_heads_, KV = num_kv_heads_, hd = head_dim_, B = layout.batch, S = layout.seq, rep = H / KV;
  check::shape("LlamaAttention", this->name(), "output gradient", dy.rows(), dy.cols(), B * S, dim());
  if (layout.padded()) {  // padding rows of y are constant 0: their gradient is dropped
    dy_ = dy;
    for (Index b = 0; b < B; ++b)
      if (layout.length(b) < S) dy_.middleRows(b * S + layout.length(b), S - layout.length(b)).setZero();
    o_proj.backward(cache.o, dy_, &dcontext_);  // dC = dY W_o   [B·S, H·hd]
  } else {
    o_proj.backward(cache.o, dy, &dcontext_);
  }
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  dQ_.setZero(B * S, H * hd);
  dK_.setZero(B * S, KV * hd);
  dV_.setZero(B * S, KV * hd);
  if (scores_.rows() < S || scores_.cols() < S) scores_.resize(S, S);
  if (dprobs_.rows() < S || dprobs_.cols() < S) dprobs_.resize(S, S);
  for (Index b = 0; b < B; ++b) {
    const Index Lb = layout.length(b);
    for (Index h = 0; h < H; ++h) {
      const Index g = h / rep;
      auto P = scores_.topLeftCorner(Lb, Lb);  // A recomputed exactly as forward left it
      scaled_scores(cache, b, h, P);
      const Index first = (b * H + h) * S;
      for (Index t = 0; t < Lb; ++t) {
        auto row = P.row(t).head(t + 1);
        row.array() = (row.array() - cache.row_max(first + t)).exp();
        row /= cache.row_sum(first + t);
      }
      const auto G = dcontext_.block(b * S, h * hd, Lb, hd);
      auto dS = dprobs_.topLeftCorner(Lb, Lb);
      dV_.block(b * S, g * hd, Lb, hd).noalias() += P.transpose() * G;      // dV_g += Aᵀ G   [L, hd]
      dS.noalias() = G * cache.V.block(b * S, g * hd, Lb, hd).transpose();  // dA = G V_gᵀ   [L, L]
      for (Index t = 0; t < Lb; ++t) {  // softmax: dS = A ⊙ (dA − Σ A ⊙ dA) / √hd
        const T dot = (P.row(t).array() * dS.row(t).array()).sum();
        dS.row(t).array() = scale * P.row(t).array() * (dS.row(t).array() - dot);
      }
      dQ_.block(b * S, h * hd, Lb, hd).noalias() = dS * cache.K.block(b * S, g * hd, Lb, hd);  // dQ_h = dS K_g
      dK_.block(b * S, g * hd, Lb, hd).noalias() +=
          dS.transpose() * cache.Q.block(b * S, h * hd, Lb, hd);  // dK_g += dSᵀ Q_h
    }
    // RoPE backward (transpose rotation) on the valid rows: d(pre-rotation) = Rᵀ d(rotated).
    for (Index h = 0; h < H; ++h) rope.rotate(dQ_.block(b * S, h * hd, Lb, hd), 0, true);
    for (Index g = 0; g < KV; ++g) rope.rotate(dK_.block(b * S, g * hd, Lb, hd), 0, true);
  }
  q_proj.backward(cache.q, dQ_, dx);  // dx = dQ W_q + dK W_k + dV W_v
  Matrix<T>* part = dx != nullptr ? &dx_part_ : nullptr;
  k_proj.backward(cache.k, dK_, part);
  if (dx != nullptr) *dx += dx_part_;
  v_proj.backward(cache.v, dV_, part);
  if (dx != nullptr) *dx += dx_part_;
}

template <class T>
void LlamaMLP<T>::forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
  gate_proj.forward(x, cache.g, cache.gate);  // g = x W_gᵀ   [rows, I]
  up_proj.forward(x, cache.u, cache.up);      // u = x W_uᵀ   [rows, I]
  h_.resize(cache.g.rows(), cache.g.cols());
  h_.array() = cache.g.array() / (T(1) + (-cache.g.array()).exp()) * cache.u.array();  // h = silu(g) ⊙ u
  down_proj.forward(h_, y, cache.down);                                                // y = h W_dᵀ
}

template <class T>
void LlamaMLP<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
  down_proj.backward(cache.down, dy, &dh_);  // dh = dy W_d   [rows, I]
  dg_.resize(dh_.rows(), dh_.cols());
  du_.resize(dh_.rows(), dh_.cols());
  const auto& g = cache.g.array();
  dg_.array() = T(1) / (T(1) + (-g).exp());     // σ(g)
  du_.array() = dh_.array() * g * dg_.array();  // du = dh ⊙ silu(g)
  dg_.array() =
      dh_.array() * cache.u.array() * dg_.array() * (T(1) + g * (T(1) - dg_.array()));  // dg = dh ⊙ u ⊙ σ(1 + g(1 − σ))
  gate_proj.backward(cache.gate, dg_, dx);                                              // dx = dg W_g + du W_u
  up_proj.backward(cache.up, du_, dx != nullptr ? &dx_part_ : nullptr);
  if (dx != nullptr) *dx += dx_part_;
}

template <class T>
void LlamaDecoderLayer<T>::forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout,
                                   const RotaryEmbedding<T>& rope, Matrix<T>& y, Cache& cache) {
  input_layernorm.forward(x, u_, cache.norm1);           // u = RMSNorm₁(x)
  self_attn.forward(u_, layout, rope, a_, cache.attn);   // a = Attn(u)
  y = x + a_;                                            // h = x + a   (in y)
  post_attention_layernorm.forward(y, v_, cache.norm2);  // v = RMSNorm₂(h)
  mlp.forward(v_, f_, cache.mlp);                        // f = MLP(v)
  y += f_;                                               // y = h + f
}

template <class T>
void LlamaDecoderLayer<T>::backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dy,
                                    Matrix<T>* dx) {
  mlp.backward(cache.mlp, dy, &dv_);                          // dv = MLPᵀ(dy)
  post_attention_layernorm.backward(cache.norm2, dv_, &dh_);  // RMSNorm₂ᵀ(dv)
  dh_ += dy;                                                  // dh = dy + RMSNorm₂ᵀ(dv)
  const bool need_du = dx != nullptr || input_layernorm.weight.trainable();
  self_attn.backward(cache.attn, rope, dh_, need_du ? &du_ : nullptr);  // du = Attnᵀ(dh)
  if (!need_du) return;
  input_layernorm.backward(cache.norm1, du_, dx);  // dx = RMSNorm₁ᵀ(du) + dh
  if (dx != nullptr) *dx += dh_;
}

template <class T>
void LlamaModel<T>::forward(const std::vector<Index>& ids, const SequenceLayout& layout, const RotaryEmbedding<T>& rope,
                            Matrix<T>& hidden, Cache& cache) {
  layout.validate("LlamaModel", this->name(), static_cast<Index>(ids.size()));
  cache.layout = layout;
  embed_tokens.forward(ids, x_, cache.embed);  // x = E[ids]   [B·S, d]
  if (cache.layers.size() != layers.size()) cache.layers.resize(layers.size());
  Matrix<T>* cur = &x_;
  Matrix<T>* nxt = &y_;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    layers[i].forward(*cur, layout, rope, *nxt, cache.layers[i]);
    std::swap(cur, nxt);
  }
  norm.forward(*cur, hidden, cache.norm);  // final RMSNorm
}

template <class T>
bool LlamaModel<T>::below_trainable() const {
  return embed_tokens.weight.trainable();
}

template <class T>
void LlamaModel<T>::backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dhidden) {
  if (cache.layers.size() != layers.size())
    throw ConfigError(describe("LlamaModel", this->name()) + ": cache does not come from a forward of this model");
  norm.backward(cache.norm, dhidden, &da_);
  Matrix<T>* cur = &da_;
  Matrix<T>* nxt = &db_;
  const bool need_below = below_trainable();
  for (std::size_t i = layers.size(); i-- > 0;) {
    layers[i].backward(cache.layers[i], rope, *cur, (i > 0 || need_below) ? nxt : nullptr);
    std::swap(cur, nxt);
  }
  if (need_below) embed_tokens.backward(cache.embed, *cur);  // dE[id] += dx rows
}

template <class T>
std::vector<std::pair<std::string, bool>> LlamaForCausalLM<T>::linear_names() {
  std::vector<std::pair<std::string, bool>> out;
  this->visit_modules([&](const std::string& path, Module<T>& m) {
    if (dynamic_cast<AdaptedLinear<T>*>(&m) != nullptr) out.emplace_back(path, path != "lm_head");
  });
  return out;
}

template <class T>
void LlamaForCausalLM<T>::forward(const std::vector<Index>& ids, const SequenceLayout& layout, Matrix<T>& logits,
                                  Cache& cache) {
  layout.validate("LlamaForCausalLM", this->name(), static_cast<Index>(ids.size()));  // message built on failure only
  if (config_.sliding_window > 0 && layout.seq > config_.sliding_window)
    throw ConfigError(describe("LlamaForCausalLM", this->name()) + ": sequence length " + std::to_string(layout.seq) +
                      " exceeds sliding_window " + std::to_string(config_.sliding_window) +
                      " (sliding-window attention is not implemented)");
  rope_.reserve(layout.seq);
  model.forward(ids, layout, rope_, cache.hidden, cache.model);
  if (tied()) {
    logits.resize(cache.hidden.rows(), vocab_size());
    logits.noalias() = cache.hidden * model.embed_tokens.weight.value.transpose();  // logits = h Eᵀ
  } else {
    lm_head.forward(cache.hidden, logits, cache.head);  // logits = h W_headᵀ (+ adapters)
  }
}

template <class T>
void LlamaForCausalLM<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dlogits) {
  check::shape("LlamaForCausalLM", this->name(), "logits gradient", dlogits.rows(), dlogits.cols(), cache.hidden.rows(),
               vocab_size());
  if (tied()) {
    Parameter<T>& E = model.embed_tokens.weight;
    if (E.trainable()) E.accumulator().noalias() += dlogits.transpose() * cache.hidden;  // dE += dLᵀ h   [V, d]
    dhidden_.resize(dlogits.rows(), E.value.cols());
    dhidden_.noalias() = dlogits * E.value;  // dh = dL E   [B·S, d]
  } else {
    lm_head.backward(cache.head, dlogits, &dhidden_);  // dh = dL W_head
  }
  model.backward(cache.model, rope_, dhidden_);
}

template <class T>
void LlamaAttention<T>::forward_cached(const ConstMatrixRef<T>& x, Index n, const RotaryEmbedding<T>& rope,
                                       Matrix<T>& k_cache, Matrix<T>& v_cache, Matrix<T>& y) {
  const Index H = num_heads_, KV = num_kv_heads_, hd = head_dim_, m = x.rows(), rep = H / KV;
  check::input_features("LlamaAttention", this->name(), x.cols(), dim());
  if (n + m > k_cache.rows() || rope.positions() < n + m)
    throw ShapeError(describe("LlamaAttention", this->name()) + ": " + std::to_string(n) + " cached + " +
                     std::to_string(m) + " new positions exceed the KV cache capacity " +
                     std::to_string(k_cache.rows()));
  q_proj.forward_inference(x, q_inf_);  // [m, H·hd]
  k_proj.forward_inference(x, k_inf_);  // [m, KV·hd]
  v_proj.forward_inference(x, v_inf_);
  for (Index h = 0; h < H; ++h) rope.rotate(q_inf_.block(0, h * hd, m, hd), n);
  for (Index g = 0; g < KV; ++g) rope.rotate(k_inf_.block(0, g * hd, m, hd), n);
  k_cache.middleRows(n, m) = k_inf_;
  v_cache.middleRows(n, m) = v_inf_;
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  context_.resize(m, H * hd);
  if (p_inf_.size() < n + m) p_inf_.resize(n + m);
  for (Index r = 0; r < m; ++r) {
    const Index visible = n + r + 1;  // causal: positions 0 .. n + r
    for (Index h = 0; h < H; ++h) {
      const Index g = h / rep;
      auto p = p_inf_.head(visible);
      p.noalias() = q_inf_.block(r, h * hd, 1, hd) * k_cache.block(0, g * hd, visible, hd).transpose();
      p *= scale;
      const T mx = p.maxCoeff();
      p.array() = (p.array() - mx).exp();
      p /= p.sum();
      context_.block(r, h * hd, 1, hd).noalias() = p * v_cache.block(0, g * hd, visible, hd);
    }
  }
  o_proj.forward_inference(context_, y);
}

template <class T>
void LlamaMLP<T>::forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y) {
  gate_proj.forward_inference(x, g_inf_);
  up_proj.forward_inference(x, u_inf_);
  h_.resize(g_inf_.rows(), g_inf_.cols());
  h_.array() = g_inf_.array() / (T(1) + (-g_inf_.array()).exp()) * u_inf_.array();  // silu(g) ⊙ u
  down_proj.forward_inference(h_, y);
}

template <class T>
void LlamaDecoderLayer<T>::forward_cached(const ConstMatrixRef<T>& x, Index n, const RotaryEmbedding<T>& rope,
                                          Matrix<T>& k_cache, Matrix<T>& v_cache, Matrix<T>& y) {
  input_layernorm.forward(x, u_, norm_inf_);
  self_attn.forward_cached(u_, n, rope, k_cache, v_cache, a_);
  y = x + a_;
  post_attention_layernorm.forward(y, v_, norm_inf_);
  mlp.forward_inference(v_, f_);
  y += f_;
}

template <class T>
void LlamaModel<T>::forward_cached(const std::vector<Index>& ids, const RotaryEmbedding<T>& rope, LlamaKVCache<T>& kv,
                                   Matrix<T>& hidden) {
  if (kv.k.size() != layers.size() || kv.v.size() != layers.size())
    throw ConfigError(describe("LlamaModel", this->name()) + ": KV cache has " + std::to_string(kv.k.size()) +
                      " layers, the model " + std::to_string(layers.size()) + " (use make_kv_cache)");
  embed_tokens.forward(ids, x_, embed_inf_);
  Matrix<T>* cur = &x_;
  Matrix<T>* nxt = &y_;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    layers[i].forward_cached(*cur, kv.length, rope, kv.k[i], kv.v[i], *nxt);
    std::swap(cur, nxt);
  }
  norm.forward(*cur, hidden, norm_inf_);
  kv.length += static_cast<Index>(ids.size());
}

template <class T>
LlamaKVCache<T> LlamaForCausalLM<T>::make_kv_cache(Index capacity) const {
  if (capacity <= 0) throw ConfigError("make_kv_cache: capacity must be > 0, got " + std::to_string(capacity));
  LlamaKVCache<T> kv;
  const Index w = config_.kv_heads() * config_.resolved_head_dim();
  for (std::size_t i = 0; i < model.layers.size(); ++i) {
    kv.k.emplace_back(capacity, w);
    kv.v.emplace_back(capacity, w);
  }
  return kv;
}

template <class T>
void LlamaForCausalLM<T>::forward_cached(const std::vector<Index>& ids, LlamaKVCache<T>& kv, Matrix<T>& logits) {
  const std::string who = describe("LlamaForCausalLM", this->name());
  if (ids.empty()) throw ShapeError(who + ": forward_cached needs at least one token");
  const Index end = kv.length + static_cast<Index>(ids.size());
  if (end > kv.capacity())
    throw ShapeError(who + ": " + std::to_string(end) + " positions exceed the KV cache capacity " +
                     std::to_string(kv.capacity()));
  if (config_.sliding_window > 0 && end > config_.sliding_window)
    throw ConfigError(who + ": sequence length " + std::to_string(end) + " exceeds sliding_window " +
                      std::to_string(config_.sliding_window) + " (sliding-window attention is not implemented)");
  const bool was_training = this->training();
  if (was_training) this->eval();  // no dropout in inference
  rope_.reserve(end);
  try {
    model.forward_cached(ids, rope_, kv, hidden_inf_);
  } catch (...) {
    if (was_training) this->train();
    throw;
  }
  if (tied()) {
    logits.resize(hidden_inf_.rows(), vocab_size());
    logits.noalias() = hidden_inf_ * model.embed_tokens.weight.value.transpose();
  } else {
    lm_head.forward_inference(hidden_inf_, logits);
  }
  if (was_training) this->train();
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.cpp); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class LlamaAttention<float>;
extern template class LlamaAttention<double>;
extern template class LlamaMLP<float>;
extern template class LlamaMLP<double>;
extern template class LlamaDecoderLayer<float>;
extern template class LlamaDecoderLayer<double>;
extern template class LlamaModel<float>;
extern template class LlamaModel<double>;
extern template class LlamaForCausalLM<float>;
extern template class LlamaForCausalLM<double>;
}  // namespace peft
#endif
