#pragma once
// A small transformer encoder with a classification head (Vaswani et al., 2017; ViT-style patch
// input: Dosovitskiy et al., 2021), built only from the library's layers, hosting every PEFT method:
// LoRA on any linear, adapters (Houlsby / Pfeiffer / parallel), (IA)³, prefix tuning, prompt tuning.
//
//   input   token ids → Embedding `embed_tokens`           or  features [B·S, p] → Linear `patch_embed`
//           (+ learned positions `embed_positions` P[t], t = 0 .. S−1, when max_seq_len > 0)
//   prompt  optional SoftPrompt `prompt_encoder`: n rows prepended to every sequence, AFTER the
//           positions (prompt rows carry no position; real tokens keep theirs). Layout S → n + S.
//   blocks  `layers.i`, i = 0 .. N−1:
//             pre-norm:   u = LN1(x);  a = Ad_attn(Attn(u));  h = x + a
//                         v = LN2(h);  f = FFN(v) [+ s·Ad_par(v)] or Ad_ffn(FFN(v));  y = h + f
//             post-norm:  h = LN1(x + Ad_attn(Attn(x)))
//                         y = LN2(h + f),  f as above with v = h
//           (Ad_attn / Ad_ffn: sequential adapters, z + s·g(z); Ad_par: He et al.'s parallel adapter
//           fed with the FFN's input. Houlsby = Ad_attn + Ad_ffn, Pfeiffer = Ad_ffn, Parallel = Ad_par.)
//           Prefix tuning: `prefix_encoder` (PrefixAttention) gives layer i its P_K, P_V.
//   norm    final LayerNorm `norm` (optional; standard with pre-norm)
//   pool    mean over the valid real tokens of each sequence, or its first real token; prompt
//           positions are never pooled ("never scored") and padding never is either
//   head    Linear `classifier`  → logits [B, num_classes]; a ModulesToSave host
//           (layers/modules_to_save.hpp): with modules_to_save = {"classifier"} each adapter trains
//           its own copy (`classifier.modules_to_save.<adapter>.weight`), the original stays frozen
//
// Every linear is a LoRALinear with a dotted name: `patch_embed`, `layers.i.attn.{q,k,v,out}_proj`,
// `layers.i.ffn.fc1`, `layers.i.ffn.fc2`, `classifier` (see linear_names()).
//
// Backward by hand: each block keeps in its Cache what its sub-layers' backward needs (LayerNorm's
// x̂, attention probabilities, LoRA inputs...), so several forwards with separate caches and then
// their backwards work. Forward temporaries and backward scratch are members, reused across calls.
#include <optional>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parallel.hpp"
#include "peft/core/scratch.hpp"
#include "peft/core/sequence.hpp"
#include "peft/layers/activations.hpp"
#include "peft/layers/adapter.hpp"
#include "peft/layers/attention.hpp"
#include "peft/layers/embedding.hpp"
#include "peft/layers/feed_forward.hpp"
#include "peft/layers/layer_norm.hpp"
#include "peft/layers/lora_linear.hpp"
#include "peft/layers/modules_to_save.hpp"
#include "peft/layers/prefix_attention.hpp"
#include "peft/layers/soft_prompt.hpp"

namespace peft {

enum class NormPlacement { Pre, Post };
enum class Pooling { Mean, First };

struct TransformerConfig {
  Index vocab_size = 0;   ///< > 0: token-id input (Embedding `embed_tokens`)
  Index input_dim = 0;    ///< > 0: continuous input [B·S, input_dim] (LoRALinear `patch_embed`)
  Index max_seq_len = 0;  ///< > 0: learned positions `embed_positions` [max_seq_len, dim]
  Index dim = 64;
  Index num_heads = 4;
  Index ffn_dim = 256;
  Index num_layers = 2;
  Index num_classes = 2;
  NormPlacement norm = NormPlacement::Pre;
  Pooling pooling = Pooling::Mean;
  Activation activation = Activation::GELU;
  double norm_eps = 1e-5;
  bool causal = false;     ///< causal self-attention (prefix rows stay visible)
  bool final_norm = true;  ///< LayerNorm `norm` after the last block
};

/// ViT-style patch extraction for single-channel images (Dosovitskiy et al., 2021): images
/// [N, H·W] (row-major pixels) → out [N·G, p_h·p_w], G = (H/p_h)·(W/p_w) patches per image, ordered
/// row-major over the patch grid (patch (i, j) of image n is row n·G + i·(W/p_w) + j), pixels inside
/// a patch row-major. Feed `out` with SequenceLayout(N, G) to a feature-input TransformerClassifier
/// (input_dim = p_h·p_w). Fashion-MNIST 28×28: 4×4 patches → G = 49 tokens of 16 px; 7×7 → 16 of 49.
template <class T>
void patchify(const ConstMatrixRef<T>& images, Index height, Index width, Index patch_h, Index patch_w,
              Matrix<T>& out) {
  if (height <= 0 || width <= 0 || patch_h <= 0 || patch_w <= 0 || height % patch_h != 0 || width % patch_w != 0)
    throw ShapeError("patchify: image " + std::to_string(height) + "x" + std::to_string(width) +
                     " does not split into whole " + std::to_string(patch_h) + "x" + std::to_string(patch_w) +
                     " patches");
  if (images.cols() != height * width)
    throw ShapeError("patchify: images have " + std::to_string(images.cols()) + " pixels, expected " +
                     std::to_string(height) + "x" + std::to_string(width) + " = " + std::to_string(height * width));
  const Index gh = height / patch_h, gw = width / patch_w, g = gh * gw;
  out.resize(images.rows() * g, patch_h * patch_w);
  for (Index n = 0; n < images.rows(); ++n)
    for (Index i = 0; i < gh; ++i)
      for (Index j = 0; j < gw; ++j)
        for (Index r = 0; r < patch_h; ++r)
          out.row(n * g + i * gw + j).segment(r * patch_w, patch_w) =
              images.row(n).segment((i * patch_h + r) * width + j * patch_w, patch_w);
}

// ------------------------------------------------------------------------------------------------
// One encoder block.
// ------------------------------------------------------------------------------------------------
template <class T>
class TransformerBlock : public Module<T> {
 public:
  /// What backward needs: the sub-layers' caches (each holds its own inputs / statistics).
  struct Cache {
    typename LayerNorm<T>::Cache norm1, norm2;
    typename MultiHeadAttention<T>::Cache attn;
    typename FeedForward<T>::Cache ffn;
    typename Adapter<T>::Cache adapter_attn, adapter_ffn;
  };

