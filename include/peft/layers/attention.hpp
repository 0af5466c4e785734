#pragma once
// Multi-head scaled dot-product attention over a batch of sequences (Vaswani et al., 2017,
// "Attention Is All You Need"), with the hooks PEFT methods need:
//
//   Q = q_proj(x),  K = k_proj(x),  V = v_proj(x)                             [B·S, d]
//   per sequence b (valid length L_b) and head h (columns h·d_h .. h·d_h + d_h − 1, d_h = d / H):
//     K̃ = [P_K; K_b],  Ṽ = [P_V; V_b]                        [l + L_b, d_h]
//     A = softmax_row(Q_b K̃ᵀ / √d_h  + mask)                 [L_b, l + L_b]
//     C_b = A Ṽ                                               [L_b, d_h]
//   y = C W_oᵀ + b_o                                          [B·S, d]
//
// - q_proj, k_proj, v_proj, out_proj are adapted linears (LoRALinear): any method targets them by
//   name. add_ia3 places (IA)³ adapters on k_proj and v_proj (K = (x W_kᵀ + b_k) ⊙ l_k, named
//   `k_proj.ia3_l.<adapter>`); they scale the projected keys/values only, never the prefix (PEFT's
//   prefix K/V bypass k_proj as well).
// - P_K, P_V [l, d]: optional prefix keys/values (Li & Liang, 2021, "Prefix-Tuning"), passed per call
//   (PrefixKV) by their owner (PrefixAttention); they are always visible: neither the causal mask nor
//   the key-padding mask ever hides them, and they emit no queries. Backward returns their gradients
//   (PrefixGrad, accumulated with +=).
// - Masks: key-padding (keys t' ≥ L_b are excluded) and optional causal (query t sees keys t' ≤ t).
//   Masked entries are excluded from the softmax (probability exactly 0), not added as −∞.
// - Padding queries: rows t ≥ L_b of the output are exactly zero, and backward ignores dy on those
//   rows (a constant output has zero derivative). So padding content never reaches a valid row.
// - Softmax is stabilised by subtracting the row maximum: softmax(s) = exp(s − max s) / Σ exp(s − max s).
//
// Backward (per b, h, with G = ∂L/∂C_b):
//   dṼ = Aᵀ G,  dA = G Ṽᵀ,  dS = A ⊙ (dA − rowsum(A ⊙ dA)) / √d_h,  dQ_b = dS K̃,  dK̃ = dSᵀ Q_b.
//
// Memory: the loops run over (b, h) with reused [S, l + S] scratch blocks, so at most one score
// block per thread is live at a time (forward: the scores; backward: the recomputed probabilities
// A and their gradient dA, one block each, whatever B and H). With OpenMP the (b, h) items are
// split between threads (core/parallel.hpp). The Cache does not keep the probabilities
// (B·H·S·(l + S) scalars, the largest tensor of a long sequence): it keeps each query row's
// maximum m and normaliser z = Σ exp(s − m) (2·B·H·S scalars), and backward recomputes the block
// A = exp(s − m) / z from Q and K̃, bit for bit the forward's values (the same products and the
// same operations), as FlashAttention does (Dao et al., 2022). That costs one Q K̃ᵀ product per
// block in backward, a small part of the layer's work next to the four projections.
#include <cmath>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parallel.hpp"
#include "peft/core/scratch.hpp"
#include "peft/core/sequence.hpp"
#include "peft/layers/ia3.hpp"
#include "peft/layers/lora_linear.hpp"
#include "peft/layers/lora_mixed_batch.hpp"

namespace peft {

/// Prefix keys and values for one attention layer: [l, d] each, columns split into heads like K and V.
/// Views (no copy) are fine: forward copies what backward needs into its Cache.
template <class T>
struct PrefixKV {
  ConstMatrixRef<T> key;
  ConstMatrixRef<T> value;
};

/// Where backward accumulates (+=) the prefix gradients: [l, d] each (views into a gradient table).
template <class T>
struct PrefixGrad {
  MatrixRef<T> key;
  MatrixRef<T> value;
};

struct AttentionOptions {
  bool bias = true;     ///< biases on the four projections
  bool causal = false;  ///< query t attends to keys t' ≤ t (the prefix is always visible)
};

template <class T>
class MultiHeadAttention : public Module<T> {
 public:
  using LinearCache = typename LoRALinear<T>::Cache;

