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
//         Sliding window W (Mistral's sliding_window on every layer; Qwen2's use_sliding_window on the
//         layers layer_types marks sliding_attention; LlamaConfig::layer_window): query t sees only
//         the keys t' with t − W < t' ≤ t (transformers' masking_utils: sliding_window_overlay
//         kv_idx > q_idx − W and causal kv_idx ≤ q_idx), distances counted in valid tokens of the
//         sequence (HF counts tensor columns; with the padding all on one side these are the same).
//   MLP:  down_proj(silu(gate_proj(v)) ⊙ up_proj(v))   (SwiGLU; mlp_bias on all three)
//
// Padding (SequenceLayout lengths, right or left: layout.left_padded, HF's padding_side): the valid
// tokens of sequence b are rows first(b) .. first(b) + length(b) − 1; query t sees the valid keys
// t' ≤ t, and its rotary position is t − first(b) (HF's position_ids = cumsum(attention_mask) − 1,
// which generate() passes). The attention output of a padding row is exactly 0 and backward drops
// dy on those rows; the other per-row layers just process padding rows, which never reach a valid
// row. So valid rows' logits equal Hugging Face's with attention_mask (and, when left-padded, those
// position_ids); padding rows' logits are not HF's (nor meaningful).
//
// Prompt tuning (PEFT's PROMPT_TUNING, `prompt_encoder`, a SoftPrompt [n, d]): the n virtual token
// embeddings go right before each sequence's first valid token (PEFT: torch.cat((prompts,
// inputs_embeds))), at positions 0 .. n − 1; the model then sees layout.prepended(n), and its logits
// have n more rows per sequence (output_layout / prompt_labels put -100 there, as PEFT does).
// A sliding window counts the virtual tokens as the sequence's first n tokens; PEFT's left-padded
// batches put the padding between them and the tokens (so equal only with right padding).
// Prefix tuning (PEFT's PREFIX_TUNING, `prefix_encoder`, a PrefixAttention of token_dim KV·hd over
// the layers): layer i's attention gets np extra keys and values (PEFT's past_key_values, used as
// they are: no rotation), visible to every query; the tokens' positions start at np (PEFT offsets
// position_ids by num_virtual_tokens). With a sliding window, prefix key j is at position j, so
// token t sees it while np + t − j < W (PEFT's past_key_values are cache positions 0 .. np − 1 of
// HF's mask). Backward reaches both (finite-difference checked).
//
// Generation (forward_cached): a KV cache for a batch of sequences, the first chunk possibly
// left-padded (with a window, each step reads only the last W positions; the cache keeps them all);
// per-row adapters (each row names its adapter or "none", PEFT's adapter_names=) route
// every linear through AdaptedLinear::forward_routed.
//
// Backward: exact, by hand, every step commented. Attention keeps each row's softmax max and
// normaliser and recomputes the probabilities in backward (as layers/attention.hpp), so memory is
// one [S, S] block at a time. Frozen parameters cost no weight-gradient GEMM; the input gradient of
// the lowest block is computed only when the embedding table (or something below) trains.
// After the first call with given shapes, forward + backward allocate nothing.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/gemm.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parallel.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/scratch.hpp"
#include "peft/core/separate.hpp"
#include "peft/core/sequence.hpp"
#include "peft/layers/adapted_linear.hpp"
#include "peft/layers/embedding.hpp"
#include "peft/layers/lora_mixed_batch.hpp"
#include "peft/layers/prefix_attention.hpp"
#include "peft/layers/rms_norm.hpp"
#include "peft/layers/rotary.hpp"
#include "peft/layers/soft_prompt.hpp"

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
  /// > 0: sliding-window attention (HF's sliding_window W): query t sees the keys t' with
  /// t − W < t' ≤ t (masking_utils.sliding_window_causal_mask_function), on the layers
  /// layer_window(i) > 0 (all of them for Mistral).
  Index sliding_window = 0;
  /// Per layer "full_attention" or "sliding_attention" (Qwen2's layer_types); empty: the layers
  /// i ≥ max_window_layers slide when sliding_window > 0 (Mistral: max_window_layers 0, all).
  std::vector<std::string> layer_types;
  Index max_window_layers = 0;  ///< read only with an empty layer_types (Qwen2Config's default rule)
  double initializer_range = 0.02;

  Index kv_heads() const { return num_key_value_heads > 0 ? num_key_value_heads : num_attention_heads; }
  Index resolved_head_dim() const {
    return head_dim > 0 ? head_dim : (num_attention_heads > 0 ? hidden_size / num_attention_heads : 0);
  }
  /// The attention window of layer i: sliding_window if the layer slides, else 0 (full attention).
  Index layer_window(Index i) const {
    if (sliding_window <= 0) return 0;
    if (layer_types.empty()) return i >= max_window_layers ? sliding_window : 0;
    return layer_types[static_cast<std::size_t>(i)] == "sliding_attention" ? sliding_window : 0;
  }

  /// Largest accepted size of any one dimension (a config is input: sizes are bounded before any
  /// allocation; the largest real checkpoints are far below).
  static constexpr Index kMaxDimension = Index(1) << 24;

  /// ConfigError naming the first invalid field.
  PEFT_SEPARATE_INLINE void validate() const;
};