  TransformerBlock() = default;

  TransformerBlock(const TransformerConfig& c, Rng& rng, std::string name = "")
      : Module<T>(std::move(name)), pre_norm_(c.norm == NormPlacement::Pre) {
    AttentionOptions ao;
    ao.causal = c.causal;
    attn = MultiHeadAttention<T>(c.dim, c.num_heads, rng, ao);
    ffn = FeedForward<T>(c.dim, c.ffn_dim, c.activation, rng);
    norm1 = LayerNorm<T>(c.dim, c.norm_eps);
    norm2 = LayerNorm<T>(c.dim, c.norm_eps);
    this->set_name(this->name());
  }

  LayerNorm<T> norm1, norm2;
  MultiHeadAttention<T> attn;
  FeedForward<T> ffn;
  std::optional<Adapter<T>> adapter_attn;  ///< sequential adapter after attention (Houlsby)
  std::optional<Adapter<T>> adapter_ffn;   ///< after the FFN (sequential) or parallel to it

  Index dim() const { return attn.dim(); }
  bool pre_norm() const { return pre_norm_; }
  /// Whether adapter_ffn is He et al.'s parallel adapter (no own residual, fed the FFN's input).
  bool parallel_adapter() const { return adapter_ffn.has_value() && !adapter_ffn->residual(); }

  /// Adds this block's adapters for a placement. Refused when the block already has adapters.
  void add_adapters(AdapterPlacement placement, const AdapterOptions& options, Rng& rng);

  /// x [B·S, d] laid out by `layout` → y [B·S, d]; `prefix` (may be null) feeds the attention.
  /// `y` must not share storage with `x`.
  void forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y, Cache& cache,
               const PrefixKV<T>* prefix = nullptr);

  /// The same output with nothing kept for backward: every sub-layer's inference path, into the
  /// block's own inference buffers (reused; forward()'s keep their shapes). `y` must not share
  /// storage with `x`.
  void forward_inference(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y,
                         const PrefixKV<T>* prefix = nullptr, const SequenceAdapters* adapters = nullptr);

  /// Accumulates trainable gradients, writes dx unless null; the attention's prefix gradients go
  /// to *dprefix unless null.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx, PrefixGrad<T>* dprefix = nullptr);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    fn("norm1", norm1);
    fn("attn", attn);
    if (adapter_attn) fn("adapter_attn", *adapter_attn);
    fn("norm2", norm2);
    fn("ffn", ffn);
    static const std::string parallel_key("adapter_parallel"), ffn_key("adapter_ffn");  // no allocation per walk
    if (adapter_ffn) fn(parallel_adapter() ? parallel_key : ffn_key, *adapter_ffn);
  }

 private:
  /// Forward temporaries (none is read by backward), [rows, d] each: forward() takes them from the
  /// thread's scratch (core/scratch.hpp, shared by every block), forward_inference() from inf_.
  struct Temps {
    Matrix<T>& u;
    Matrix<T>& a;
    Matrix<T>& a2;
    Matrix<T>& h;
    Matrix<T>& v;
    Matrix<T>& f;
    Matrix<T>& f2;
    Matrix<T>& s;
  };
  struct TempStore {
    Matrix<T> u, a, a2, h, v, f, f2, s;
    Temps refs() { return Temps{u, a, a2, h, v, f, f2, s}; }
  };
  /// Scratch slots: 0-7 forward's temporaries (Temps order), then backward's.
  enum ScratchSlot { kBackward = 8, kDh = kBackward, kDv, kDu, kDa, kDs, kDf2, kDtmp, kDpar };
  Matrix<T>& buffer(int slot, Index rows) { return scratch<T>(ScratchOwner::TransformerBlock, slot, rows, dim()); }

  /// forward() (cache != nullptr: the sub-layers' training paths, filling *cache) and
  /// forward_inference() (cache == nullptr: their inference paths): one sequence of operations.
  void forward_impl(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y, Cache* cache,
                    const PrefixKV<T>* prefix, Temps& t, const SequenceAdapters* adapters = nullptr);

  /// Ad_attn(t.a) when present, else t.a.
  const Matrix<T>& attend_adapter(Cache* cache, Temps& t) {
    if (!adapter_attn) return t.a;
    if (cache != nullptr)
      adapter_attn->forward(t.a, t.a2, cache->adapter_attn);
    else
      adapter_attn->forward_inference(t.a, t.a2);
    return t.a2;
  }

  /// FFN(v) with the FFN-side adapter: sequential Ad_ffn(FFN(v)) or parallel FFN(v) + s·Ad_par(v).
  const Matrix<T>& ffn_branch(const Matrix<T>& v, Cache* cache, Temps& t, const SequenceAdapters* adapters);

  /// dv = ∂(ffn branch)/∂v ᵀ df.
  void ffn_branch_backward(const Cache& cache, const ConstMatrixRef<T>& df, Matrix<T>& dv);

  /// Ad_attnᵀ(d) (in scratch slot kDa), or d itself without the adapter.
  const Matrix<T>& attend_adapter_backward(const Cache& cache, const Matrix<T>& d) {
    if (!adapter_attn) return d;
    Matrix<T>& da = buffer(kDa, d.rows());
    adapter_attn->backward(cache.adapter_attn, d, &da);
    return da;
  }

  bool pre_norm_ = true;
  TempStore inf_;  // forward_inference()'s temporaries
};