  /// What backward needs. The softmax statistics of query t of (b, h) are entry (b·H + h)·S + t
  /// of row_max and row_sum (padding queries: 0); the probabilities themselves are recomputed.
  struct Cache {
    SequenceLayout layout;
    LinearCache q, k, v, o;
    Matrix<T> x;                   ///< the input [B·S, d], once for q, k and v, when one of them reads it
    Matrix<T> Q, K, V;             ///< [B·S, d] projected (by the adapted linears, (IA)³ included)
    Matrix<T> prefix_k, prefix_v;  ///< [l, d] copies of the prefix used; empty without prefix
    ColVector<T> row_max;          ///< [B·H·S] m = max of the scaled scores of the row
    ColVector<T> row_sum;          ///< [B·H·S] z = Σ exp(s − m) over the visible keys
    Index prefix_len = 0;
    bool causal = false;
  };

  MultiHeadAttention() = default;

  /// dim must be divisible by num_heads. Projections get nn.Linear's init.
  MultiHeadAttention(Index dim, Index num_heads, Rng& rng, AttentionOptions options = {}, std::string name = "");

  LoRALinear<T> q_proj, k_proj, v_proj, out_proj;

  Index dim() const { return q_proj.out_features(); }
  Index num_heads() const { return num_heads_; }
  Index head_dim() const { return dim() / num_heads_; }
  bool causal() const { return causal_; }
  void set_causal(bool on) { causal_ = on; }

  /// Freezes the four projections' base weights and biases (LoRA / IA3 parameters stay as they are).
  void freeze_base() {
    q_proj.freeze_base();
    k_proj.freeze_base();
    v_proj.freeze_base();
    out_proj.freeze_base();
  }

  // ---- (IA)³ --------------------------------------------------------------------------------

  /// Adds (IA)³ adapters (ones) on the keys and/or values (k_proj, v_proj: output scaling), next to
  /// the adapters active there. One (IA)³ adapter per attention layer.
  void add_ia3(const std::string& adapter = "default", bool keys = true, bool values = true);
  void remove_ia3();
  /// The (IA)³ adapters on k_proj / v_proj (nullptr when absent).
  IA3Method<T>* ia3_k() { return ia3_adapter_of(k_proj); }
  IA3Method<T>* ia3_v() { return ia3_adapter_of(v_proj); }
  bool has_ia3() const { return ia3_adapter_of(k_proj) != nullptr || ia3_adapter_of(v_proj) != nullptr; }
  bool ia3_merged() const {
    const std::string n = ia3_adapter_name();
    return !n.empty() && (ia3_merged_in(k_proj) || ia3_merged_in(v_proj));
  }
  std::string ia3_adapter_name() const {
    if (const auto* k = ia3_adapter_of(k_proj)) return k->name();
    if (const auto* v = ia3_adapter_of(v_proj)) return v->name();
    return std::string();
  }
  /// Folds l_k, l_v into the rows of W_k, b_k and W_v, b_v; forward then skips the scaling.
  void merge_ia3();
  /// Unmerges k_proj and v_proj (every adapter merged there).
  void unmerge_ia3() {
    k_proj.unmerge();
    v_proj.unmerge();
  }

  // ---- forward / backward -------------------------------------------------------------------

  /// x [B·S, d] laid out as `layout`; y [B·S, d] (resized only if needed). `prefix` may be null.
  void forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y, Cache& cache,
               const PrefixKV<T>* prefix = nullptr);