#if PEFT_SEPARATE_BODIES  // compiled once in the project's test build (peft/core/separate.hpp)
PEFT_SEPARATE_INLINE void LlamaConfig::validate() const {
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
  if (max_window_layers < 0) throw ConfigError(who + ": max_window_layers must be >= 0");
  if (!layer_types.empty()) {
    if (static_cast<Index>(layer_types.size()) != num_hidden_layers)
      throw ConfigError(who + ": layer_types has " + std::to_string(layer_types.size()) + " entries for " +
                        std::to_string(num_hidden_layers) + " layers");
    for (const std::string& t : layer_types) {
      if (t != "full_attention" && t != "sliding_attention")
        throw ConfigError(who + ": layer_types holds \"" + t +
                          "\" (full_attention and sliding_attention are supported)");
      if (t == "sliding_attention" && sliding_window <= 0)
        throw ConfigError(who + ": layer_types holds sliding_attention but sliding_window is not set");
    }
  }
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
#endif

namespace detail {
/// A frozen adapted linear of the given shape, weights zero (filled by a loader or an init).
template <class T>
AdaptedLinear<T> llama_linear(Index in, Index out, bool bias, std::uint64_t seed) {
  Linear<T> base;
  base.weight = Parameter<T>(out, in, false);
  if (bias) base.bias = Parameter<T>(1, out, false, true);
  return AdaptedLinear<T>(std::move(base), "", seed);
}

/// Per-row adapters of a cached forward: `names[b]` for the rows_per_seq rows of sequence b
/// ("none" or "__base__": the base layer only).
struct LlamaRowAdapters {
  const std::vector<std::string>* names = nullptr;
  Index rows_per_seq = 0;
};

/// Routing state of one linear for per-row adapters (buffers reused across steps).
template <class T>
struct LlamaRoute {
  std::vector<int> routing;
  RoutedWorkspace<T> ws;
};

inline bool llama_no_adapter(const std::string& n) { return n == kNoAdapterName || n == "__base__"; }

/// y = lin(x): the active adapters, or with `rows` each row's named adapter (a name the layer does
/// not hold routes to the base: the adapter does not target this layer).
template <class T>
void llama_linear_inference(AdaptedLinear<T>& lin, const ConstMatrixRef<T>& x, Matrix<T>& y,
                            const LlamaRowAdapters* rows, LlamaRoute<T>& route) {
  if (rows == nullptr) {
    lin.forward_inference(x, y);
    return;
  }
  route.routing.resize(static_cast<std::size_t>(x.rows()));
  for (std::size_t b = 0; b < rows->names->size(); ++b) {
    const std::string& n = (*rows->names)[b];
    const int a = llama_no_adapter(n) ? kNoAdapter : lin.adapter_index(n);
    for (Index r = 0; r < rows->rows_per_seq; ++r)
      route.routing[b * static_cast<std::size_t>(rows->rows_per_seq) + static_cast<std::size_t>(r)] = a;
  }
  lin.forward_routed(x, route.routing, y, route.ws);
}

/// Zeroes the padding rows of m [B·S, cols] laid out by `layout`.
template <class T>
void llama_zero_padding(Matrix<T>& m, const SequenceLayout& layout) {
  for (Index b = 0; b < layout.batch; ++b) {
    const Index f = layout.first(b), L = layout.length(b), S = layout.seq;
    if (f > 0) m.middleRows(b * S, f).setZero();
    if (f + L < S) m.middleRows(b * S + f + L, S - f - L).setZero();
  }
}

/// out [B·(S + n), d] = x [B·S, d] with the n rows of P inserted before each sequence's first valid
/// row (layout.first(b)): rows [0, f) padding, [f, f + n) P, then the rest of x.
template <class T>
void llama_insert_prompt(const Matrix<T>& x, const SequenceLayout& layout, const Matrix<T>& P, Matrix<T>& out) {
  const Index S = layout.seq, n = P.rows(), S2 = S + n;
  out.resize(layout.batch * S2, x.cols());
  for (Index b = 0; b < layout.batch; ++b) {
    const Index f = layout.first(b);
    if (f > 0) out.middleRows(b * S2, f) = x.middleRows(b * S, f);
    out.middleRows(b * S2 + f, n) = P;
    out.middleRows(b * S2 + f + n, S - f) = x.middleRows(b * S + f, S - f);
  }
}
}  // namespace detail

/// Keys (rotated) and values of the positions computed so far, per layer, for a batch of sequences
/// (LlamaForCausalLM::make_kv_cache / forward_cached). Column c of row b is matrix row
/// b·capacity + c; columns before first[b] are the left padding of the first chunk (never read).
template <class T>
struct LlamaKVCache {
  std::vector<Matrix<T>> k, v;  ///< per layer [batch·capacity, KV·hd]
  Index length = 0;             ///< columns filled (the same for every row)
  Index batch = 1;
  std::vector<Index> first;  ///< per row: first valid column
  Index capacity() const { return k.empty() || batch <= 0 ? 0 : k.front().rows() / batch; }
  void reset() {
    length = 0;
    std::fill(first.begin(), first.end(), Index(0));
  }
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
    Matrix<T> x;        ///< the input [B·S, d], once for q, k and v, when one of them reads it
    Matrix<T> Q, K, V;  ///< [B·S, H·hd], [B·S, KV·hd] ×2
    ColVector<T> row_max, row_sum;
    Index prefix_len = 0;  ///< np: prefix keys (prefix tuning); token positions start at np
    Matrix<T> PK, PV;      ///< the prefix keys / values [np, KV·hd] this forward used
  };

  LlamaAttention() = default;
  /// `window` > 0: sliding-window attention over that many positions (LlamaConfig::layer_window).
  LlamaAttention(const LlamaConfig& c, std::uint64_t seed, Index window = 0);

  AdaptedLinear<T> q_proj, k_proj, v_proj, o_proj;

  Index num_heads() const { return num_heads_; }
  Index num_kv_heads() const { return num_kv_heads_; }
  Index head_dim() const { return head_dim_; }
  Index dim() const { return q_proj.in_features(); }
  /// The attention window W (0: full causal attention).
  Index sliding_window() const { return window_; }

  /// x [B·S, d] laid out by `layout`; rope must cover np + S positions (RotaryEmbedding::reserve).
  /// `prefix` (may be null): np prefix keys / values [np, KV·hd] (prefix tuning).
  void forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, const RotaryEmbedding<T>& rope, Matrix<T>& y,
               Cache& cache, const PrefixKV<T>* prefix = nullptr);
  /// Accumulates trainable gradients; writes dx [B·S, d] unless null; the prefix gradients are
  /// accumulated (+=) into *dprefix unless null.
  void backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dy, Matrix<T>* dx,
                PrefixGrad<T>* dprefix = nullptr);

  /// Inference on m new columns of kv.batch sequences, x [B·m, d] (row b·m + r: column n + r of
  /// sequence b, n = kv.length): the new keys / values go to kv.k / kv.v [layer] [B·capacity, KV·hd];
  /// a valid column c attends to the prefix and to columns kv.first[b] .. c, at rotary position
  /// np + c − first[b]; padding columns (c < first[b]) give 0. Keeps nothing for backward.
  void forward_cached(const ConstMatrixRef<T>& x, LlamaKVCache<T>& kv, Index layer, const RotaryEmbedding<T>& rope,
                      Matrix<T>& y, const PrefixKV<T>* prefix, const detail::LlamaRowAdapters* rows);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("q_proj", q_proj);
    fn("k_proj", k_proj);
    fn("v_proj", v_proj);
    fn("o_proj", o_proj);
  }

 private:
  /// P = softmax-ready scaled scores [L, np + L]: Q_{b,h} [PK_g; K_{b,g}]ᵀ / √hd over the valid rows
  /// of sequence b (masked entries 0).
  void scaled_scores(const Cache& cache, Index b, Index h, Eigen::Block<Matrix<T>> P) const;
  /// First visible column of query t in the [prefix; keys] columns (prefix key j is column j, token
  /// key t' column np + t'; query t is at np + t): 0, or with a window W, max(0, np + t + 1 − W).
  Index window_start(Index np, Index t) const { return window_ > 0 ? std::max<Index>(0, np + t + 1 - window_) : 0; }

  Index num_heads_ = 1, num_kv_heads_ = 1, head_dim_ = 2, window_ = 0;
  detail::LlamaRoute<T> route_[4];   // per-row adapter routing of q, k, v, o (forward_cached)
  Matrix<T> q_inf_, k_inf_, v_inf_;  // forward_cached scratch
  RowVector<T> p_inf_;
  // The [rows, ·] temporaries of forward, forward_cached and backward (context C, masked dy, dC, dQ,
  // dK, dV, the k/v input-gradient part) are the thread's scratch (core/scratch.hpp), shared by every
  // layer; the small per-thread probability blocks stay here.
  enum ScratchSlot { kContext, kDyMasked, kDContext, kDQ, kDK, kDV, kDxPart };
  static Matrix<T>& buffer(ScratchSlot slot, Index rows, Index cols) {
    return scratch<T>(ScratchOwner::LlamaAttention, slot, rows, cols);
  }
  Matrix<T> scores_, dprobs_;
};

template <class T>
LlamaAttention<T>::LlamaAttention(const LlamaConfig& c, std::uint64_t seed, Index window)
    : num_heads_(c.num_attention_heads),
      num_kv_heads_(c.kv_heads()),
      head_dim_(c.resolved_head_dim()),
      window_(window) {
  const Index d = c.hidden_size, hd = head_dim_;
  q_proj = detail::llama_linear<T>(d, num_heads_ * hd, c.qkv_bias, seed + 1);
  k_proj = detail::llama_linear<T>(d, num_kv_heads_ * hd, c.qkv_bias, seed + 2);
  v_proj = detail::llama_linear<T>(d, num_kv_heads_ * hd, c.qkv_bias, seed + 3);
  o_proj = detail::llama_linear<T>(num_heads_ * hd, d, c.o_bias, seed + 4);
}

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
    Matrix<T> x;     ///< the input [rows, d], once for gate and up, when one of them reads it
    Matrix<T> g, u;  ///< gate_proj(x), up_proj(x)   [rows, I]
  };

  LlamaMLP() = default;
  LlamaMLP(const LlamaConfig& c, std::uint64_t seed);

  AdaptedLinear<T> gate_proj, up_proj, down_proj;

  void forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache);
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx);
  /// Inference: keeps nothing for backward; `rows` (may be null): per-row adapters.
  void forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y, const detail::LlamaRowAdapters* rows = nullptr);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("gate_proj", gate_proj);
    fn("up_proj", up_proj);
    fn("down_proj", down_proj);
  }

 private:
  Matrix<T> g_inf_, u_inf_;  // forward_inference's gate and up projections
  detail::LlamaRoute<T> route_[3];
  // h = silu(g) ⊙ u and backward's dh, dg, du [rows, I] and the up projection's input-gradient part
  // [rows, d]: the thread's scratch (core/scratch.hpp), shared by every layer. down_proj keeps no
  // copy of h: backward recomputes it from the cached g and u when down_proj reads its input
  // (silu_mul: the same code in both, so the same values).
  enum ScratchSlot { kH, kDh, kDg, kDu, kDxPart };
  /// h = silu(g) ⊙ u = g ⊙ u / (1 + exp(−g))   [rows, I]
  static void silu_mul(const Matrix<T>& g, const Matrix<T>& u, Matrix<T>& h);
  static Matrix<T>& buffer(ScratchSlot slot, Index rows, Index cols) {
    return scratch<T>(ScratchOwner::LlamaMlp, slot, rows, cols);
  }
};

