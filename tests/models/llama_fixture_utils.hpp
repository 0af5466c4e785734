#pragma once
// Shared by the Llama tests that read transformers' fixtures or check gradients
// (tests/models/test_llama.cpp, test_llama_batch.cpp, test_llama_sliding.cpp): fixture batches,
// random weights, a gradient-check LoRA and the finite-difference check of every parameter.
#include <cstdint>
#include <string>
#include <vector>

#include <peft/core/sequence.hpp>
#include <peft/io/methods.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/loss/causal_lm.hpp>
#include <peft/models/llama.hpp>
#include <peft/train/gradient_check.hpp>

#include "support/test_utils.hpp"

namespace peft::test {

/// A fixture's ids [B, S] and 0/1 attention mask [B, S] → ids [B·S] and their layout (left
/// padding when a first column holds padding, else right).
inline void fixture_batch(const io::SafeTensorsFile& st, const std::string& ids_key, const std::string& mask_key,
                          std::vector<Index>& ids, SequenceLayout& layout) {
  const Matrix<double> id = st.load<double>(ids_key), mask = st.load<double>(mask_key);
  std::vector<Index> lengths;
  ids.clear();
  for (Index b = 0; b < id.rows(); ++b) {
    lengths.push_back(static_cast<Index>(mask.row(b).sum()));
    for (Index s = 0; s < id.cols(); ++s) ids.push_back(static_cast<Index>(id(b, s)));
  }
  layout = SequenceLayout(id.rows(), id.cols(), lengths);
  layout.left_padded = mask.col(0).sum() < static_cast<double>(id.rows());
}

/// Every weight N(0, 0.5²), the RMSNorm weights 1 + N(0, 0.3²): far from the initialisation.
template <class T>
void randomize_llama(LlamaForCausalLM<T>& m, Rng& rng) {
  m.visit_parameters([&](const std::string& n, Parameter<T>& p) {
    for (Index i = 0; i < p.value.size(); ++i)
      p.value.data()[i] = static_cast<T>(n.find("norm") != std::string::npos ? 1.0 + 0.3 * rng.normal(0.0, 1.0)
                                                                             : 0.5 * rng.normal(0.0, 1.0));
  });
}

/// A LoRA on q_proj and down_proj (r 2, alpha 3, non-zero B), and every parameter trainable.
inline void add_gradient_check_lora(LlamaForCausalLM<double>& model, Rng& rng) {
  io::Json cfg = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 3}, {"target_modules", {"q_proj", "down_proj"}}};
  io::apply_method<double>(model, cfg, "default", rng);
  model.visit_parameters([&](const std::string& n, Parameter<double>& p) {
    if (n.find("lora_B") != std::string::npos)
      p.value = random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.5);
    p.set_trainable(true);
  });
}

/// The causal-LM loss's gradient of every parameter against central differences; `out` is the
/// logits' layout (model.output_layout(layout) with virtual tokens).
inline void check_llama_gradients(LlamaForCausalLM<double>& model, const std::vector<Index>& ids,
                                  const SequenceLayout& layout, const std::vector<std::int64_t>& labels,
                                  const SequenceLayout& out) {
  typename LlamaForCausalLM<double>::Cache cache;
  Matrix<double> logits, dlogits;
  auto loss = [&]() {
    model.forward(ids, layout, logits, cache);
    return causal_lm_loss<double>(logits, labels, out, nullptr);
  };
  model.forward(ids, layout, logits, cache);
  REQUIRE(logits.rows() == out.rows());
  causal_lm_loss<double>(logits, labels, out, &dlogits);
  model.zero_grad();
  model.backward(cache, dlogits);
  int n = 0;
  model.visit_parameters([&](const std::string& name, Parameter<double>& p) {
    INFO(name);
    const Matrix<double> num = numerical_gradient(p.value, loss);
    CHECK(relative_error(p.grad, num) < Tolerances<double>::grad);
    ++n;
  });
  CHECK(n > 20);
}

/// Left-padded `prompts` through forward_cached, then the continuations `more` (the same count per
/// sequence) one token per step: every valid prompt row and every step's logits equal the full
/// forward of prompt + continuation (relative 1e-12). Returns the cache, filled to its capacity.
inline LlamaKVCache<double> check_kv_cache_equals_forward(LlamaForCausalLM<double>& model,
                                                          const std::vector<std::vector<Index>>& prompts,
                                                          const std::vector<std::vector<Index>>& more) {
  const Index B = static_cast<Index>(prompts.size()), steps = static_cast<Index>(more.front().size());
  std::vector<std::vector<Index>> full = prompts;
  for (std::size_t b = 0; b < full.size(); ++b) full[b].insert(full[b].end(), more[b].begin(), more[b].end());
  SequenceLayout fl, pl;
  const std::vector<Index> fids = pack_token_ids(full, fl, 0, true);
  const std::vector<Index> pids = pack_token_ids(prompts, pl, 0, true);
  typename LlamaForCausalLM<double>::Cache cache;
  const Matrix<double> want = model.forward(fids, fl, cache);
  const Index n = model.prompt_length(), S = model.output_layout(fl).seq, P = pl.seq;
  LlamaKVCache<double> kv = model.make_kv_cache(P + steps + n, B);
  Matrix<double> got;
  model.forward_cached(pids, pl, kv, got);
  REQUIRE(got.rows() == B * P);
  for (Index b = 0; b < B; ++b)
    for (Index t = pl.first(b); t < P; ++t)  // a left-padded prompt row t is full row n + t (same padding)
      CHECK(rel_diff(Matrix<double>(got.row(b * P + t)), Matrix<double>(want.row(b * S + n + t))) < 1e-12);
  std::vector<Index> step(static_cast<std::size_t>(B));
  for (Index t = 0; t < steps; ++t) {
    for (Index b = 0; b < B; ++b)
      step[static_cast<std::size_t>(b)] = more[static_cast<std::size_t>(b)][static_cast<std::size_t>(t)];
    model.forward_cached(step, SequenceLayout(B, 1), kv, got);
    for (Index b = 0; b < B; ++b)
      CHECK(rel_diff(Matrix<double>(got.row(b)), Matrix<double>(want.row(b * S + n + P + t))) < 1e-12);
  }
  return kv;
}

}  // namespace peft::test