  Matrix<T> forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Cache& cache,
                    const PrefixKV<T>* prefix = nullptr) {
    Matrix<T> y;
    forward(x, layout, y, cache, prefix);
    return y;
  }

  /// The same output with nothing kept for backward (the projections' inference paths, no softmax
  /// statistics): evaluation and serving. Buffers are members, reused across calls. With `adapters`
  /// (rows_per_seq = layout.seq), sequence b's rows go through the projections' adapter names[b]
  /// (lora_mixed_batch.hpp).
  void forward_inference(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y,
                         const PrefixKV<T>* prefix = nullptr, const SequenceAdapters* adapters = nullptr);

  /// Attention probabilities of sequence b and head h [L_b, l + L_b] (prefix keys first; masked
  /// entries 0), recomputed from the cache exactly as backward does: for inspection (attention
  /// maps); training never needs them.
  Matrix<T> attention_probs(const Cache& cache, Index b, Index h) const;

  /// Accumulates parameter gradients (LoRA / base / IA3 as trainable), writes dx [B·S, d] unless
  /// null, and accumulates the prefix gradients into *dprefix unless null.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx, PrefixGrad<T>* dprefix = nullptr);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("q_proj", q_proj);
    fn("k_proj", k_proj);
    fn("v_proj", v_proj);
    fn("out_proj", out_proj);
  }

 private:
  /// Keys query t of a length-Lb sequence sees: the whole prefix, then its own keys (all L_b, or
  /// t + 1 when causal). The rest of its score row is masked.
  static Index visible_keys(const Cache& cache, Index Lb, Index t) {
    return visible_keys(cache.prefix_len, cache.causal, Lb, t);
  }
  static Index visible_keys(Index l, bool causal, Index Lb, Index t) { return l + (causal ? t + 1 : Lb); }

  /// Validates the inputs of a forward; returns the prefix length l (0 without prefix).
  Index check_forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, const PrefixKV<T>* prefix) const;

  /// P [L_b, l + L_b] = (Q_b K̃ᵀ) / √d_h for (b, h), masked entries 0; forward and backward both
  /// use this, so backward's recomputed probabilities equal forward's bit for bit.
  void scaled_scores(const Cache& cache, Index b, Index h, Eigen::Block<Matrix<T>> P) const {
    scaled_scores(cache.Q, cache.K, cache.prefix_k, cache.layout.seq, cache.causal, b, h, P);
  }
  /// The same from Q, K [B·S, d] and the prefix keys [l, d] (0 rows: no prefix).
  void scaled_scores(const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& prefix_k, Index S, bool causal, Index b,
                     Index h, Eigen::Block<Matrix<T>> P) const;

  static void zero_padding_rows(const SequenceLayout& layout, Matrix<T>& m) {
    for (Index b = 0; b < layout.batch; ++b)
      if (layout.length(b) < layout.seq)
        m.middleRows(b * layout.seq + layout.length(b), layout.seq - layout.length(b)).setZero();
  }

  Index num_heads_ = 1;
  bool causal_ = false;
  // Scratch reused across calls (the Cache holds everything backward needs). The [B·S, d]
  // temporaries (forward's context C; backward's masked dy, dC, dQ, dK, dV and the k/v input-gradient
  // part) are the thread's scratch (core/scratch.hpp), shared by every attention layer; the small
  // per-thread probability blocks stay here.
  enum ScratchSlot { kContext, kDyMasked, kDContext, kDQ, kDK, kDV, kDxPart };
  Matrix<T> scores_;  ///< forward and backward: one [S, l + S] probability block, reused for every (b, h)
  Matrix<T> dprobs_;  ///< backward: one [S, l + S] block, reused for every (b, h)
  // forward_inference's own buffers (evaluation between training steps never resizes forward's)
  Matrix<T> q_inf_, k_inf_, v_inf_, context_inf_;  ///< Q, K, V, C [B·S, d]
  RoutedWorkspace<T> route_[4];                    ///< per-sequence adapter routing of q, k, v, out
  Matrix<T> pk_inf_, pv_inf_;                      ///< the prefix keys / values [l, d] (copied as forward copies them)
};