template <class T>
LlamaMLP<T>::LlamaMLP(const LlamaConfig& c, std::uint64_t seed) {
  gate_proj = detail::llama_linear<T>(c.hidden_size, c.intermediate_size, c.mlp_bias, seed + 5);
  up_proj = detail::llama_linear<T>(c.hidden_size, c.intermediate_size, c.mlp_bias, seed + 6);
  down_proj = detail::llama_linear<T>(c.intermediate_size, c.hidden_size, c.mlp_bias, seed + 7);
}

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
  LlamaDecoderLayer(const LlamaConfig& c, std::uint64_t seed, Index window = 0);

  RMSNorm<T> input_layernorm;
  LlamaAttention<T> self_attn;
  RMSNorm<T> post_attention_layernorm;
  LlamaMLP<T> mlp;

  /// `y` must not share storage with `x`; `prefix`: see LlamaAttention::forward.
  void forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, const RotaryEmbedding<T>& rope, Matrix<T>& y,
               Cache& cache, const PrefixKV<T>* prefix = nullptr);
  /// dx written unless null (then the attention's input gradient is skipped unless norm1 trains).
  void backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dy, Matrix<T>* dx,
                PrefixGrad<T>* dprefix = nullptr);
  /// Inference on m new columns of a batch (see LlamaAttention::forward_cached).
  void forward_cached(const ConstMatrixRef<T>& x, LlamaKVCache<T>& kv, Index layer, const RotaryEmbedding<T>& rope,
                      Matrix<T>& y, const PrefixKV<T>* prefix, const detail::LlamaRowAdapters* rows);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("input_layernorm", input_layernorm);
    fn("self_attn", self_attn);
    // Keys past the small-string limit (15 characters in libstdc++) are static: a tree walk such as
    // train()/eval(), which PPO runs every rollout, must not allocate.
    static const std::string post_key("post_attention_layernorm");
    fn(post_key, post_attention_layernorm);
    fn("mlp", mlp);
  }

 private:
  // Forward's (and forward_cached's) u, a, v, f and backward's dv, dh, du [rows, d]: the thread's
  // scratch (core/scratch.hpp), shared by every layer.
  enum ScratchSlot { kU, kA, kV, kF, kDv, kDh, kDu };
  Matrix<T>& buffer(ScratchSlot slot, Index rows) {
    return scratch<T>(ScratchOwner::LlamaDecoderLayer, slot, rows, input_layernorm.dim());
  }
  typename RMSNorm<T>::Cache norm_inf_;
};

template <class T>
LlamaDecoderLayer<T>::LlamaDecoderLayer(const LlamaConfig& c, std::uint64_t seed, Index window)
    : input_layernorm(c.hidden_size, c.rms_norm_eps),
      self_attn(c, seed, window),
      post_attention_layernorm(c.hidden_size, c.rms_norm_eps),
      mlp(c, seed) {
  input_layernorm.weight.set_trainable(false);
  post_attention_layernorm.weight.set_trainable(false);
}

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
    SequenceLayout layout;        ///< the layers' layout (input layout, prepended by a prompt)
    SequenceLayout input_layout;  ///< the ids' layout
    Index prompt_len = 0;
  };

  LlamaModel() = default;
  explicit LlamaModel(const LlamaConfig& c);

  Embedding<T> embed_tokens;
  std::vector<LlamaDecoderLayer<T>> layers;
  RMSNorm<T> norm;

  /// ids [B·S] → final hidden states [B·(n + S), d] (after `norm`). `prompt` (may be null): n rows
  /// inserted before each sequence's tokens; `prefix` (may be null): the prefix table [np, L·2·KV·hd]
  /// (layer i: keys in columns [2i·w, 2i·w + w), values in the next w, w = KV·hd).
  void forward(const std::vector<Index>& ids, const SequenceLayout& layout, const RotaryEmbedding<T>& rope,
               Matrix<T>& hidden, Cache& cache, const Matrix<T>* prompt = nullptr, const Matrix<T>* prefix = nullptr);
  /// dhidden [B·(n + S), d] → every trainable gradient (embedding table included); dprompt [n, d] and
  /// dprefix [np, L·2·KV·hd] accumulate (+=) unless null.
  void backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dhidden,
                Matrix<T>* dprompt = nullptr, Matrix<T>* dprefix = nullptr);
  /// Inference on m new columns of kv.batch sequences (ids [B·m] laid out by `layout`, left padding
  /// only in the first chunk): hidden [B·(m + n), d] (n = prompt rows, inserted in the first chunk);
  /// appends to `kv`.
  void forward_cached(const std::vector<Index>& ids, const SequenceLayout& layout, const RotaryEmbedding<T>& rope,
                      LlamaKVCache<T>& kv, Matrix<T>& hidden, const Matrix<T>* prompt, const Matrix<T>* prefix,
                      const std::vector<std::string>* adapter_names);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("embed_tokens", embed_tokens);
    for (std::size_t i = 0; i < layers.size(); ++i) fn("layers." + std::to_string(i), layers[i]);
    fn("norm", norm);
  }

 private:
  bool below_trainable() const;
  Matrix<T> x_, y_, da_, db_, xp_, xin_;
  typename Embedding<T>::Cache embed_inf_;
  typename RMSNorm<T>::Cache norm_inf_;
};

template <class T>
LlamaModel<T>::LlamaModel(const LlamaConfig& c) : norm(c.hidden_size, c.rms_norm_eps) {
  embed_tokens.weight = Parameter<T>(c.vocab_size, c.hidden_size, false);
  embed_tokens.weight.value.setZero();
  for (Index i = 0; i < c.num_hidden_layers; ++i)
    layers.emplace_back(c, 0x11a3a000ULL + 16ULL * static_cast<std::uint64_t>(i), c.layer_window(i));
  norm.weight.set_trainable(false);
}

// ------------------------------------------------------------------------------------------------
// The causal LM (HF's LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM).
// ------------------------------------------------------------------------------------------------
template <class T>
class LlamaForCausalLM : public Module<T> {
 public:
  struct Cache {
    typename LlamaModel<T>::Cache model;
    typename AdaptedLinear<T>::Cache head;
    Matrix<T> hidden;  ///< final hidden states [B·(n + S), d] (kept for the tied head's gradient)
    /// The prefix table of this forward; backward gathers its gradient here (hence mutable).
    mutable typename PrefixAttention<T>::Cache prefix;
  };

  LlamaForCausalLM() = default;

  /// Weights allocated, zero and frozen (a loader fills them: io/llama_checkpoint.hpp).
  explicit LlamaForCausalLM(const LlamaConfig& config);

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
  AdaptedLinear<T> lm_head;                          ///< empty when tied
  std::optional<SoftPrompt<T>> prompt_encoder;       ///< prompt tuning (PEFT's PROMPT_TUNING)
  std::optional<PrefixAttention<T>> prefix_encoder;  ///< prefix tuning (PEFT's PREFIX_TUNING)

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

  // ---- prompt learning (one prompt or prefix at a time, as PEFT's active prompt adapter) --------

  /// Prompt tuning: n trainable virtual token embeddings [n, hidden_size], N(0, 1) (PEFT's RANDOM
  /// init; SoftPrompt::init_from_tokens gives its TEXT init with model.embed_tokens.weight.value).
  SoftPrompt<T>& add_prompt_tuning(Index num_virtual_tokens, Rng& rng);
  /// Prefix tuning: np trainable virtual keys / values per layer, token_dim = KV·hd (PEFT's rule for
  /// grouped-query attention), flat or through PEFT's projection MLP of width encoder_hidden_size.
  PrefixAttention<T>& add_prefix_tuning(Index num_virtual_tokens, Rng& rng, bool prefix_projection = false,
                                        Index encoder_hidden_size = 0);
  /// Removes the prompt / prefix (back to the plain model).
  void remove_prompt_learning() {
    prompt_encoder.reset();
    prefix_encoder.reset();
  }
  /// n: the virtual tokens a prompt inserts into every sequence (0 without prompt tuning).
  Index prompt_length() const { return prompt_encoder ? prompt_encoder->num_virtual_tokens() : 0; }
  /// np: the prefix keys of every layer (0 without prefix tuning).
  Index prefix_length() const { return prefix_encoder ? prefix_encoder->num_virtual_tokens() : 0; }
  /// The logits' layout for ids laid out by `layout`: layout.prepended(n) with a prompt.
  SequenceLayout output_layout(const SequenceLayout& layout) const {
    return prompt_length() > 0 ? layout.prepended(prompt_length()) : layout;
  }
  /// Labels [B·S] → the logits' labels [B·(n + S)]: ignore_index at the virtual tokens (PEFT).
  std::vector<std::int64_t> prompt_labels(const std::vector<std::int64_t>& labels, const SequenceLayout& layout,
                                          std::int64_t ignore_index = -100) const;

