#pragma once
// Prefix tuning (Li & Liang, 2021, "Prefix-Tuning: Optimizing Continuous Prompts for Generation";
// Liu et al., 2022, "P-Tuning v2"): every attention layer i gets l learned key and value rows
//   P_K^i, P_V^i ∈ R^{l×d}
// prepended to its keys and values (see attention.hpp: always visible, never masked, no queries).
//
// Storage follows Hugging Face PEFT's PrefixEncoder, so checkpoints map 1:1:
//   flat:        embedding.weight  T [l, L·2·d]                      (prefix_projection = false)
//   projected:   embedding.weight  E [l, d]
//                transform.0.{weight [h, d], bias [h]},  transform.2.{weight [L·2·d, h], bias [L·2·d]}
//                T = tanh(E W_0ᵀ + b_0) W_2ᵀ + b_2                   (prefix_projection = true)
// The table row j (virtual token j) holds, for layer i, the key in columns [2i·d, 2i·d + d) and the
// value in [(2i+1)·d, (2i+2)·d). This is exactly PEFT's order: PeftModel.get_prompt views T as
// [batch, l, L·2, H, d/H], permutes to [L·2, batch, H, l, d/H] and splits into pairs (key, value) per
// layer; within d the columns are head-major (h·d/H + e), the same split MultiHeadAttention uses.
// So prompt_embeddings() — the collapsed table T — is PEFT's saved `prompt_embeddings`
// [num_virtual_tokens, num_layers·2·token_dim], and load_prompt_embeddings() reads it back.
//
// Parameters: flat 2·l·d per layer (l·L·2·d in all); projected l·d + h·d + h + h·L·2·d + L·2·d.
// collapse() replaces the reparameterisation by its flat table for inference (PEFT's inference_mode).
//
// Wiring with MultiHeadAttention (the prefix owner computes T once per step; each layer reads views):
//   PrefixAttention<T>::Cache pc;  prefix.forward(pc);
//   for i: { PrefixKV<T> kv = prefix.layer(pc, i);  attn[i].forward(x, layout, y, ac[i], &kv); }
//   ... backward, in reverse layer order:
//   for i: { PrefixGrad<T> g = prefix.layer_grad(pc, i);  attn[i].backward(ac[i], dy, &dx, &g); }
//   prefix.backward(pc);   // dT → parameter gradients (through the MLP when projected)
#include <cmath>
#include <string>

#include "peft/core/check.hpp"
#include "peft/core/init.hpp"
#include "peft/core/module.hpp"
#include "peft/layers/attention.hpp"
#include "peft/layers/linear.hpp"

namespace peft {

struct PrefixConfig {
  Index num_virtual_tokens = 0;    ///< l
  Index token_dim = 0;             ///< d, the attention's model dimension
  Index num_layers = 1;            ///< L, attention layers served
  bool prefix_projection = false;  ///< reparameterise through Embedding → Linear → tanh → Linear
  Index encoder_hidden_size = 0;   ///< h, required with prefix_projection
};

template <class T>
class PrefixAttention : public Module<T> {
 public:
  /// What backward needs; also where the layers' prefix gradients are accumulated.
  struct Cache {
    Matrix<T> table;   ///< T [l, L·2·d] used by this forward
    Matrix<T> dtable;  ///< ∂L/∂T [l, L·2·d]; zeroed by forward, filled through layer_grad()
    Matrix<T> hidden;  ///< tanh(E W_0ᵀ + b_0) [l, h] (projected only)
    typename Linear<T>::Cache c0, c2;
  };

  PrefixAttention() = default;

  /// Fresh parameters with PEFT's init: embedding N(0, 1), transform layers nn.Linear's default.
  PrefixAttention(const PrefixConfig& config, Rng& rng, std::string name = "");

  /// A flat prefix from PEFT's `prompt_embeddings` [l, L·2·d].
  static PrefixAttention from_prompt_embeddings(const ConstMatrixRef<T>& table, Index num_layers,
                                                std::string name = "");

  Parameter<T> embedding;              ///< "embedding.weight": T (flat) or E (projected)
  Linear<T> transform_0, transform_2;  ///< "transform.0", "transform.2" (projected only)