// ---- MultiHeadAttention members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
MultiHeadAttention<T>::MultiHeadAttention(Index dim, Index num_heads, Rng& rng, AttentionOptions options,
                                          std::string name)
    : Module<T>(std::move(name)), num_heads_(num_heads), causal_(options.causal) {
  const std::string who = describe("MultiHeadAttention", this->name());
  if (dim <= 0 || num_heads <= 0)
    throw ConfigError(who + ": dim and num_heads must be > 0, got dim=" + std::to_string(dim) +
                      ", num_heads=" + std::to_string(num_heads));
  if (dim % num_heads != 0)
    throw ConfigError(who + ": dim " + std::to_string(dim) + " is not divisible by num_heads " +
                      std::to_string(num_heads));
  q_proj = LoRALinear<T>(dim, dim, rng, options.bias);
  k_proj = LoRALinear<T>(dim, dim, rng, options.bias);
  v_proj = LoRALinear<T>(dim, dim, rng, options.bias);
  out_proj = LoRALinear<T>(dim, dim, rng, options.bias);
  this->set_name(this->name());
}

template <class T>
void MultiHeadAttention<T>::add_ia3(const std::string& adapter, bool keys, bool values) {
  const std::string who = describe("MultiHeadAttention", this->name());
  if (has_ia3()) throw ConfigError(who + ": already has an (IA)^3 adapter \"" + ia3_adapter_name() + "\"");
  if (!keys && !values) throw ConfigError(who + ": add_ia3 needs keys and/or values");
  if (keys) add_ia3_adapter(k_proj, adapter, false);
  if (values) add_ia3_adapter(v_proj, adapter, false);
}

template <class T>
void MultiHeadAttention<T>::remove_ia3() {
  if (ia3_merged())
    throw ConfigError(describe("MultiHeadAttention", this->name()) + ": unmerge (IA)^3 before removing it");
  const std::string n = ia3_adapter_name();
  for (LoRALinear<T>* p : {&k_proj, &v_proj})
    if (ia3_adapter_of(*p) != nullptr) p->delete_adapter(n, "IA3");
}

template <class T>
void MultiHeadAttention<T>::merge_ia3() {
  if (!has_ia3()) throw ConfigError(describe("MultiHeadAttention", this->name()) + ": has no (IA)^3 adapter to merge");
  const std::string n = ia3_adapter_name();
  for (LoRALinear<T>* p : {&k_proj, &v_proj})
    if (ia3_adapter_of(*p) != nullptr) p->merge({n}, "IA3");
}

template <class T>
Index MultiHeadAttention<T>::check_forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout,
                                           const PrefixKV<T>* prefix) const {
  layout.validate("MultiHeadAttention", this->name(), x.rows());
  layout.require_right_padded("MultiHeadAttention", this->name());
  check::input_features("MultiHeadAttention", this->name(), x.cols(), dim());
  if (prefix == nullptr) return 0;
  const Index l = prefix->key.rows();
  if (l < 1)
    throw ShapeError(describe("MultiHeadAttention", this->name()) +
                     ": prefix has 0 rows, expected >= 1 (pass no prefix instead)");
  check::shape("MultiHeadAttention", this->name(), "prefix key", prefix->key.rows(), prefix->key.cols(), l, dim());
  check::shape("MultiHeadAttention", this->name(), "prefix value", prefix->value.rows(), prefix->value.cols(), l,
               dim());
  return l;
}