  /// ids [B·S] laid out by `layout` (right or left padding; padding ids must be valid ids, e.g. 0) →
  /// logits [B·(n + S), vocab] laid out by output_layout(layout) (n = prompt_length()).
  void forward(const std::vector<Index>& ids, const SequenceLayout& layout, Matrix<T>& logits, Cache& cache);
  Matrix<T> forward(const std::vector<Index>& ids, const SequenceLayout& layout, Cache& cache) {
    Matrix<T> logits;
    forward(ids, layout, logits, cache);
    return logits;
  }
  /// dlogits [B·S, vocab] → every trainable gradient (+=). `dhidden` (may be null): a gradient on
  /// the final hidden states cache.hidden [B·(n + S), d] from a head of the caller's (a value head,
  /// train/ppo.hpp), added to what the LM head passes down.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dlogits, const Matrix<T>* dhidden = nullptr);

  // ---- inference with a KV cache (models/generation.hpp samples from it) --------------------------

  /// A KV cache for `batch` sequences of up to `capacity` columns each (a prompt's n virtual tokens
  /// count: they are inserted in the first chunk).
  LlamaKVCache<T> make_kv_cache(Index capacity, Index batch = 1) const;
  /// Appends `ids` (m ≥ 1 tokens) to the one sequence held by `kv` and writes their logits [m, vocab]
  /// (row r: the distribution of the token after ids[r]). Adapters apply as in forward (active,
  /// disabled or merged); dropout is off whatever the mode. Keeps nothing for backward.
  void forward_cached(const std::vector<Index>& ids, LlamaKVCache<T>& kv, Matrix<T>& logits) {
    forward_cached(ids, SequenceLayout(1, static_cast<Index>(ids.size())), kv, logits);
  }
  /// The batched form: ids [B·m] laid out by `layout` (B = kv.batch; the first chunk may be
  /// left-padded, later ones are full) → logits [B·m, vocab] of the ids (not of a prompt's virtual
  /// tokens). `adapter_names` (empty: the active adapters): per sequence the adapter its rows use,
  /// or "none" / "__base__" (PEFT's adapter_names=): every linear routes its rows
  /// (AdaptedLinear::forward_routed; refused while merged).
  void forward_cached(const std::vector<Index>& ids, const SequenceLayout& layout, LlamaKVCache<T>& kv,
                      Matrix<T>& logits, const std::vector<std::string>& adapter_names = {});

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("model", model);
    if (!tied()) fn("lm_head", lm_head);
    if (prompt_encoder) fn("prompt_encoder", *prompt_encoder);
    if (prefix_encoder) fn("prefix_encoder", *prefix_encoder);
  }

 private:
  void head_inference(const Matrix<T>& hidden, Matrix<T>& logits, const detail::LlamaRowAdapters* rows);

  LlamaConfig config_;
  RotaryEmbedding<T> rope_;
  Matrix<T> dhidden_, hidden_inf_, hidden_sel_;
  typename PrefixAttention<T>::Cache prefix_inf_;
  detail::LlamaRoute<T> head_route_;
};

template <class T>
LlamaForCausalLM<T>::LlamaForCausalLM(const LlamaConfig& config) : config_(config) {
  config.validate();
  model = LlamaModel<T>(config);
  if (!config.tie_word_embeddings)
    lm_head = detail::llama_linear<T>(config.hidden_size, config.vocab_size, false, 0x1e4dULL);
  rope_ = RotaryEmbedding<T>(config.rope, config.resolved_head_dim());
  this->set_name(this->name());
}

// ---- members defined outside the class bodies (the test build's extern template declaration then
// covers them; see docs/CONTRIBUTING.md) ----

template <class T>
void LlamaAttention<T>::scaled_scores(const Cache& cache, Index b, Index h, Eigen::Block<Matrix<T>> P) const {
  const Index S = cache.layout.seq, hd = head_dim_, np = cache.prefix_len, L = P.rows(),
              g = h / (num_heads_ / num_kv_heads_), f = b * S + cache.layout.first(b);
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  const auto Qh = cache.Q.block(f, h * hd, L, hd);
  if (np > 0) P.leftCols(np).noalias() = scale * (Qh * cache.PK.middleCols(g * hd, hd).transpose());  // Q PKᵀ / √hd
  auto Pt = P.rightCols(L);
  Pt.noalias() = Qh * cache.K.block(f, g * hd, L, hd).transpose();  // Q Kᵀ
  for (Index t = 0; t < L; ++t) {
    Pt.row(t).head(t + 1) *= scale;                      // causal: keys t' ≤ t
    if (t + 1 < L) Pt.row(t).tail(L - t - 1).setZero();  // masked
    const Index lo = window_start(np, t);
    if (lo > 0) P.row(t).head(lo).setZero();  // sliding window: keys at np + t − (np + t') ≥ W masked
  }
}

template <class T>
void LlamaAttention<T>::forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout,
                                const RotaryEmbedding<T>& rope, Matrix<T>& y, Cache& cache, const PrefixKV<T>* prefix) {
  layout.validate("LlamaAttention", this->name(), x.rows());
  check::input_features("LlamaAttention", this->name(), x.cols(), dim());
  const Index H = num_heads_, KV = num_kv_heads_, hd = head_dim_, B = layout.batch, S = layout.seq;
  const Index np = prefix != nullptr ? prefix->key.rows() : 0;
  if (prefix != nullptr) {
    check::shape("LlamaAttention", this->name(), "prefix keys", prefix->key.rows(), prefix->key.cols(), np, KV * hd);
    check::shape("LlamaAttention", this->name(), "prefix values", prefix->value.rows(), prefix->value.cols(), np,
                 KV * hd);
  }
  if (rope.positions() < np + S || rope.head_dim() != hd)
    throw ConfigError(describe("LlamaAttention", this->name()) + ": rotary tables cover " +
                      std::to_string(rope.positions()) + " positions of head_dim " + std::to_string(rope.head_dim()) +
                      ", need " + std::to_string(np + S) + " of " + std::to_string(hd));
  cache.layout = layout;
  cache.prefix_len = np;
  if (np > 0) {
    cache.PK = prefix->key;
    cache.PV = prefix->value;
  }
  q_proj.forward_shared_input(x, cache.Q, cache.q);  // Q = x W_qᵀ (+ b_q) (+ adapters)   [B·S, H·hd]
  k_proj.forward_shared_input(x, cache.K, cache.k);  // K   [B·S, KV·hd]
  v_proj.forward_shared_input(x, cache.V, cache.v);  // V   [B·S, KV·hd]
  keep_shared_input<T>(x, cache.x, {&cache.q, &cache.k, &cache.v});  // one copy of x for the three
  cache.row_max.setZero(B * H * S);
  cache.row_sum.setZero(B * H * S);
  Matrix<T>& context = buffer(kContext, B * S, H * hd);
  context.setZero();  // padding query rows stay 0
  const Index rep = H / KV;
  // RoPE, then one item per (sequence, head), split between threads (core/parallel.hpp), each with
  // its own [S, np + S] block of scores_.
  parallel_for(B, parallel_threads(B, 6.0 * B * S * (H + KV) * hd), [&](Index begin, Index end, int) {
    for (Index b = begin; b < end; ++b) {  // RoPE on valid rows: valid token j of sequence b is at position np + j
      const Index Lb = layout.length(b), f = b * S + layout.first(b);
      for (Index h = 0; h < H; ++h) rope.rotate(cache.Q.block(f, h * hd, Lb, hd), np);
      for (Index g = 0; g < KV; ++g) rope.rotate(cache.K.block(f, g * hd, Lb, hd), np);
    }
  });
  const int threads = parallel_threads(B * H, 4.0 * B * H * S * (np + S) * hd);
  if (scores_.rows() < threads * S || scores_.cols() < np + S) scores_.resize(threads * S, np + S);
  parallel_for(B * H, threads, [&](Index begin, Index end, int thread) {
    for (Index i = begin; i < end; ++i) {
      const Index b = i / H, h = i % H, g = h / rep;
      const Index Lb = layout.length(b), f = b * S + layout.first(b);
      auto P = scores_.block(thread * S, 0, Lb, np + Lb);
      scaled_scores(cache, b, h, P);
      const Index first = (b * H + h) * S;
      for (Index t = 0; t < Lb; ++t) {
        const Index lo = window_start(np, t);
        auto row = P.row(t).segment(lo, np + t + 1 - lo);  // the prefix and keys t' ≤ t (inside the window)
        const T m = row.maxCoeff();
        row.array() = (row.array() - m).exp();  // exp(s − max s) ≤ 1
        const T z = row.sum();
        row /= z;
        cache.row_max(first + t) = m;
        cache.row_sum(first + t) = z;
      }
      auto C = context.block(f, h * hd, Lb, hd);
      C.noalias() = P.rightCols(Lb) * cache.V.block(f, g * hd, Lb, hd);             // A V_g
      if (np > 0) C.noalias() += P.leftCols(np) * cache.PV.middleCols(g * hd, hd);  // + A_p PV_g
    }
  });
  o_proj.forward(context, y, cache.o);                            // y = C W_oᵀ (+ b_o)   [B·S, d]
  if (layout.padded()) detail::llama_zero_padding<T>(y, layout);  // padding rows: exactly 0
}