  const PrefixConfig& config() const { return config_; }
  bool projected() const { return config_.prefix_projection; }
  Index num_virtual_tokens() const { return config_.num_virtual_tokens; }
  Index token_dim() const { return config_.token_dim; }
  Index num_layers() const { return config_.num_layers; }
  /// L·2·d: columns of the flat table.
  Index table_cols() const { return config_.num_layers * 2 * config_.token_dim; }

  /// Computes T [l, L·2·d] into the cache and zeroes the cache's gradient table.
  void forward(Cache& cache);

  /// Views of layer i's P_K, P_V [l, d] in the cache's table.
  PrefixKV<T> layer(const Cache& cache, Index i) const {
    check_layer(i);
    check_cache(cache.table);
    const Index d = token_dim();
    return PrefixKV<T>{cache.table.middleCols(2 * i * d, d), cache.table.middleCols((2 * i + 1) * d, d)};
  }

  /// Views of layer i's gradient slots in the cache (pass to MultiHeadAttention::backward).
  PrefixGrad<T> layer_grad(Cache& cache, Index i) const {
    check_layer(i);
    check_cache(cache.dtable);
    const Index d = token_dim();
    return PrefixGrad<T>{cache.dtable.middleCols(2 * i * d, d), cache.dtable.middleCols((2 * i + 1) * d, d)};
  }

  /// T [l, L·2·d] for an inference forward, with nothing kept for backward and no gradient table:
  /// the flat embedding itself, or T computed through the projection into a reused member buffer.
  const Matrix<T>& inference_table();

  /// Views of layer i's P_K, P_V [l, d] in a table from inference_table().
  PrefixKV<T> layer_of(const Matrix<T>& table, Index i) const {
    check_layer(i);
    check_cache(table);
    const Index d = token_dim();
    return PrefixKV<T>{table.middleCols(2 * i * d, d), table.middleCols((2 * i + 1) * d, d)};
  }

  /// Propagates cache.dtable into the trainable parameters' gradients (+=).
  void backward(const Cache& cache);

  /// The flat table T [l, L·2·d] = PEFT's saved `prompt_embeddings` (collapses the projection).
  Matrix<T> prompt_embeddings() {
    Cache c;
    forward(c);
    return c.table;
  }

  /// Replaces the reparameterisation by its flat table (for inference / export). Keeps the
  /// embedding's trainable flag; the transform layers are dropped.
  void collapse();

  /// Loads PEFT's `prompt_embeddings` [l, L·2·d]; a projected prefix becomes flat.
  void load_prompt_embeddings(const ConstMatrixRef<T>& table) {
    check::shape("PrefixAttention", this->name(), "prompt_embeddings", table.rows(), table.cols(), num_virtual_tokens(),
                 table_cols());
    if (projected()) collapse();
    embedding.value = table;
  }

 protected:
  void visit_own_parameters(const typename Module<T>::ParameterVisitor& fn) override {
    fn("embedding.weight", embedding);
  }
  void visit_children(const typename Module<T>::ChildVisitor& fn) override {
    if (!projected()) return;
    fn("transform.0", transform_0);
    fn("transform.2", transform_2);
  }

 private:
  void check_layer(Index i) const {
    if (i < 0 || i >= num_layers())
      throw ShapeError(describe("PrefixAttention", this->name()) + ": layer " + std::to_string(i) +
                       " is out of range for num_layers " + std::to_string(num_layers()));
  }
  void check_cache(const Matrix<T>& m) const {
    check::shape("PrefixAttention", this->name(), "cached table (call forward first)", m.rows(), m.cols(),
                 num_virtual_tokens(), table_cols());
  }