template <class T>
void MultiHeadAttention<T>::forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y,
                                    Cache& cache, const PrefixKV<T>* prefix) {
  const Index l = check_forward(x, layout, prefix);
  const Index d = dim(), H = num_heads_, hd = head_dim(), B = layout.batch, S = layout.seq;
  if (prefix != nullptr) {
    cache.prefix_k = prefix->key;
    cache.prefix_v = prefix->value;
  } else {
    cache.prefix_k.resize(0, 0);
    cache.prefix_v.resize(0, 0);
  }
  cache.layout = layout;
  cache.prefix_len = l;
  cache.causal = causal_;

  q_proj.forward_shared_input(x, cache.Q, cache.q);  // one copy of x for the three, below
  k_proj.forward_shared_input(x, cache.K, cache.k);
  v_proj.forward_shared_input(x, cache.V, cache.v);
  keep_shared_input<T>(x, cache.x, {&cache.q, &cache.k, &cache.v});

  cache.row_max.setZero(B * H * S);
  cache.row_sum.setZero(B * H * S);
  Matrix<T>& context = scratch<T>(ScratchOwner::MultiHeadAttention, kContext, B * S, d);
  context.setZero();  // padding query rows stay 0
  // One item per (sequence, head), split between threads (core/parallel.hpp); each thread has its
  // own [S, l + S] block of scores_.
  const int threads = parallel_threads(B * H, 4.0 * B * H * S * (l + S) * hd);
  if (scores_.rows() < threads * S || scores_.cols() < l + S) scores_.resize(threads * S, l + S);
  parallel_for(B * H, threads, [&](Index begin, Index end, int thread) {
    for (Index i = begin; i < end; ++i) {
      const Index b = i / H, h = i % H, Lb = layout.length(b);
      auto P = scores_.block(thread * S, 0, Lb, l + Lb);
      scaled_scores(cache, b, h, P);
      const Index first = (b * H + h) * S;
      for (Index t = 0; t < Lb; ++t) {
        auto row = P.row(t).head(visible_keys(cache, Lb, t));
        const T m = row.maxCoeff();
        row.array() = (row.array() - m).exp();  // exp(s − max s) ≤ 1: no overflow
        const T z = row.sum();
        row /= z;
        cache.row_max(first + t) = m;
        cache.row_sum(first + t) = z;
      }
      auto c = context.block(b * S, h * hd, Lb, hd);
      c.noalias() = P.middleCols(l, Lb) * cache.V.block(b * S, h * hd, Lb, hd);         // A_keys V_b
      if (l > 0) c.noalias() += P.leftCols(l) * cache.prefix_v.middleCols(h * hd, hd);  // + A_prefix P_V
    }
  });
  out_proj.forward(context, y, cache.o);
  zero_padding_rows(layout, y);
}

template <class T>
void MultiHeadAttention<T>::forward_inference(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y,
                                              const PrefixKV<T>* prefix, const SequenceAdapters* adapters) {
  const Index l = check_forward(x, layout, prefix);
  const Index d = dim(), H = num_heads_, hd = head_dim(), B = layout.batch, S = layout.seq;
  if (prefix != nullptr) {  // copied as forward() copies them, so the products are forward's own
    pk_inf_ = prefix->key;
    pv_inf_ = prefix->value;
  } else {
    pk_inf_.resize(0, 0);
    pv_inf_.resize(0, 0);
  }
  forward_inference_routed<T>(q_proj, x, q_inf_, adapters, route_[0]);
  forward_inference_routed<T>(k_proj, x, k_inf_, adapters, route_[1]);
  forward_inference_routed<T>(v_proj, x, v_inf_, adapters, route_[2]);
  context_inf_.setZero(B * S, d);  // padding query rows stay 0
  if (scores_.rows() < S || scores_.cols() < l + S) scores_.resize(S, l + S);
  for (Index b = 0; b < B; ++b) {
    const Index Lb = layout.length(b);
    for (Index h = 0; h < H; ++h) {
      auto P = scores_.topLeftCorner(Lb, l + Lb);
      scaled_scores(q_inf_, k_inf_, pk_inf_, S, causal_, b, h, P);
      for (Index t = 0; t < Lb; ++t) {  // softmax, as forward() computes it
        auto row = P.row(t).head(visible_keys(l, causal_, Lb, t));
        const T m = row.maxCoeff();
        row.array() = (row.array() - m).exp();
        const T z = row.sum();
        row /= z;
      }
      auto c = context_inf_.block(b * S, h * hd, Lb, hd);
      c.noalias() = P.middleCols(l, Lb) * v_inf_.block(b * S, h * hd, Lb, hd);   // A_keys V_b
      if (l > 0) c.noalias() += P.leftCols(l) * pv_inf_.middleCols(h * hd, hd);  // + A_prefix P_V
    }
  }
  forward_inference_routed<T>(out_proj, context_inf_, y, adapters, route_[3]);
  zero_padding_rows(layout, y);
}