template <class T>
void LlamaAttention<T>::backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dy,
                                 Matrix<T>* dx, PrefixGrad<T>* dprefix) {
  const SequenceLayout& layout = cache.layout;
  const Index H = num_heads_, KV = num_kv_heads_, hd = head_dim_, B = layout.batch, S = layout.seq, rep = H / KV,
              np = cache.prefix_len;
  check::shape("LlamaAttention", this->name(), "output gradient", dy.rows(), dy.cols(), B * S, dim());
  if (dprefix != nullptr && np > 0) {
    check::shape("LlamaAttention", this->name(), "prefix key gradient", dprefix->key.rows(), dprefix->key.cols(), np,
                 KV * hd);
    check::shape("LlamaAttention", this->name(), "prefix value gradient", dprefix->value.rows(), dprefix->value.cols(),
                 np, KV * hd);
  }
  Matrix<T>& dcontext = buffer(kDContext, B * S, H * hd);
  if (layout.padded()) {  // padding rows of y are constant 0: their gradient is dropped
    Matrix<T>& dy_masked = buffer(kDyMasked, B * S, dim());
    dy_masked = dy;
    detail::llama_zero_padding<T>(dy_masked, layout);
    o_proj.backward(cache.o, dy_masked, &dcontext);  // dC = dY W_o   [B·S, H·hd]
  } else {
    o_proj.backward(cache.o, dy, &dcontext);
  }
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  Matrix<T>& dQ = buffer(kDQ, B * S, H * hd);
  Matrix<T>& dK = buffer(kDK, B * S, KV * hd);
  Matrix<T>& dV = buffer(kDV, B * S, KV * hd);
  dQ.setZero();
  dK.setZero();
  dV.setZero();
  // One item per (sequence, key/value group): its query heads accumulate into the group's dK and
  // dV rows of that sequence, which no other item touches. The prefix gradients sum over
  // sequences: with them an item is a whole group (all sequences). Threads have their own
  // scores_ / dprobs_ blocks (core/parallel.hpp).
  const bool by_group = dprefix != nullptr && np > 0;
  const Index items = by_group ? KV : B * KV;
  const int threads = parallel_threads(items, 8.0 * B * H * S * (np + S) * hd);
  if (scores_.rows() < threads * S || scores_.cols() < np + S) scores_.resize(threads * S, np + S);
  if (dprobs_.rows() < threads * S || dprobs_.cols() < np + S) dprobs_.resize(threads * S, np + S);
  const auto one = [&](Index b, Index g, int thread) {
    const Index Lb = layout.length(b), f = b * S + layout.first(b);
    for (Index h = g * rep; h < (g + 1) * rep; ++h) {
      auto P = scores_.block(thread * S, 0, Lb, np + Lb);  // A recomputed exactly as forward left it
      scaled_scores(cache, b, h, P);
      const Index first = (b * H + h) * S;
      for (Index t = 0; t < Lb; ++t) {
        const Index lo = window_start(np, t);
        auto row = P.row(t).segment(lo, np + t + 1 - lo);
        row.array() = (row.array() - cache.row_max(first + t)).exp();
        row /= cache.row_sum(first + t);
      }
      const auto G = dcontext.block(f, h * hd, Lb, hd);
      auto dS = dprobs_.block(thread * S, 0, Lb, np + Lb);
      dV.block(f, g * hd, Lb, hd).noalias() += P.rightCols(Lb).transpose() * G;       // dV_g += Aᵀ G   [L, hd]
      dS.rightCols(Lb).noalias() = G * cache.V.block(f, g * hd, Lb, hd).transpose();  // dA = G V_gᵀ   [L, L]
      if (np > 0) {
        dS.leftCols(np).noalias() = G * cache.PV.middleCols(g * hd, hd).transpose();  // dA_p = G PV_gᵀ   [L, np]
        if (dprefix != nullptr)
          dprefix->value.middleCols(g * hd, hd).noalias() += P.leftCols(np).transpose() * G;  // dPV_g += A_pᵀ G
      }
      for (Index t = 0; t < Lb; ++t) {  // softmax: dS = A ⊙ (dA − Σ A ⊙ dA) / √hd
        const T dot = (P.row(t).array() * dS.row(t).array()).sum();
        dS.row(t).array() = scale * P.row(t).array() * (dS.row(t).array() - dot);
      }
      auto dQh = dQ.block(f, h * hd, Lb, hd);
      dQh.noalias() = dS.rightCols(Lb) * cache.K.block(f, g * hd, Lb, hd);  // dQ_h = dS K_g
      dK.block(f, g * hd, Lb, hd).noalias() +=
          dS.rightCols(Lb).transpose() * cache.Q.block(f, h * hd, Lb, hd);  // dK_g += dSᵀ Q_h
      if (np > 0) {
        dQh.noalias() += dS.leftCols(np) * cache.PK.middleCols(g * hd, hd);  // dQ_h += dS_p PK_g
        if (dprefix != nullptr)
          dprefix->key.middleCols(g * hd, hd).noalias() +=
              dS.leftCols(np).transpose() * cache.Q.block(f, h * hd, Lb, hd);  // dPK_g += dS_pᵀ Q_h
      }
      rope.rotate(dQh, np, true);  // RoPE backward (transpose rotation): d(pre-rotation) = Rᵀ d(rotated)
    }
    rope.rotate(dK.block(f, g * hd, Lb, hd), np, true);
  };
  parallel_for(items, threads, [&](Index begin, Index end, int thread) {
    for (Index i = begin; i < end; ++i) {
      if (by_group) {
        for (Index b = 0; b < B; ++b) one(b, i, thread);
      } else {
        one(i / KV, i % KV, thread);
      }
    }
  });
  q_proj.backward(cache.q, dQ, dx, cache.x);  // dx = dQ W_q + dK W_k + dV W_v
  Matrix<T>* part = dx != nullptr ? &buffer(kDxPart, B * S, dim()) : nullptr;
  k_proj.backward(cache.k, dK, part, cache.x);
  if (dx != nullptr) parallel_add<T>(*dx, *part);
  v_proj.backward(cache.v, dV, part, cache.x);
  if (dx != nullptr) parallel_add<T>(*dx, *part);
}

template <class T>
void LlamaMLP<T>::forward(const ConstMatrixRef<T>& x, Matrix<T>& y, Cache& cache) {
  gate_proj.forward_shared_input(x, cache.g, cache.gate);      // g = x W_gᵀ   [rows, I]
  up_proj.forward_shared_input(x, cache.u, cache.up);          // u = x W_uᵀ   [rows, I]
  keep_shared_input<T>(x, cache.x, {&cache.gate, &cache.up});  // one copy of x for the two
  Matrix<T>& h = buffer(kH, cache.g.rows(), cache.g.cols());
  silu_mul(cache.g, cache.u, h);                     // h = silu(g) ⊙ u   [rows, I]
  down_proj.forward_shared_input(h, y, cache.down);  // y = h W_dᵀ (h is recomputed for backward)
}

template <class T>
void LlamaMLP<T>::silu_mul(const Matrix<T>& g, const Matrix<T>& u, Matrix<T>& h) {
  h.resize(g.rows(), g.cols());
  parallel_rows(h.rows(), 20.0 * static_cast<double>(h.cols()), [&](Index b, Index e) {
    const auto gb = g.middleRows(b, e - b).array();
    h.middleRows(b, e - b).array() = gb / (T(1) + (-gb).exp()) * u.middleRows(b, e - b).array();
  });
}

template <class T>
void LlamaMLP<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx) {
  const Index rows = cache.g.rows(), inner = cache.g.cols();
  Matrix<T>& dh_all = buffer(kDh, rows, inner);
  Matrix<T>& dg = buffer(kDg, rows, inner);
  Matrix<T>& du = buffer(kDu, rows, inner);
  // h again, for down_proj's own gradients; when its forward read no input, an empty one (so a
  // parameter unfrozen since is refused, as with a plain forward)
  const Matrix<T> none;
  Matrix<T>& h = buffer(kH, rows, inner);
  if (cache.down.needs_input) silu_mul(cache.g, cache.u, h);
  down_proj.backward(cache.down, dy, &dh_all, cache.down.needs_input ? h : none);  // dh = dy W_d   [rows, I]
  parallel_rows(rows, 30.0 * static_cast<double>(inner), [&](Index b, Index e) {
    const Index n = e - b;
    const auto g = cache.g.middleRows(b, n).array();
    const auto dh = dh_all.middleRows(b, n).array();
    auto s = dg.middleRows(b, n).array();
    s = T(1) / (T(1) + (-g).exp());                                           // σ(g)
    du.middleRows(b, n).array() = dh * g * s;                                 // du = dh ⊙ silu(g)
    s = dh * cache.u.middleRows(b, n).array() * s * (T(1) + g * (T(1) - s));  // dg = dh ⊙ u ⊙ σ(1 + g(1 − σ))
  });
  gate_proj.backward(cache.gate, dg, dx, cache.x);  // dx = dg W_g + du W_u
  Matrix<T>* part = dx != nullptr ? &buffer(kDxPart, rows, dy.cols()) : nullptr;
  up_proj.backward(cache.up, du, part, cache.x);
  if (dx != nullptr) parallel_add<T>(*dx, *part);
}