// ---- TransformerBlock members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
void TransformerBlock<T>::add_adapters(AdapterPlacement placement, const AdapterOptions& options, Rng& rng) {
  if (adapter_attn || adapter_ffn)
    throw ConfigError(describe("TransformerBlock", this->name()) + ": already has adapters");
  if (placement == AdapterPlacement::Houlsby) adapter_attn.emplace(dim(), options, rng, true);
  adapter_ffn.emplace(dim(), options, rng, placement != AdapterPlacement::Parallel);
  this->set_name(this->name());
}

template <class T>
void TransformerBlock<T>::forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y, Cache& cache,
                                  const PrefixKV<T>* prefix) {
  const Index rows = x.rows();
  Temps t{buffer(0, rows), buffer(1, rows), buffer(2, rows), buffer(3, rows),
          buffer(4, rows), buffer(5, rows), buffer(6, rows), buffer(7, rows)};
  forward_impl(x, layout, y, &cache, prefix, t);
}

template <class T>
void TransformerBlock<T>::forward_inference(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y,
                                            const PrefixKV<T>* prefix, const SequenceAdapters* adapters) {
  Temps t = inf_.refs();
  forward_impl(x, layout, y, nullptr, prefix, t, adapters);
}

template <class T>
void TransformerBlock<T>::forward_impl(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& y,
                                       Cache* cache, const PrefixKV<T>* prefix, Temps& t,
                                       const SequenceAdapters* adapters) {
  check::input_features("TransformerBlock", this->name(), x.cols(), dim());
  // Each sub-layer through its training path (filling *cache) or its inference path.
  const auto norm = [&](LayerNorm<T>& n, typename LayerNorm<T>::Cache* c, const ConstMatrixRef<T>& in, Matrix<T>& out) {
    if (cache != nullptr)
      n.forward(in, out, *c);
    else
      n.forward_inference(in, out);
  };
  const auto attend = [&](const ConstMatrixRef<T>& in) {
    if (cache != nullptr)
      attn.forward(in, layout, t.a, cache->attn, prefix);
    else
      attn.forward_inference(in, layout, t.a, prefix, adapters);
  };
  if (pre_norm_) {
    norm(norm1, cache ? &cache->norm1 : nullptr, x, t.u);      // u = LN1(x)
    attend(t.u);                                               // a = Attn(u)
    const Matrix<T>& a = attend_adapter(cache, t);             // a ← Ad_attn(a)
    parallel_sum<T>(t.h, x, a);                                // h = x + a
    norm(norm2, cache ? &cache->norm2 : nullptr, t.h, t.v);    // v = LN2(h)
    const Matrix<T>& f = ffn_branch(t.v, cache, t, adapters);  // f = FFN(v) (+ adapters)
    parallel_sum<T>(y, t.h, f);                                // y = h + f
  } else {
    attend(x);  // a = Attn(x)
    const Matrix<T>& a = attend_adapter(cache, t);
    parallel_sum<T>(t.s, x, a);
    norm(norm1, cache ? &cache->norm1 : nullptr, t.s, t.h);  // h = LN1(x + a)
    const Matrix<T>& f = ffn_branch(t.h, cache, t, adapters);
    parallel_sum<T>(t.s, t.h, f);
    norm(norm2, cache ? &cache->norm2 : nullptr, t.s, y);  // y = LN2(h + f)
  }
}

template <class T>
void TransformerBlock<T>::backward(const Cache& cache, const ConstMatrixRef<T>& dy, Matrix<T>* dx,
                                   PrefixGrad<T>* dprefix) {
  check::shape("TransformerBlock", this->name(), "output gradient", dy.rows(), dy.cols(), cache.attn.layout.rows(),
               dim());
  // Thread scratch (core/scratch.hpp), shared by every block: [rows, d] each.
  const Index rows = dy.rows();
  Matrix<T>& dh = buffer(kDh, rows);
  Matrix<T>& dv = buffer(kDv, rows);
  if (pre_norm_) {
    Matrix<T>& dtmp = buffer(kDtmp, rows);
    parallel_assign<T>(dh, dy);                                // y = h + f: dh = dy, df = dy
    ffn_branch_backward(cache, dy, dv);                        // dv = ∂f/∂v ᵀ dy
    norm2.backward(cache.norm2, dv, &dtmp);                    // v = LN2(h)
    parallel_add<T>(dh, dtmp);                                 // dh = dy + LN2ᵀ(dv)
    const Matrix<T>& da = attend_adapter_backward(cache, dh);  // da = Ad_attnᵀ(dh)
    // du = Attnᵀ(da) is needed only for dx or LN1's own gradients: skipping it saves the
    // q/k/v input-gradient GEMMs in the lowest block of a PEFT model.
    const bool need_du = dx != nullptr || norm1.weight.trainable() || norm1.bias.trainable();
    Matrix<T>* du = need_du ? &buffer(kDu, rows) : nullptr;
    attn.backward(cache.attn, da, du, dprefix);
    if (!need_du) return;
    if (dx != nullptr) {
      norm1.backward(cache.norm1, *du, dx);  // dx = LN1ᵀ(du) + dh
      parallel_add<T>(*dx, dh);
    } else {
      norm1.backward(cache.norm1, *du, nullptr);
    }
  } else {
    Matrix<T>& ds = buffer(kDs, rows);
    norm2.backward(cache.norm2, dy, &ds);                      // ds2 = LN2ᵀ(dy);  s2 = h + f
    ffn_branch_backward(cache, ds, dv);                        // dv (v = h)
    parallel_add<T>(ds, dv);                                   // dh = ds2 + dv
    norm1.backward(cache.norm1, ds, &dh);                      // ds1 = LN1ᵀ(dh);  s1 = x + a
    const Matrix<T>& da = attend_adapter_backward(cache, dh);  // da = Ad_attnᵀ(ds1)
    attn.backward(cache.attn, da, dx, dprefix);
    if (dx != nullptr) parallel_add<T>(*dx, dh);  // dx = Attnᵀ(da) + ds1
  }
}