  PrefixConfig config_;
  Matrix<T> dhidden_;                 ///< backward scratch [l, h]
  Matrix<T> dembedding_;              ///< backward scratch [l, d]
  Matrix<T> hidden_inf_, table_inf_;  ///< inference_table()'s tanh(E W_0ᵀ + b_0) and T (projected only)
};

// ---- PrefixAttention members defined outside the class body (the test build's extern template declaration
// then covers them; see docs/CONTRIBUTING.md) ----
template <class T>
PrefixAttention<T>::PrefixAttention(const PrefixConfig& config, Rng& rng, std::string name)
    : Module<T>(std::move(name)), config_(config) {
  const std::string who = describe("PrefixAttention", this->name());
  if (config.num_virtual_tokens <= 0 || config.token_dim <= 0 || config.num_layers <= 0)
    throw ConfigError(who + ": num_virtual_tokens, token_dim and num_layers must be > 0, got " +
                      std::to_string(config.num_virtual_tokens) + ", " + std::to_string(config.token_dim) + ", " +
                      std::to_string(config.num_layers));
  if (config.prefix_projection) {
    if (config.encoder_hidden_size <= 0)
      throw ConfigError(who + ": prefix_projection needs encoder_hidden_size > 0, got " +
                        std::to_string(config.encoder_hidden_size));
    embedding = Parameter<T>(config.num_virtual_tokens, config.token_dim, true);
    transform_0 = Linear<T>(config.token_dim, config.encoder_hidden_size, rng);
    transform_2 = Linear<T>(config.encoder_hidden_size, table_cols(), rng);
  } else {
    embedding = Parameter<T>(config.num_virtual_tokens, table_cols(), true);
  }
  init::normal<T>(embedding.value, rng, 0.0, 1.0);
  this->set_name(this->name());
}

template <class T>
PrefixAttention<T> PrefixAttention<T>::from_prompt_embeddings(const ConstMatrixRef<T>& table, Index num_layers,
                                                              std::string name) {
  const std::string who = describe("PrefixAttention", name);
  if (num_layers <= 0 || table.rows() <= 0 || table.cols() <= 0 || table.cols() % (2 * num_layers) != 0)
    throw ShapeError(who + ": prompt_embeddings of shape " + shape_str(table.rows(), table.cols()) +
                     " do not split into num_layers=" + std::to_string(num_layers) + " x 2 x token_dim columns");
  PrefixAttention p;
  p.config_ = PrefixConfig{table.rows(), table.cols() / (2 * num_layers), num_layers, false, 0};
  p.embedding = Parameter<T>(table.rows(), table.cols(), true);
  p.embedding.value = table;
  p.set_name(name);
  return p;
}

template <class T>
void PrefixAttention<T>::forward(Cache& cache) {
  if (projected()) {
    transform_0.forward(embedding.value, cache.hidden, cache.c0);  // Z = E W_0ᵀ + b_0   [l, h]
    cache.hidden.array() = cache.hidden.array().tanh();            // H = tanh Z
    transform_2.forward(cache.hidden, cache.table, cache.c2);      // T = H W_2ᵀ + b_2   [l, L·2·d]
  } else {
    cache.table = embedding.value;
  }
  cache.dtable.setZero(num_virtual_tokens(), table_cols());
}

template <class T>
const Matrix<T>& PrefixAttention<T>::inference_table() {
  if (!projected()) return embedding.value;
  transform_0.forward_inference(embedding.value, hidden_inf_);  // Z = E W_0ᵀ + b_0   [l, h]
  hidden_inf_.array() = hidden_inf_.array().tanh();             // H = tanh Z
  transform_2.forward_inference(hidden_inf_, table_inf_);       // T = H W_2ᵀ + b_2   [l, L·2·d]
  return table_inf_;
}

template <class T>
void PrefixAttention<T>::backward(const Cache& cache) {
  check_cache(cache.dtable);
  if (!projected()) {
    if (embedding.trainable()) embedding.grad += cache.dtable;  // dT is the gradient of the table itself
    return;
  }
  transform_2.backward(cache.c2, cache.dtable, &dhidden_);   // dH = dT W_2   [l, h]
  dhidden_.array() *= T(1) - cache.hidden.array().square();  // dZ = dH ⊙ (1 − H²)
  Matrix<T>* dE = embedding.trainable() ? &dembedding_ : nullptr;
  transform_0.backward(cache.c0, dhidden_, dE);  // dE = dZ W_0   [l, d]
  if (dE != nullptr) embedding.grad += dembedding_;
}

template <class T>
void PrefixAttention<T>::collapse() {
  if (!projected()) return;
  const bool trainable = embedding.trainable();
  Matrix<T> table = prompt_embeddings();
  embedding = Parameter<T>(table.rows(), table.cols(), trainable);
  embedding.value = std::move(table);
  transform_0 = Linear<T>();
  transform_2 = Linear<T>();
  config_.prefix_projection = false;
  config_.encoder_hidden_size = 0;
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
namespace peft {
extern template class PrefixAttention<float>;
extern template class PrefixAttention<double>;
}  // namespace peft
#endif