template <class T>
void LlamaDecoderLayer<T>::forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout,
                                   const RotaryEmbedding<T>& rope, Matrix<T>& y, Cache& cache,
                                   const PrefixKV<T>* prefix) {
  const Index rows = x.rows();
  Matrix<T>& u = buffer(kU, rows);
  Matrix<T>& a = buffer(kA, rows);
  Matrix<T>& v = buffer(kV, rows);
  Matrix<T>& f = buffer(kF, rows);
  input_layernorm.forward(x, u, cache.norm1);                 // u = RMSNorm₁(x)
  self_attn.forward(u, layout, rope, a, cache.attn, prefix);  // a = Attn(u)
  parallel_sum<T>(y, x, a);                                   // h = x + a   (in y)
  post_attention_layernorm.forward(y, v, cache.norm2);        // v = RMSNorm₂(h)
  mlp.forward(v, f, cache.mlp);                               // f = MLP(v)
  parallel_add<T>(y, f);                                      // y = h + f
}

template <class T>
void LlamaDecoderLayer<T>::backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dy,
                                    Matrix<T>* dx, PrefixGrad<T>* dprefix) {
  const Index rows = dy.rows();
  Matrix<T>& dv = buffer(kDv, rows);
  Matrix<T>& dh = buffer(kDh, rows);
  mlp.backward(cache.mlp, dy, &dv);                         // dv = MLPᵀ(dy)
  post_attention_layernorm.backward(cache.norm2, dv, &dh);  // RMSNorm₂ᵀ(dv)
  parallel_add<T>(dh, dy);                                  // dh = dy + RMSNorm₂ᵀ(dv)
  const bool need_du = dx != nullptr || input_layernorm.weight.trainable();
  Matrix<T>* du = need_du ? &buffer(kDu, rows) : nullptr;
  self_attn.backward(cache.attn, rope, dh, du, dprefix);  // du = Attnᵀ(dh)
  if (!need_du) return;
  input_layernorm.backward(cache.norm1, *du, dx);  // dx = RMSNorm₁ᵀ(du) + dh
  if (dx != nullptr) parallel_add<T>(*dx, dh);
}

template <class T>
void LlamaModel<T>::forward(const std::vector<Index>& ids, const SequenceLayout& layout, const RotaryEmbedding<T>& rope,
                            Matrix<T>& hidden, Cache& cache, const Matrix<T>* prompt, const Matrix<T>* prefix) {
  layout.validate("LlamaModel", this->name(), static_cast<Index>(ids.size()));
  const Index n = prompt != nullptr ? prompt->rows() : 0;
  const Index w = layers.empty() ? 0 : layers.front().self_attn.num_kv_heads() * layers.front().self_attn.head_dim();
  if (prompt != nullptr) check::shape("LlamaModel", this->name(), "prompt", n, prompt->cols(), n, embed_tokens.dim());
  if (prefix != nullptr)
    check::shape("LlamaModel", this->name(), "prefix table", prefix->rows(), prefix->cols(), prefix->rows(),
                 static_cast<Index>(layers.size()) * 2 * w);
  cache.input_layout = layout;
  cache.prompt_len = n;
  cache.layout = layout;  // prepended by n in place (no allocation once the cache has this batch size)
  if (n > 0) {
    cache.layout.seq += n;
    for (Index& l : cache.layout.lengths) l += n;
  }
  embed_tokens.forward(ids, x_, cache.embed);  // x = E[ids]   [B·S, d]
  if (cache.layers.size() != layers.size()) cache.layers.resize(layers.size());
  Matrix<T>* cur = &x_;
  Matrix<T>* nxt = &y_;
  if (n > 0) {  // [padding; P; tokens] per sequence, in a buffer of its own (x_ keeps the ids' size)
    detail::llama_insert_prompt<T>(x_, layout, *prompt, xin_);
    cur = &xin_;
  }
  for (std::size_t i = 0; i < layers.size(); ++i) {
    if (prefix != nullptr) {
      const Index c = static_cast<Index>(i) * 2 * w;
      const PrefixKV<T> kv{prefix->middleCols(c, w), prefix->middleCols(c + w, w)};
      layers[i].forward(*cur, cache.layout, rope, *nxt, cache.layers[i], &kv);
    } else {
      layers[i].forward(*cur, cache.layout, rope, *nxt, cache.layers[i]);
    }
    std::swap(cur, nxt);
  }
  norm.forward(*cur, hidden, cache.norm);  // final RMSNorm
}

template <class T>
bool LlamaModel<T>::below_trainable() const {
  return embed_tokens.weight.trainable();
}