template <class T>
const Matrix<T>& TransformerBlock<T>::ffn_branch(const Matrix<T>& v, Cache* cache, Temps& t,
                                                 const SequenceAdapters* adapters) {
  const auto adapter = [&](const Matrix<T>& in, Matrix<T>& out) {
    if (cache != nullptr)
      adapter_ffn->forward(in, out, cache->adapter_ffn);
    else
      adapter_ffn->forward_inference(in, out);
  };
  if (cache != nullptr)
    ffn.forward(v, t.f, cache->ffn);
  else
    ffn.forward_inference(v, t.f, adapters);
  if (!adapter_ffn) return t.f;
  if (parallel_adapter()) {
    adapter(v, t.f2);  // s·g(v)
    parallel_add<T>(t.f2, t.f);
  } else {
    adapter(t.f, t.f2);  // f + s·g(f)
  }
  return t.f2;
}

template <class T>
void TransformerBlock<T>::ffn_branch_backward(const Cache& cache, const ConstMatrixRef<T>& df, Matrix<T>& dv) {
  if (!adapter_ffn) {
    ffn.backward(cache.ffn, df, &dv);
  } else if (parallel_adapter()) {
    Matrix<T>& dpar = buffer(kDpar, df.rows());           // its own slot: backward holds kDtmp around this call
    ffn.backward(cache.ffn, df, &dv);                     // FFNᵀ(df)
    adapter_ffn->backward(cache.adapter_ffn, df, &dpar);  // + Ad_parᵀ(df)
    parallel_add<T>(dv, dpar);
  } else {
    Matrix<T>& df2 = buffer(kDf2, df.rows());
    adapter_ffn->backward(cache.adapter_ffn, df, &df2);  // d(FFN out) = Ad_ffnᵀ(df)
    ffn.backward(cache.ffn, df2, &dv);
  }
}

// ------------------------------------------------------------------------------------------------
// The classifier model.
// ------------------------------------------------------------------------------------------------
template <class T>
class TransformerClassifier : public Module<T> {
 public:
  struct Cache {
    typename Embedding<T>::Cache tokens;
    typename LoRALinear<T>::Cache patch;
    typename PositionalEmbedding<T>::Cache positions;
    typename SoftPrompt<T>::Cache prompt;
    typename PrefixAttention<T>::Cache prefix;  ///< also collects the prefix gradients in backward
    std::vector<typename TransformerBlock<T>::Cache> blocks;
    typename LayerNorm<T>::Cache norm;
    typename LoRALinear<T>::Cache head;
    SequenceLayout layout;        ///< the input's layout
    SequenceLayout model_layout;  ///< after the soft prompt (== layout without one)
    bool features = false;        ///< continuous input (patch_embed) rather than token ids
  };

  TransformerClassifier() = default;

  TransformerClassifier(const TransformerConfig& config, Rng& rng, std::string name = "");

  Embedding<T> embed_tokens;               ///< token input only
  LoRALinear<T> patch_embed;               ///< feature input only
  PositionalEmbedding<T> embed_positions;  ///< when max_seq_len > 0
  std::optional<SoftPrompt<T>> prompt_encoder;
  std::optional<PrefixAttention<T>> prefix_encoder;
  std::vector<TransformerBlock<T>> layers;
  LayerNorm<T> norm;  ///< when final_norm
  /// The head: a modules_to_save target, so one copy per adapter (active() is what forward uses).
  ModulesToSave<T, LoRALinear<T>> classifier;

  const TransformerConfig& config() const { return config_; }
  Index dim() const { return config_.dim; }
  Index num_layers() const { return static_cast<Index>(layers.size()); }
  Index num_classes() const { return config_.num_classes; }
  bool token_input() const { return config_.vocab_size > 0; }
  bool has_positions() const { return config_.max_seq_len > 0; }
  /// Soft-prompt length n (0 without prompt tuning).
  Index prompt_length() const { return prompt_encoder ? prompt_encoder->num_virtual_tokens() : 0; }

  // ---- PEFT attachments (models/peft_config.hpp drives these from a config) ------------------

  /// Freezes every parameter of the model.
  void freeze_all() {
    this->visit_parameters([](const std::string&, Parameter<T>& p) { p.set_trainable(false); });
  }

  /// Dotted names of every linear (LoRA targets), in model order, with whether each is the output
  /// head (what "all-linear" leaves out).
  std::vector<std::pair<std::string, bool>> linear_names() {
    std::vector<std::pair<std::string, bool>> out;
    for_each_linear([&](const std::string& n, LoRALinear<T>&, bool head) { out.emplace_back(n, !head); });
    return out;
  }

  /// The linear with dotted name `key` (relative to this model); ConfigError listing names if none.
  LoRALinear<T>& linear(const std::string& key);