template <class T>
Matrix<T> MultiHeadAttention<T>::attention_probs(const Cache& cache, Index b, Index h) const {
  const std::string who = describe("MultiHeadAttention", this->name());
  if (b < 0 || b >= cache.layout.batch || h < 0 || h >= num_heads_)
    throw ShapeError(who + ": attention_probs(b = " + std::to_string(b) + ", h = " + std::to_string(h) +
                     ") is outside batch " + std::to_string(cache.layout.batch) + " x heads " +
                     std::to_string(num_heads_));
  if (cache.row_sum.size() != cache.layout.batch * num_heads_ * cache.layout.seq)
    throw ConfigError(who + ": attention_probs needs a cache filled by this layer's forward");
  const Index Lb = cache.layout.length(b), l = cache.prefix_len;
  Matrix<T> P(Lb, l + Lb);
  Eigen::Block<Matrix<T>> all = P.topLeftCorner(Lb, l + Lb);
  scaled_scores(cache, b, h, all);
  const Index first = (b * num_heads_ + h) * cache.layout.seq;
  for (Index t = 0; t < Lb; ++t) {
    auto row = P.row(t).head(visible_keys(cache, Lb, t));
    row.array() = (row.array() - cache.row_max(first + t)).exp();
    row /= cache.row_sum(first + t);
  }
  return P;
}