template <class T>
void LlamaModel<T>::backward(const Cache& cache, const RotaryEmbedding<T>& rope, const ConstMatrixRef<T>& dhidden,
                             Matrix<T>* dprompt, Matrix<T>* dprefix) {
  if (cache.layers.size() != layers.size())
    throw ConfigError(describe("LlamaModel", this->name()) + ": cache does not come from a forward of this model");
  const Index n = cache.prompt_len;
  const Index w = layers.empty() ? 0 : layers.front().self_attn.num_kv_heads() * layers.front().self_attn.head_dim();
  norm.backward(cache.norm, dhidden, &da_);
  Matrix<T>* cur = &da_;
  Matrix<T>* nxt = &db_;
  const bool need_embed = below_trainable();
  const bool need_below = need_embed || (n > 0 && dprompt != nullptr);
  for (std::size_t i = layers.size(); i-- > 0;) {
    Matrix<T>* dx = (i > 0 || need_below) ? nxt : nullptr;
    if (dprefix != nullptr) {
      const Index c = static_cast<Index>(i) * 2 * w;
      PrefixGrad<T> g{dprefix->middleCols(c, w), dprefix->middleCols(c + w, w)};
      layers[i].backward(cache.layers[i], rope, *cur, dx, &g);
    } else {
      layers[i].backward(cache.layers[i], rope, *cur, dx);
    }
    std::swap(cur, nxt);
  }
  if (!need_below) return;
  if (n > 0) {  // split [padding; P; tokens]: dP += Σ_b its rows, the rest back to the ids' layout
    const SequenceLayout& in = cache.input_layout;
    const Index S = in.seq, S2 = S + n;
    xp_.resize(in.batch * S, cur->cols());
    for (Index b = 0; b < in.batch; ++b) {
      const Index f = in.first(b);
      if (dprompt != nullptr) *dprompt += cur->middleRows(b * S2 + f, n);
      if (f > 0) xp_.middleRows(b * S, f) = cur->middleRows(b * S2, f);
      xp_.middleRows(b * S + f, S - f) = cur->middleRows(b * S2 + f + n, S - f);
    }
    cur = &xp_;
  }
  if (need_embed) embed_tokens.backward(cache.embed, *cur);  // dE[id] += dx rows
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
SoftPrompt<T>& LlamaForCausalLM<T>::add_prompt_tuning(Index num_virtual_tokens, Rng& rng) {
  if (prompt_encoder || prefix_encoder)
    throw ConfigError(describe("LlamaForCausalLM", this->name()) +
                      ": already has a prompt or prefix (remove_prompt_learning first)");
  prompt_encoder.emplace(num_virtual_tokens, config_.hidden_size, rng);
  this->set_name(this->name());
  return *prompt_encoder;
}

template <class T>
PrefixAttention<T>& LlamaForCausalLM<T>::add_prefix_tuning(Index num_virtual_tokens, Rng& rng, bool prefix_projection,
                                                           Index encoder_hidden_size) {
  if (prompt_encoder || prefix_encoder)
    throw ConfigError(describe("LlamaForCausalLM", this->name()) +
                      ": already has a prompt or prefix (remove_prompt_learning first)");
  PrefixConfig pc;
  pc.num_virtual_tokens = num_virtual_tokens;
  pc.token_dim = config_.kv_heads() * config_.resolved_head_dim();
  pc.num_layers = config_.num_hidden_layers;
  pc.prefix_projection = prefix_projection;
  pc.encoder_hidden_size = encoder_hidden_size > 0 ? encoder_hidden_size : pc.token_dim;  // PEFT's default
  prefix_encoder.emplace(pc, rng);
  this->set_name(this->name());
  return *prefix_encoder;
}

template <class T>
std::vector<std::int64_t> LlamaForCausalLM<T>::prompt_labels(const std::vector<std::int64_t>& labels,
                                                             const SequenceLayout& layout,
                                                             std::int64_t ignore_index) const {
  layout.validate("LlamaForCausalLM", this->name(), static_cast<Index>(labels.size()));
  const Index n = prompt_length();
  if (n == 0) return labels;
  const Index S = layout.seq, S2 = S + n;
  std::vector<std::int64_t> out(static_cast<std::size_t>(layout.batch * S2), ignore_index);
  for (Index b = 0; b < layout.batch; ++b) {
    const Index f = layout.first(b);
    for (Index t = 0; t < S; ++t)
      out[static_cast<std::size_t>(b * S2 + (t < f ? t : t + n))] = labels[static_cast<std::size_t>(b * S + t)];
  }
  return out;
}

template <class T>
void LlamaForCausalLM<T>::forward(const std::vector<Index>& ids, const SequenceLayout& layout, Matrix<T>& logits,
                                  Cache& cache) {
  layout.validate("LlamaForCausalLM", this->name(), static_cast<Index>(ids.size()));  // message built on failure only
  rope_.reserve(layout.seq + prompt_length() + prefix_length());
  const Matrix<T>* prefix = nullptr;
  if (prefix_encoder) {
    prefix_encoder->forward(cache.prefix);  // the table [np, L·2·KV·hd]; zeroes its gradient
    prefix = &cache.prefix.table;
  }
  model.forward(ids, layout, rope_, cache.hidden, cache.model,
                prompt_encoder ? &prompt_encoder->embedding.value : nullptr, prefix);
  if (tied()) {
    logits.resize(cache.hidden.rows(), vocab_size());
    gemm(logits, cache.hidden, model.embed_tokens.weight.value.transpose());  // logits = h Eᵀ
  } else {
    lm_head.forward(cache.hidden, logits, cache.head);  // logits = h W_headᵀ (+ adapters)
  }
}

template <class T>
void LlamaForCausalLM<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dlogits, const Matrix<T>* dhidden) {
  check::shape("LlamaForCausalLM", this->name(), "logits gradient", dlogits.rows(), dlogits.cols(), cache.hidden.rows(),
               vocab_size());
  if (tied()) {
    Parameter<T>& E = model.embed_tokens.weight;
    if (E.trainable()) gemm(E.accumulator(), dlogits.transpose(), cache.hidden, T(1), true);  // dE += dLᵀ h   [V, d]
    dhidden_.resize(dlogits.rows(), E.value.cols());
    gemm(dhidden_, dlogits, E.value);  // dh = dL E   [B·S, d]
  } else {
    lm_head.backward(cache.head, dlogits, &dhidden_);  // dh = dL W_head
  }
  if (dhidden != nullptr) {
    check::shape("LlamaForCausalLM", this->name(), "hidden-state gradient", dhidden->rows(), dhidden->cols(),
                 dhidden_.rows(), dhidden_.cols());
    dhidden_ += *dhidden;  // dh += ∂L/∂h from the caller's head
  }
  const Index cached_np = cache.model.layers.empty() ? 0 : cache.model.layers.front().attn.prefix_len;
  if (cache.model.prompt_len != prompt_length() || cached_np != prefix_length())
    throw ConfigError(describe("LlamaForCausalLM", this->name()) +
                      ": the prompt / prefix changed between forward and backward");
  Matrix<T>* dprompt =
      prompt_encoder && prompt_encoder->embedding.trainable() ? &prompt_encoder->embedding.accumulator() : nullptr;
  bool prefix_trains = false;  // read directly: visiting by name would build strings
  if (prefix_encoder) {
    const PrefixAttention<T>& p = *prefix_encoder;
    prefix_trains = p.embedding.trainable() ||
                    (p.projected() && (p.transform_0.weight.trainable() || p.transform_0.bias.trainable() ||
                                       p.transform_2.weight.trainable() || p.transform_2.bias.trainable()));
  }
  model.backward(cache.model, rope_, dhidden_, dprompt, prefix_trains ? &cache.prefix.dtable : nullptr);
  if (prefix_trains) prefix_encoder->backward(cache.prefix);  // dT → embedding (and the MLP's) gradients
}

template <class T>
void LlamaAttention<T>::forward_cached(const ConstMatrixRef<T>& x, LlamaKVCache<T>& kv, Index layer,
                                       const RotaryEmbedding<T>& rope, Matrix<T>& y, const PrefixKV<T>* prefix,
                                       const detail::LlamaRowAdapters* rows) {
  const Index H = num_heads_, KV = num_kv_heads_, hd = head_dim_, rep = H / KV, B = kv.batch, n = kv.length,
              cap = kv.capacity();
  const Index m = B > 0 ? x.rows() / B : 0, np = prefix != nullptr ? prefix->key.rows() : 0;
  check::input_features("LlamaAttention", this->name(), x.cols(), dim());
  Matrix<T>& k_cache = kv.k[static_cast<std::size_t>(layer)];
  Matrix<T>& v_cache = kv.v[static_cast<std::size_t>(layer)];
  if (m * B != x.rows() || n + m > cap || rope.positions() < np + n + m)
    throw ShapeError(describe("LlamaAttention", this->name()) + ": " + std::to_string(n) + " cached + " +
                     std::to_string(m) + " new positions of " + std::to_string(B) +
                     " sequences exceed the KV cache capacity " + std::to_string(cap));
  detail::llama_linear_inference<T>(q_proj, x, q_inf_, rows, route_[0]);  // [B·m, H·hd]
  detail::llama_linear_inference<T>(k_proj, x, k_inf_, rows, route_[1]);  // [B·m, KV·hd]
  detail::llama_linear_inference<T>(v_proj, x, v_inf_, rows, route_[2]);
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  Matrix<T>& context = buffer(kContext, B * m, H * hd);
  context.setZero();  // padding columns stay 0
  if (p_inf_.size() < np + n + m) p_inf_.resize(np + n + m);
  for (Index b = 0; b < B; ++b) {
    const Index f = kv.first[static_cast<std::size_t>(b)];
    const Index r0 = std::max<Index>(0, f - n);  // first valid new row of sequence b
    if (r0 < m) {                                // rotate the valid new rows: column c is at position np + c − f
      for (Index h = 0; h < H; ++h) rope.rotate(q_inf_.block(b * m + r0, h * hd, m - r0, hd), np + n + r0 - f);
      for (Index g = 0; g < KV; ++g) rope.rotate(k_inf_.block(b * m + r0, g * hd, m - r0, hd), np + n + r0 - f);
    }
    k_cache.middleRows(b * cap + n, m) = k_inf_.middleRows(b * m, m);
    v_cache.middleRows(b * cap + n, m) = v_inf_.middleRows(b * m, m);
    for (Index r = r0; r < m; ++r) {
      const Index visible = n + r - f + 1;  // causal: columns f .. n + r
      // [prefix; columns f ..] as in forward: the query is column np + visible − 1 of it; a window
      // keeps columns lo .. np + visible − 1 (pn prefix keys from ps, then kn cached columns from f + ko).
      const Index lo = window_start(np, visible - 1), ps = std::min(lo, np), pn = np - ps;
      const Index ko = std::max(lo, np) - np, kn = visible - ko;
      for (Index h = 0; h < H; ++h) {
        const Index g = h / rep;
        auto p = p_inf_.head(pn + kn);
        const auto q = q_inf_.block(b * m + r, h * hd, 1, hd);
        if (pn > 0) p.head(pn).noalias() = q * prefix->key.block(ps, g * hd, pn, hd).transpose();
        p.tail(kn).noalias() = q * k_cache.block(b * cap + f + ko, g * hd, kn, hd).transpose();
        p *= scale;
        const T mx = p.maxCoeff();
        p.array() = (p.array() - mx).exp();
        p /= p.sum();
        auto c = context.block(b * m + r, h * hd, 1, hd);
        c.noalias() = p.tail(kn) * v_cache.block(b * cap + f + ko, g * hd, kn, hd);
        if (pn > 0) c.noalias() += p.head(pn) * prefix->value.block(ps, g * hd, pn, hd);
      }
    }
  }
  detail::llama_linear_inference<T>(o_proj, context, y, rows, route_[3]);
  for (Index b = 0; b < B; ++b) {  // padding columns: 0
    const Index pad = std::min<Index>(m, std::max<Index>(0, kv.first[static_cast<std::size_t>(b)] - n));
    if (pad > 0) y.middleRows(b * m, pad).setZero();
  }
}