  /// Calls fn(name, linear, is_head) for every linear.
  template <class Fn>
  void for_each_linear(Fn&& fn) {
    if (!token_input()) fn(std::string("patch_embed"), patch_embed, false);
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const std::string p = "layers." + std::to_string(i) + ".";
      fn(p + "attn.q_proj", layers[i].attn.q_proj, false);
      fn(p + "attn.k_proj", layers[i].attn.k_proj, false);
      fn(p + "attn.v_proj", layers[i].attn.v_proj, false);
      fn(p + "attn.out_proj", layers[i].attn.out_proj, false);
      fn(p + "ffn.fc1", layers[i].ffn.fc1, false);
      fn(p + "ffn.fc2", layers[i].ffn.fc2, false);
    }
    // The head's original, a LoRA target while it has no copies (a module to save is not one).
    if (!classifier.has_copies()) fn(std::string("classifier"), classifier.original(), true);
  }

  /// Adapters in every block for a placement (Houlsby: after attention and FFN; Pfeiffer: after
  /// the FFN; Parallel: parallel to the FFN).
  void add_adapters(AdapterPlacement placement, const AdapterOptions& options, Rng& rng) {
    for (auto& b : layers) b.add_adapters(placement, options, rng);
    this->set_name(this->name());
  }

  /// Prefix tuning on every layer: l virtual tokens, optionally reparameterized through an MLP of
  /// width `encoder_hidden_size` (PEFT's prefix_projection).
  void add_prefix(Index num_virtual_tokens, Rng& rng, bool prefix_projection = false, Index encoder_hidden_size = 0);

  /// Prompt tuning: n virtual tokens at the input, N(0, 1)·scale init (see SoftPrompt for others).
  SoftPrompt<T>& add_soft_prompt(Index num_virtual_tokens, Rng& rng, double scale = 1.0);

  // ---- forward / backward -------------------------------------------------------------------

  /// Token input: ids [B·S] laid out by `layout` (padding ids must still be valid ids, e.g. 0).
  /// logits [B, num_classes].
  void forward(const std::vector<Index>& ids, const SequenceLayout& layout, Matrix<T>& logits, Cache& cache);

  /// Feature input: x [B·S, input_dim] (e.g. image patches) laid out by `layout`.
  void forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& logits, Cache& cache);

  Matrix<T> forward(const std::vector<Index>& ids, const SequenceLayout& layout, Cache& cache) {
    Matrix<T> logits;
    forward(ids, layout, logits, cache);
    return logits;
  }
  Matrix<T> forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Cache& cache) {
    Matrix<T> logits;
    forward(x, layout, logits, cache);
    return logits;
  }

  /// Logits without keeping anything for backward (evaluation, serving): the values forward()
  /// computes in eval mode (the model is switched to eval for the call when it is training), through
  /// every sub-layer's inference path — adapted linears with their active or merged adapters,
  /// attention without softmax statistics, layer norms without x̂, the soft prompt and prefix
  /// without gradient tables, the head's active copy (modules_to_save). No Cache is read or
  /// written, and the buffers are the model's own, separate from forward()'s: after the first call
  /// with a given shape nothing is allocated, and evaluating between training steps leaves the
  /// training buffers' shapes alone.
  ///
  /// `adapter_names` (one per sequence; empty: the active adapters) serves several adapters in one
  /// batch (Hugging Face PEFT's `adapter_names=`): sequence b goes through adapter names[b] in every
  /// adapted linear (one that does not hold it gives its base output) and through that adapter's
  /// copy of the head (the original when it has none); "__base__" or "none": the base model. Only
  /// what a named adapter owns can be routed: ConfigError when the model has a soft prompt, a
  /// prefix or bottleneck adapters, or for a name no linear and no head copy holds; merged linears
  /// refuse routing (lora_mixed_batch.hpp).
  void forward_inference(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& logits,
                         const std::vector<std::string>& adapter_names = {});
  /// Token input.
  void forward_inference(const std::vector<Index>& ids, const SequenceLayout& layout, Matrix<T>& logits,
                         const std::vector<std::string>& adapter_names = {});

  /// dlogits [B, num_classes] → accumulates every trainable gradient. With feature input, writes
  /// ∂L/∂x [B·S, input_dim] into *dx unless null (token input: dx must be null). The cache is
  /// non-const because the prefix gradients are gathered in it.
  void backward(Cache& cache, const ConstMatrixRef<T>& dlogits, Matrix<T>* dx = nullptr);

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    if (token_input())
      fn("embed_tokens", embed_tokens);
    else
      fn("patch_embed", patch_embed);
    if (has_positions()) fn("embed_positions", embed_positions);
    if (prompt_encoder) fn("prompt_encoder", *prompt_encoder);
    if (prefix_encoder) fn("prefix_encoder", *prefix_encoder);
    for (std::size_t i = 0; i < layers.size(); ++i) fn("layers." + std::to_string(i), layers[i]);
    if (config_.final_norm) fn("norm", norm);
    fn("classifier", classifier);
  }

 private:
  /// Whether anything below the first block trains (embeddings, positions, patch LoRA, prompt).
  bool input_side_trainable();

  /// Forward temporaries (none is read by backward): one set for forward(), one for forward_inference().
  struct Buffers {
    Matrix<T> e;     ///< the embedded input [B·S, d] (its own buffer: with a soft prompt the blocks'
                     ///< rows are B·(n + S), and a buffer shared with them would change shape twice a call)
    Matrix<T> x, h;  ///< the blocks' input and output, swapped layer by layer
    Matrix<T> pooled;
  };

  /// Shared tail of every forward: buf.e holds the embedded input [B·S, d]. cache != nullptr: the
  /// training paths, filling *cache; nullptr: the inference paths.
  void run(const SequenceLayout& layout, Matrix<T>& logits, Cache* cache, Buffers& buf,
           const std::vector<std::string>* adapter_names = nullptr);

  /// ConfigError / ShapeError unless per-sequence adapter names can route this model (see
  /// forward_inference).
  void check_adapter_names(const std::vector<std::string>& names, const SequenceLayout& layout);

  /// The head of sequence b under routing: its adapter's copy, else the original.
  LoRALinear<T>& routed_head(const std::string& name) {
    return !is_base_adapter_name(name) && classifier.has_copy(name) ? classifier.copy(name) : classifier.original();
  }

  /// Runs fn in eval mode, then restores training mode (also on an exception).
  template <class Fn>
  void in_eval_mode(Fn&& fn) {
    const bool was_training = this->training();
    if (was_training) this->eval();
    try {
      fn();
    } catch (...) {
      if (was_training) this->train();
      throw;
    }
    if (was_training) this->train();
  }

  TransformerConfig config_;
  Buffers fwd_, inf_;
  SequenceLayout inf_layout_;                             ///< forward_inference's layout after the prompt
  typename PositionalEmbedding<T>::Cache inf_positions_;  ///< forward_inference's (two sizes)
  RoutedWorkspace<T> patch_route_, head_route_;           ///< per-sequence adapter routing
  Matrix<T> head_tmp_;                                    ///< a routed head's logits for every row
  // backward scratch
  Matrix<T> dpooled_, dh_a_, dh_b_, dh_e_;
};