template <class T>
void MultiHeadAttention<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx,
                                     PrefixGrad<T>* dprefix) {
  const SequenceLayout& layout = cache.layout;
  const Index d = dim(), H = num_heads_, hd = head_dim(), B = layout.batch, S = layout.seq;
  const Index l = cache.prefix_len;
  check::shape("MultiHeadAttention", this->name(), "output gradient", dy.rows(), dy.cols(), layout.rows(), d);
  if (ia3_merged())
    throw ConfigError(describe("MultiHeadAttention", this->name()) +
                      ": cannot train while (IA)^3 is merged; unmerge first");
  if (dprefix != nullptr) {
    if (l == 0)
      throw ConfigError(describe("MultiHeadAttention", this->name()) +
                        ": prefix gradients requested but the forward pass had no prefix");
    check::shape("MultiHeadAttention", this->name(), "prefix key gradient", dprefix->key.rows(), dprefix->key.cols(), l,
                 d);
    check::shape("MultiHeadAttention", this->name(), "prefix value gradient", dprefix->value.rows(),
                 dprefix->value.cols(), l, d);
  }

  // Padding rows of y are constant 0: their incoming gradient is dropped.
  const auto buffer = [&](ScratchSlot slot) -> Matrix<T>& {
    return scratch<T>(ScratchOwner::MultiHeadAttention, slot, B * S, d);
  };
  Matrix<T>& dcontext = buffer(kDContext);
  if (layout.padded()) {
    Matrix<T>& dy_masked = buffer(kDyMasked);
    dy_masked = dy;
    zero_padding_rows(layout, dy_masked);
    out_proj.backward(cache.o, dy_masked, &dcontext);  // dC = dY W_o   [B·S, d]
  } else {
    out_proj.backward(cache.o, dy, &dcontext);
  }

  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  Matrix<T>& dQ = buffer(kDQ);
  Matrix<T>& dK = buffer(kDK);
  Matrix<T>& dV = buffer(kDV);
  dQ.setZero();
  dK.setZero();
  dV.setZero();
  // One item per (sequence, head), split between threads with their own scores_ / dprobs_
  // blocks. The prefix gradients sum over sequences: with them, items run head-major and a thread
  // owns whole heads (items = H, each looping over the sequences).
  const bool by_head = dprefix != nullptr;
  const Index items = by_head ? H : B * H;
  const int threads = parallel_threads(items, 8.0 * B * H * S * (l + S) * hd);
  if (dprobs_.rows() < threads * S || dprobs_.cols() < l + S) dprobs_.resize(threads * S, l + S);
  if (scores_.rows() < threads * S || scores_.cols() < l + S) scores_.resize(threads * S, l + S);
  const auto one = [&](Index b, Index h, int thread) {
    const Index Lb = layout.length(b);
    // Recompute A = exp(s − m) / z exactly as forward left it (masked entries 0).
    auto P = scores_.block(thread * S, 0, Lb, l + Lb);
    scaled_scores(cache, b, h, P);
    const Index first = (b * H + h) * S;
    for (Index t = 0; t < Lb; ++t) {
      auto row = P.row(t).head(visible_keys(cache, Lb, t));
      row.array() = (row.array() - cache.row_max(first + t)).exp();
      row /= cache.row_sum(first + t);
    }
    const auto G = dcontext.block(b * S, h * hd, Lb, hd);
    const auto q = cache.Q.block(b * S, h * hd, Lb, hd);
    const auto k = cache.K.block(b * S, h * hd, Lb, hd);
    const auto v = cache.V.block(b * S, h * hd, Lb, hd);
    auto dS = dprobs_.block(thread * S, 0, Lb, l + Lb);
    dV.block(b * S, h * hd, Lb, hd).noalias() = P.middleCols(l, Lb).transpose() * G;  // dV_b = A_keysᵀ G
    dS.middleCols(l, Lb).noalias() = G * v.transpose();                               // dA_keys = G V_bᵀ
    if (l > 0) {
      const auto pv = cache.prefix_v.middleCols(h * hd, hd);
      if (dprefix != nullptr)
        dprefix->value.middleCols(h * hd, hd).noalias() += P.leftCols(l).transpose() * G;  // dP_V += A_prefixᵀ G
      dS.leftCols(l).noalias() = G * pv.transpose();                                       // dA_prefix = G P_Vᵀ
    }
    for (Index t = 0; t < Lb; ++t) {  // softmax backward: dS = A ⊙ (dA − Σ A ⊙ dA) · scale
      const T dot = (P.row(t).array() * dS.row(t).array()).sum();
      dS.row(t).array() = scale * P.row(t).array() * (dS.row(t).array() - dot);
    }
    auto dq = dQ.block(b * S, h * hd, Lb, hd);
    dq.noalias() = dS.middleCols(l, Lb) * k;                                           // dQ_b = dS_keys K_b
    dK.block(b * S, h * hd, Lb, hd).noalias() = dS.middleCols(l, Lb).transpose() * q;  // dK_b = dS_keysᵀ Q_b
    if (l > 0) {
      dq.noalias() += dS.leftCols(l) * cache.prefix_k.middleCols(h * hd, hd);  // + dS_prefix P_K
      if (dprefix != nullptr)
        dprefix->key.middleCols(h * hd, hd).noalias() += dS.leftCols(l).transpose() * q;  // dP_K += dS_prefixᵀ Q_b
    }
  };
  parallel_for(items, threads, [&](Index begin, Index end, int thread) {
    for (Index i = begin; i < end; ++i) {
      if (by_head) {
        for (Index b = 0; b < B; ++b) one(b, i, thread);
      } else {
        one(i / H, i % H, thread);
      }
    }
  });

  q_proj.backward(cache.q, dQ, dx, cache.x);
  Matrix<T>* part = dx != nullptr ? &buffer(kDxPart) : nullptr;
  k_proj.backward(cache.k, dK, part, cache.x);
  if (dx != nullptr) *dx += *part;
  v_proj.backward(cache.v, dV, part, cache.x);
  if (dx != nullptr) *dx += *part;
}

template <class T>
void MultiHeadAttention<T>::scaled_scores(const Matrix<T>& Q, const Matrix<T>& K, const Matrix<T>& prefix_k, Index S,
                                          bool causal, Index b, Index h, Eigen::Block<Matrix<T>> P) const {
  const Index hd = head_dim(), l = prefix_k.rows(), Lb = P.rows();
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));
  const auto q = Q.block(b * S, h * hd, Lb, hd);
  if (l > 0) P.leftCols(l).noalias() = q * prefix_k.middleCols(h * hd, hd).transpose();  // Q P_Kᵀ
  P.middleCols(l, Lb).noalias() = q * K.block(b * S, h * hd, Lb, hd).transpose();        // Q K_bᵀ
  for (Index t = 0; t < Lb; ++t) {
    const Index visible = visible_keys(l, causal, Lb, t);
    P.row(t).head(visible) *= scale;
    if (visible < l + Lb) P.row(t).tail(l + Lb - visible).setZero();
  }
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class MultiHeadAttention<float>;
extern template class MultiHeadAttention<double>;
}  // namespace peft
#endif