template <class T>
void LlamaMLP<T>::forward_inference(const ConstMatrixRef<T>& x, Matrix<T>& y, const detail::LlamaRowAdapters* rows) {
  detail::llama_linear_inference<T>(gate_proj, x, g_inf_, rows, route_[0]);
  detail::llama_linear_inference<T>(up_proj, x, u_inf_, rows, route_[1]);
  Matrix<T>& h = buffer(kH, g_inf_.rows(), g_inf_.cols());
  h.array() = g_inf_.array() / (T(1) + (-g_inf_.array()).exp()) * u_inf_.array();  // silu(g) ⊙ u
  detail::llama_linear_inference<T>(down_proj, h, y, rows, route_[2]);
}

template <class T>
void LlamaDecoderLayer<T>::forward_cached(const ConstMatrixRef<T>& x, LlamaKVCache<T>& kv, Index layer,
                                          const RotaryEmbedding<T>& rope, Matrix<T>& y, const PrefixKV<T>* prefix,
                                          const detail::LlamaRowAdapters* rows) {
  const Index n = x.rows();
  Matrix<T>& u = buffer(kU, n);
  Matrix<T>& a = buffer(kA, n);
  Matrix<T>& v = buffer(kV, n);
  Matrix<T>& f = buffer(kF, n);
  input_layernorm.forward(x, u, norm_inf_);
  self_attn.forward_cached(u, kv, layer, rope, a, prefix, rows);
  y = x + a;
  post_attention_layernorm.forward(y, v, norm_inf_);
  mlp.forward_inference(v, f, rows);
  y += f;
}

template <class T>
void LlamaModel<T>::forward_cached(const std::vector<Index>& ids, const SequenceLayout& layout,
                                   const RotaryEmbedding<T>& rope, LlamaKVCache<T>& kv, Matrix<T>& hidden,
                                   const Matrix<T>* prompt, const Matrix<T>* prefix,
                                   const std::vector<std::string>* adapter_names) {
  if (kv.k.size() != layers.size() || kv.v.size() != layers.size())
    throw ConfigError(describe("LlamaModel", this->name()) + ": KV cache has " + std::to_string(kv.k.size()) +
                      " layers, the model " + std::to_string(layers.size()) + " (use make_kv_cache)");
  const Index n = prompt != nullptr ? prompt->rows() : 0, m = layout.seq + n;
  const Index w = layers.empty() ? 0 : layers.front().self_attn.num_kv_heads() * layers.front().self_attn.head_dim();
  embed_tokens.forward(ids, x_, embed_inf_);
  Matrix<T>* cur = &x_;
  Matrix<T>* nxt = &y_;
  if (n > 0) {
    detail::llama_insert_prompt<T>(x_, layout, *prompt, xin_);
    cur = &xin_;
  }
  detail::LlamaRowAdapters rows{adapter_names, m};
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const detail::LlamaRowAdapters* ra = adapter_names != nullptr ? &rows : nullptr;
    if (prefix != nullptr) {
      const Index c = static_cast<Index>(i) * 2 * w;
      const PrefixKV<T> pkv{prefix->middleCols(c, w), prefix->middleCols(c + w, w)};
      layers[i].forward_cached(*cur, kv, static_cast<Index>(i), rope, *nxt, &pkv, ra);
    } else {
      layers[i].forward_cached(*cur, kv, static_cast<Index>(i), rope, *nxt, nullptr, ra);
    }
    std::swap(cur, nxt);
  }
  norm.forward(*cur, hidden, norm_inf_);
  kv.length += m;
}

template <class T>
LlamaKVCache<T> LlamaForCausalLM<T>::make_kv_cache(Index capacity, Index batch) const {
  if (capacity <= 0) throw ConfigError("make_kv_cache: capacity must be > 0, got " + std::to_string(capacity));
  if (batch <= 0) throw ConfigError("make_kv_cache: batch must be > 0, got " + std::to_string(batch));
  LlamaKVCache<T> kv;
  kv.batch = batch;
  kv.first.assign(static_cast<std::size_t>(batch), 0);
  const Index w = config_.kv_heads() * config_.resolved_head_dim();
  for (std::size_t i = 0; i < model.layers.size(); ++i) {
    kv.k.emplace_back(batch * capacity, w);
    kv.v.emplace_back(batch * capacity, w);
  }
  return kv;
}

template <class T>
void LlamaForCausalLM<T>::head_inference(const Matrix<T>& hidden, Matrix<T>& logits,
                                         const detail::LlamaRowAdapters* rows) {
  if (tied()) {
    logits.resize(hidden.rows(), vocab_size());
    gemm(logits, hidden, model.embed_tokens.weight.value.transpose());
  } else {
    detail::llama_linear_inference<T>(lm_head, hidden, logits, rows, head_route_);
  }
}

template <class T>
void LlamaForCausalLM<T>::forward_cached(const std::vector<Index>& ids, const SequenceLayout& layout,
                                         LlamaKVCache<T>& kv, Matrix<T>& logits,
                                         const std::vector<std::string>& adapter_names) {
  const std::string who = describe("LlamaForCausalLM", this->name());
  if (ids.empty()) throw ShapeError(who + ": forward_cached needs at least one token");
  layout.validate(who, static_cast<Index>(ids.size()));
  if (layout.batch != kv.batch || static_cast<Index>(kv.first.size()) != kv.batch)
    throw ShapeError(who + ": " + std::to_string(layout.batch) + " sequences for a KV cache of batch " +
                     std::to_string(kv.batch));
  if (layout.padded() && (!layout.left_padded || kv.length > 0))
    throw ShapeError(who + ": only the first chunk of a cached batch may be padded, and only on the left");
  if (!adapter_names.empty()) {
    if (static_cast<Index>(adapter_names.size()) != kv.batch)
      throw ShapeError(who + ": " + std::to_string(adapter_names.size()) + " adapter names for " +
                       std::to_string(kv.batch) + " sequences");
    const auto hosts = [&] {
      std::vector<AdaptedLinear<T>*> h;
      this->visit_modules([&](const std::string&, Module<T>& mod) {
        if (auto* a = dynamic_cast<AdaptedLinear<T>*>(&mod)) h.push_back(a);
      });
      return h;
    }();
    for (const std::string& name : adapter_names) {
      if (detail::llama_no_adapter(name)) continue;
      bool found = false;
      for (const auto* h : hosts) found = found || h->adapter_index(name) >= 0;
      if (!found)
        throw ConfigError(who + ": no linear holds adapter \"" + name + "\" (per-row adapter names: an adapter, \"" +
                          kNoAdapterName + "\" or \"__base__\")");
    }
  }
  const Index n = kv.length == 0 ? prompt_length() : 0;  // a prompt goes into the first chunk
  const Index m = layout.seq, end = kv.length + m + n;
  if (end > kv.capacity())
    throw ShapeError(who + ": " + std::to_string(end) + " positions exceed the KV cache capacity " +
                     std::to_string(kv.capacity()));
  if (kv.length == 0)
    for (Index b = 0; b < kv.batch; ++b) kv.first[static_cast<std::size_t>(b)] = layout.first(b);
  const bool was_training = this->training();
  if (was_training) this->eval();  // no dropout in inference
  rope_.reserve(end + prefix_length());
  const detail::LlamaRowAdapters rows{adapter_names.empty() ? nullptr : &adapter_names, m};
  try {
    const Matrix<T>* prefix = nullptr;
    if (prefix_encoder) {
      prefix_encoder->forward(prefix_inf_);
      prefix = &prefix_inf_.table;
    }
    model.forward_cached(ids, layout, rope_, kv, hidden_inf_, n > 0 ? &prompt_encoder->embedding.value : nullptr,
                         prefix, adapter_names.empty() ? nullptr : &adapter_names);
    if (n > 0) {  // the ids' rows only: drop the virtual tokens [f, f + n) of each sequence
      hidden_sel_.resize(kv.batch * m, hidden_inf_.cols());
      for (Index b = 0; b < kv.batch; ++b) {
        const Index f = layout.first(b);
        if (f > 0) hidden_sel_.middleRows(b * m, f) = hidden_inf_.middleRows(b * (m + n), f);
        hidden_sel_.middleRows(b * m + f, m - f) = hidden_inf_.middleRows(b * (m + n) + f + n, m - f);
      }
      head_inference(hidden_sel_, logits, rows.names != nullptr ? &rows : nullptr);
    } else {
      head_inference(hidden_inf_, logits, rows.names != nullptr ? &rows : nullptr);
    }
  } catch (...) {
    if (was_training) this->train();
    throw;
  }
  if (was_training) this->train();
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
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