// ---- TransformerClassifier members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
TransformerClassifier<T>::TransformerClassifier(const TransformerConfig& config, Rng& rng, std::string name)
    : Module<T>(std::move(name)), config_(config) {
  const std::string who = describe("TransformerClassifier", this->name());
  if ((config.vocab_size > 0) == (config.input_dim > 0))
    throw ConfigError(who +
                      ": exactly one of vocab_size (token input) and input_dim (feature input) must be > 0, got " +
                      std::to_string(config.vocab_size) + " and " + std::to_string(config.input_dim));
  if (config.num_layers <= 0 || config.num_classes <= 0 || config.max_seq_len < 0)
    throw ConfigError(who + ": num_layers and num_classes must be > 0 and max_seq_len >= 0, got " +
                      std::to_string(config.num_layers) + ", " + std::to_string(config.num_classes) + ", " +
                      std::to_string(config.max_seq_len));
  if (config.vocab_size > 0)
    embed_tokens = Embedding<T>(config.vocab_size, config.dim, rng);
  else
    patch_embed = LoRALinear<T>(config.input_dim, config.dim, rng);
  if (config.max_seq_len > 0) {
    embed_positions = PositionalEmbedding<T>(config.max_seq_len, config.dim, rng);
    init::normal<T>(embed_positions.weight.value, rng, 0.0, 0.02);  // BERT / ViT-style small positions
  }
  for (Index i = 0; i < config.num_layers; ++i) layers.emplace_back(config, rng);
  if (config.final_norm) norm = LayerNorm<T>(config.dim, config.norm_eps);
  classifier = LoRALinear<T>(config.dim, config.num_classes, rng);  // the host's original
  this->set_name(this->name());
}

template <class T>
LoRALinear<T>& TransformerClassifier<T>::linear(const std::string& key) {
  LoRALinear<T>* found = nullptr;
  std::vector<std::string> names;
  for_each_linear([&](const std::string& n, LoRALinear<T>& l, bool) {
    names.push_back(n);
    if (n == key) found = &l;
  });
  if (found == nullptr) {
    std::string s;
    for (const auto& n : names) s += (s.empty() ? "" : ", ") + n;
    throw ConfigError(describe("TransformerClassifier", this->name()) + ": no linear named \"" + key +
                      "\"; available: " + s);
  }
  return *found;
}

template <class T>
void TransformerClassifier<T>::add_prefix(Index num_virtual_tokens, Rng& rng, bool prefix_projection,
                                          Index encoder_hidden_size) {
  if (prefix_encoder) throw ConfigError(describe("TransformerClassifier", this->name()) + ": already has a prefix");
  PrefixConfig pc;
  pc.num_virtual_tokens = num_virtual_tokens;
  pc.token_dim = dim();
  pc.num_layers = num_layers();
  pc.prefix_projection = prefix_projection;
  pc.encoder_hidden_size = encoder_hidden_size;
  prefix_encoder.emplace(pc, rng);
  this->set_name(this->name());
}

template <class T>
SoftPrompt<T>& TransformerClassifier<T>::add_soft_prompt(Index num_virtual_tokens, Rng& rng, double scale) {
  if (prompt_encoder)
    throw ConfigError(describe("TransformerClassifier", this->name()) + ": already has a soft prompt");
  prompt_encoder.emplace(num_virtual_tokens, dim(), rng, scale);
  this->set_name(this->name());
  return *prompt_encoder;
}

template <class T>
void TransformerClassifier<T>::forward(const std::vector<Index>& ids, const SequenceLayout& layout, Matrix<T>& logits,
                                       Cache& cache) {
  // The name is built only on error (a string per step would allocate).
  if (!token_input())
    throw ConfigError(describe("TransformerClassifier", this->name()) +
                      ": model takes feature input (input_dim > 0), not token ids");
  layout.validate("TransformerClassifier", this->name(), static_cast<Index>(ids.size()));
  cache.features = false;
  embed_tokens.forward(ids, fwd_.e, cache.tokens);
  run(layout, logits, &cache, fwd_);
}

template <class T>
void TransformerClassifier<T>::forward(const ConstMatrixRef<T>& x, const SequenceLayout& layout, Matrix<T>& logits,
                                       Cache& cache) {
  if (token_input())
    throw ConfigError(describe("TransformerClassifier", this->name()) +
                      ": model takes token ids (vocab_size > 0), not features");
  layout.validate("TransformerClassifier", this->name(), x.rows());
  check::input_features("TransformerClassifier", this->name(), x.cols(), config_.input_dim);
  cache.features = true;
  patch_embed.forward(x, fwd_.e, cache.patch);
  run(layout, logits, &cache, fwd_);
}

template <class T>
void TransformerClassifier<T>::check_adapter_names(const std::vector<std::string>& names,
                                                   const SequenceLayout& layout) {
  const std::string who = describe("TransformerClassifier", this->name());
  if (static_cast<Index>(names.size()) != layout.batch)
    throw ShapeError(who + ": " + std::to_string(names.size()) + " adapter names for " + std::to_string(layout.batch) +
                     " sequences");
  bool bottleneck = false;
  for (const auto& b : layers) bottleneck = bottleneck || b.adapter_attn.has_value() || b.adapter_ffn.has_value();
  if (prompt_encoder || prefix_encoder || bottleneck)
    throw ConfigError(who + ": per-sequence adapter names route the adapted linears and the head's copies; they " +
                      "cannot leave out this model's " +
                      (prompt_encoder   ? "soft prompt"
                       : prefix_encoder ? "prefix"
                                        : "bottleneck adapters") +
                      ", which belongs to no named adapter (pass no names)");
  for (const std::string& name : names) {
    if (is_base_adapter_name(name) || classifier.has_copy(name)) continue;
    bool found = false;
    std::string held;
    for_each_linear([&](const std::string&, LoRALinear<T>& l, bool) {
      found = found || l.adapter_index(name) >= 0;
      for (const auto& m : l.methods())
        if (held.find("\"" + std::string(m.name()) + "\"") == std::string::npos)
          held += (held.empty() ? "\"" : ", \"") + std::string(m.name()) + "\"";
    });
    if (!found)
      throw ConfigError(who + ": no linear and no head copy holds adapter \"" + name + "\" (adapters: " +
                        (held.empty() ? std::string("none") : held) + "; \"__base__\" or \"none\": the base model)");
  }
}

template <class T>
void TransformerClassifier<T>::forward_inference(const std::vector<Index>& ids, const SequenceLayout& layout,
                                                 Matrix<T>& logits, const std::vector<std::string>& adapter_names) {
  if (!token_input())
    throw ConfigError(describe("TransformerClassifier", this->name()) +
                      ": model takes feature input (input_dim > 0), not token ids");
  layout.validate("TransformerClassifier", this->name(), static_cast<Index>(ids.size()));
  if (!adapter_names.empty()) check_adapter_names(adapter_names, layout);
  in_eval_mode([&] {
    embed_tokens.forward_inference(ids.data(), static_cast<Index>(ids.size()), inf_.e);
    run(layout, logits, nullptr, inf_, adapter_names.empty() ? nullptr : &adapter_names);
  });
}

template <class T>
void TransformerClassifier<T>::forward_inference(const ConstMatrixRef<T>& x, const SequenceLayout& layout,
                                                 Matrix<T>& logits, const std::vector<std::string>& adapter_names) {
  if (token_input())
    throw ConfigError(describe("TransformerClassifier", this->name()) +
                      ": model takes token ids (vocab_size > 0), not features");
  layout.validate("TransformerClassifier", this->name(), x.rows());
  check::input_features("TransformerClassifier", this->name(), x.cols(), config_.input_dim);
  if (!adapter_names.empty()) check_adapter_names(adapter_names, layout);
  const SequenceAdapters input{&adapter_names, layout.seq};
  in_eval_mode([&] {  // no dropout (LoRA's) in inference
    forward_inference_routed<T>(patch_embed, x, inf_.e, adapter_names.empty() ? nullptr : &input, patch_route_);
    run(layout, logits, nullptr, inf_, adapter_names.empty() ? nullptr : &adapter_names);
  });
}

template <class T>
void TransformerClassifier<T>::backward(Cache& cache, const ConstMatrixRef<T>& dlogits, Matrix<T>* dx) {
  const SequenceLayout& ml = cache.model_layout;
  check::shape("TransformerClassifier", this->name(), "logits gradient", dlogits.rows(), dlogits.cols(), ml.batch,
               num_classes());
  if (dx != nullptr && !cache.features)
    throw ConfigError(describe("TransformerClassifier", this->name()) +
                      ": token ids have no input gradient; pass dx = nullptr");
  if (static_cast<Index>(cache.blocks.size()) != num_layers())
    throw ConfigError(describe("TransformerClassifier", this->name()) +
                      ": cache does not come from a forward of this model");

  classifier.active().backward(cache.head, dlogits, &dpooled_);  // dp = dlogits W_c   [B, d]
  // pooling backward: spread dp over the pooled rows
  dh_a_.setZero(ml.rows(), dim());
  const Index n = cache.model_layout.seq - cache.layout.seq;
  for (Index b = 0; b < ml.batch; ++b) {
    if (config_.pooling == Pooling::First) {
      dh_a_.row(ml.row(b, n)) = dpooled_.row(b);
    } else {
      const Index len = cache.layout.length(b);
      const T inv = T(1) / static_cast<T>(len);
      for (Index t = 0; t < len; ++t) dh_a_.row(ml.row(b, n + t)) = inv * dpooled_.row(b);  // d mean = dp / len
    }
  }
  Matrix<T>* cur = &dh_a_;
  Matrix<T>* nxt = &dh_b_;
  if (config_.final_norm) {
    norm.backward(cache.norm, *cur, nxt);
    std::swap(cur, nxt);
  }
  // Below the blocks: is any gradient needed at all? (Frozen embeddings and no prompt: no.)
  const bool need_below = dx != nullptr || input_side_trainable();
  for (Index i = num_layers() - 1; i >= 0; --i) {
    Matrix<T>* out = (i > 0 || need_below) ? nxt : nullptr;
    if (prefix_encoder) {
      PrefixGrad<T> g = prefix_encoder->layer_grad(cache.prefix, i);
      layers[static_cast<std::size_t>(i)].backward(cache.blocks[static_cast<std::size_t>(i)], *cur, out, &g);
    } else {
      layers[static_cast<std::size_t>(i)].backward(cache.blocks[static_cast<std::size_t>(i)], *cur, out);
    }
    std::swap(cur, nxt);
  }
  if (prefix_encoder) prefix_encoder->backward(cache.prefix);
  if (!need_below) return;
  if (prompt_encoder) {
    // strip the prompt rows, dP += Σ_b; into a buffer of its own, [B·S, d] (dh_a_ and dh_b_ keep
    // the blocks' [B·(n + S), d]: sharing one would resize it twice a step)
    prompt_encoder->backward(cache.prompt, *cur, &dh_e_);
    cur = &dh_e_;
  }
  if (has_positions()) embed_positions.backward(cache.positions, *cur);  // dx_embed = d(x + P) (identity)
  if (cache.features)
    patch_embed.backward(cache.patch, *cur, dx);
  else
    embed_tokens.backward(cache.tokens, *cur);
}

template <class T>
bool TransformerClassifier<T>::input_side_trainable() {
  // Checked member by member (not via visit_parameters, which builds name strings): no
  // allocation on the backward path.
  bool any = false;
  if (token_input()) {
    any = embed_tokens.weight.trainable();
  } else {
    any = patch_embed.weight.trainable() || (patch_embed.has_bias() && patch_embed.bias.trainable());
    for (std::size_t i = 0; i < patch_embed.num_adapters() && !any; ++i) any = patch_embed.method_at(i).any_trainable();
  }
  if (has_positions()) any = any || embed_positions.weight.trainable();
  if (prompt_encoder) any = any || prompt_encoder->embedding.trainable();
  return any;
}

template <class T>
void TransformerClassifier<T>::run(const SequenceLayout& layout, Matrix<T>& logits, Cache* cache, Buffers& buf,
                                   const std::vector<std::string>* adapter_names) {
  layout.require_right_padded("TransformerClassifier", this->name());
  if (cache != nullptr) cache->layout = layout;
  // Padding rows carry no information: zeroed, so the blocks never compute on garbage.
  for (Index b = 0; b < layout.batch; ++b)
    if (layout.length(b) < layout.seq)
      buf.e.middleRows(b * layout.seq + layout.length(b), layout.seq - layout.length(b)).setZero();
  if (has_positions())  // x + P[t]
    embed_positions.forward_inplace(buf.e, layout, cache != nullptr ? cache->positions : inf_positions_);
  Matrix<T>* cur = &buf.e;
  Matrix<T>* nxt = &buf.h;
  SequenceLayout& ml = cache != nullptr ? cache->model_layout : inf_layout_;
  if (prompt_encoder) {  // [P; x_b]
    if (cache != nullptr)
      prompt_encoder->forward(*cur, layout, *nxt, ml, cache->prompt);
    else
      prompt_encoder->forward_inference(*cur, layout, *nxt, ml);
    cur = &buf.h;  // [B·(n + S), d] from here on, in h and x; e keeps the input's shape
    nxt = &buf.x;
  } else {
    ml = layout;
  }
  const Matrix<T>* prefix_table = nullptr;  // the inference path's prefix table
  if (prefix_encoder) {
    if (cache != nullptr)
      prefix_encoder->forward(cache->prefix);
    else
      prefix_table = &prefix_encoder->inference_table();
  }
  if (cache != nullptr) cache->blocks.resize(layers.size());
  const SequenceAdapters routed{adapter_names, ml.seq};  // rows of the model's layout
  const SequenceAdapters* seqs = adapter_names != nullptr ? &routed : nullptr;
  for (std::size_t i = 0; i < layers.size(); ++i) {
    const Index li = static_cast<Index>(i);
    if (prefix_encoder) {
      const PrefixKV<T> kv =
          cache != nullptr ? prefix_encoder->layer(cache->prefix, li) : prefix_encoder->layer_of(*prefix_table, li);
      if (cache != nullptr)
        layers[i].forward(*cur, ml, *nxt, cache->blocks[i], &kv);
      else
        layers[i].forward_inference(*cur, ml, *nxt, &kv);
    } else if (cache != nullptr) {
      layers[i].forward(*cur, ml, *nxt, cache->blocks[i]);
    } else {
      layers[i].forward_inference(*cur, ml, *nxt, nullptr, seqs);
    }
    std::swap(cur, nxt);
  }
  if (config_.final_norm) {
    if (cache != nullptr)
      norm.forward(*cur, *nxt, cache->norm);
    else
      norm.forward_inference(*cur, *nxt);
    std::swap(cur, nxt);
  }
  // pooling over real, valid tokens: rows n .. n + len_b − 1 of each sequence
  const Index n = ml.seq - layout.seq;
  buf.pooled.resize(ml.batch, dim());
  for (Index b = 0; b < ml.batch; ++b) {
    if (config_.pooling == Pooling::First) {
      buf.pooled.row(b) = cur->row(ml.row(b, n));
    } else {
      const Index len = layout.length(b);
      buf.pooled.row(b) = cur->middleRows(ml.row(b, n), len).colwise().sum() / static_cast<T>(len);
    }
  }
  if (cache != nullptr) {
    classifier.active().forward(buf.pooled, logits, cache->head);
  } else if (adapter_names == nullptr) {
    classifier.active().forward_inference(buf.pooled, logits);
  } else if (!classifier.has_copies()) {  // the head is an adapted linear: route its rows
    const SequenceAdapters heads{adapter_names, 1};
    forward_inference_routed<T>(classifier.original(), buf.pooled, logits, &heads, head_route_);
  } else {  // each head module used, on every row; each sequence keeps its own module's row
    const std::vector<std::string>& names = *adapter_names;
    logits.resize(ml.batch, num_classes());
    for (std::size_t b = 0; b < names.size(); ++b) {
      LoRALinear<T>* m = &routed_head(names[b]);
      bool done = false;
      for (std::size_t e = 0; e < b && !done; ++e) done = &routed_head(names[e]) == m;
      if (done) continue;
      m->forward_inference(buf.pooled, head_tmp_);
      for (std::size_t e = b; e < names.size(); ++e)
        if (&routed_head(names[e]) == m) logits.row(static_cast<Index>(e)) = head_tmp_.row(static_cast<Index>(e));
    }
  }
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class TransformerBlock<float>;
extern template class TransformerBlock<double>;
extern template class TransformerClassifier<float>;
extern template class TransformerClassifier<double>;
extern template class ModulesToSave<float, LoRALinear<float>>;
extern template class ModulesToSave<double, LoRALinear<double>>;
}  // namespace peft
#endif
