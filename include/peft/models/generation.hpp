#pragma once
// Text generation for LlamaForCausalLM with its KV cache (models/llama.hpp): greedy decoding and
// sampling with temperature, top-k, top-p and a repetition penalty, applied in transformers'
// order (GenerationMixin._get_logits_processor: RepetitionPenaltyLogitsProcessor, then the warpers
// TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper):
//
//   repetition penalty θ: for every token id already in the sequence (prompt included),
//                         z ← z / θ if z > 0 else z · θ
//   greedy:               next = argmax z (the first maximum, as torch.argmax)
//   temperature τ:        z ← z / τ
//   top-k:                ids whose logit is below the k-th largest are removed (ties with it kept)
//   top-p:                sorted ascending, ids whose cumulative probability is ≤ 1 − p are removed,
//                         the most probable id always kept
//   sample:               from softmax(z) over what is left, with a seeded peft::Rng (reproducible
//                         here; torch's generator draws differently, so sampled ids are not HF's)
//
// Greedy decoding reproduces transformers' generate(do_sample=False) token for token (checked on
// the fixtures, adapters active, disabled and merged). Generation stops after max_new_tokens or at
// an eos id (which is kept in the output, as HF does).
//
// generate_batch runs several prompts of different lengths at once, as transformers does with a
// tokenizer's padding_side="left": the prompts are left-padded into one batch, the KV cache holds
// every row, positions count each row's own tokens (HF's cumsum(attention_mask) − 1), and each row
// stops on its own (eos or max_new_tokens; a finished row is fed the pad id until all are done, as
// HF does, and its output ends at its eos). Per-row adapters: adapter_names[b] names the adapter of
// row b, or "none" / "__base__" for the base model (PEFT's generate(..., adapter_names=[...])).
// Greedy ids equal generating each row alone (tests/models) and transformers' batched generate on
// the fixture. Sampling draws row by row from one Rng.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/rng.hpp"
#include "peft/models/llama.hpp"

namespace peft {

struct GenerationConfig {
  Index max_new_tokens = 20;
  bool do_sample = false;            ///< false: greedy (temperature, top_k, top_p unused)
  double temperature = 1.0;          ///< > 0
  Index top_k = 0;                   ///< 0: off
  double top_p = 1.0;                ///< in (0, 1]; 1: off
  double repetition_penalty = 1.0;   ///< > 0; 1: off
  std::vector<Index> eos_token_ids;  ///< stop after generating one of these
  Index pad_token_id = 0;            ///< fed to padding and finished rows of a batch (never attended)
};

/// Applies the processors above to `logits` [vocab] in place (repetition penalty always; the
/// warpers only when config.do_sample) and returns the next token: argmax when greedy, else a
/// draw from `rng`. `history`: the sequence so far (prompt + generated).
template <class T>
Index next_token(RowVector<T>& logits, const std::vector<Index>& history, const GenerationConfig& config, Rng& rng) {
  const Index V = logits.size();
  if (config.repetition_penalty != 1.0) {
    const T theta = static_cast<T>(config.repetition_penalty);
    std::vector<bool> seen(static_cast<std::size_t>(V), false);
    for (Index id : history)
      if (id >= 0 && id < V && !seen[static_cast<std::size_t>(id)]) {
        seen[static_cast<std::size_t>(id)] = true;
        logits(id) = logits(id) > T(0) ? logits(id) / theta : logits(id) * theta;
      }
  }
  Index best = 0;
  if (!config.do_sample) {
    for (Index i = 1; i < V; ++i)
      if (logits(i) > logits(best)) best = i;  // first maximum
    return best;
  }
  const T neg_inf = -std::numeric_limits<T>::infinity();
  if (config.temperature != 1.0) logits /= static_cast<T>(config.temperature);
  if (config.top_k > 0 && config.top_k < V) {
    std::vector<T> v(logits.data(), logits.data() + V);
    std::nth_element(v.begin(), v.begin() + (config.top_k - 1), v.end(), std::greater<T>());
    const T kth = v[static_cast<std::size_t>(config.top_k - 1)];
    for (Index i = 0; i < V; ++i)
      if (logits(i) < kth) logits(i) = neg_inf;
  }
  if (config.top_p < 1.0) {
    std::vector<Index> order(static_cast<std::size_t>(V));
    std::iota(order.begin(), order.end(), Index(0));
    std::stable_sort(order.begin(), order.end(), [&](Index a, Index b) { return logits(a) < logits(b); });  // ascending
    const T mx = logits.maxCoeff();
    double total = 0.0;
    for (Index i = 0; i < V; ++i) total += std::exp(static_cast<double>(logits(i) - mx));
    double cum = 0.0;
    for (Index j = 0; j + 1 < V; ++j) {  // the last (most probable) is always kept
      const Index id = order[static_cast<std::size_t>(j)];
      cum += std::exp(static_cast<double>(logits(id) - mx)) / total;
      if (cum <= 1.0 - config.top_p) logits(id) = neg_inf;
    }
  }
  const T mx = logits.maxCoeff();
  double total = 0.0;
  for (Index i = 0; i < V; ++i) total += std::exp(static_cast<double>(logits(i) - mx));
  const double u = rng.uniform() * total;
  double cum = 0.0;
  best = V - 1;
  for (Index i = 0; i < V; ++i) {
    const double w = std::exp(static_cast<double>(logits(i) - mx));
    if (w == 0.0) continue;
    cum += w;
    best = i;
    if (u < cum) break;
  }
  return best;
}

/// Generates up to max_new_tokens after `prompt` and returns prompt + generated ids (HF's
/// generate() output for one sequence). The prompt runs as one cached forward, then one token per
/// step.
namespace detail {
inline void check_generation_config(const GenerationConfig& config, const char* who) {
  const std::string w = who;
  if (config.max_new_tokens < 0) throw ConfigError(w + ": max_new_tokens must be >= 0");
  if (config.do_sample && !(config.temperature > 0.0))
    throw ConfigError(w + ": temperature must be > 0, got " + std::to_string(config.temperature));
  if (!(config.top_p > 0.0 && config.top_p <= 1.0))
    throw ConfigError(w + ": top_p must be in (0, 1], got " + std::to_string(config.top_p));
  if (!(config.repetition_penalty > 0.0))
    throw ConfigError(w + ": repetition_penalty must be > 0, got " + std::to_string(config.repetition_penalty));
  if (config.top_k < 0) throw ConfigError(w + ": top_k must be >= 0");
}
}  // namespace detail

template <class T>
std::vector<Index> generate(LlamaForCausalLM<T>& model, const std::vector<Index>& prompt,
                            const GenerationConfig& config, Rng& rng) {
  if (prompt.empty()) throw ShapeError("generate: the prompt is empty");
  detail::check_generation_config(config, "generate");
  std::vector<Index> out = prompt;
  if (config.max_new_tokens == 0) return out;
  LlamaKVCache<T> kv =
      model.make_kv_cache(static_cast<Index>(prompt.size()) + config.max_new_tokens + model.prompt_length());
  Matrix<T> logits;
  RowVector<T> last;
  std::vector<Index> step = prompt;
  for (Index n = 0; n < config.max_new_tokens; ++n) {
    model.forward_cached(step, kv, logits);
    last = logits.row(logits.rows() - 1);
    const Index id = next_token(last, out, config, rng);
    out.push_back(id);
    if (std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), id) != config.eos_token_ids.end()) break;
    step.assign(1, id);
  }
  return out;
}

/// Generates for a batch of prompts at once (left-padded, see above) and returns, per row, its
/// prompt + generated ids (no padding; up to and including its eos). `adapter_names`: empty (the
/// active adapters) or one name per prompt.
template <class T>
std::vector<std::vector<Index>> generate_batch(LlamaForCausalLM<T>& model,
                                               const std::vector<std::vector<Index>>& prompts,
                                               const GenerationConfig& config, Rng& rng,
                                               const std::vector<std::string>& adapter_names = {}) {
  if (prompts.empty()) throw ShapeError("generate_batch: no prompts");
  for (std::size_t b = 0; b < prompts.size(); ++b)
    if (prompts[b].empty()) throw ShapeError("generate_batch: prompt " + std::to_string(b) + " is empty");
  detail::check_generation_config(config, "generate_batch");
  std::vector<std::vector<Index>> out = prompts;
  if (config.max_new_tokens == 0) return out;
  SequenceLayout layout;
  std::vector<Index> ids = pack_token_ids(prompts, layout, config.pad_token_id, /*left=*/true);
  const Index B = layout.batch;
  LlamaKVCache<T> kv = model.make_kv_cache(layout.seq + config.max_new_tokens + model.prompt_length(), B);
  Matrix<T> logits;
  RowVector<T> last;
  std::vector<bool> done(static_cast<std::size_t>(B), false);
  Index running = B;
  for (Index n = 0; n < config.max_new_tokens && running > 0; ++n) {
    model.forward_cached(ids, layout, kv, logits, adapter_names);
    const Index m = layout.seq;
    for (Index b = 0; b < B; ++b) {
      const std::size_t ub = static_cast<std::size_t>(b);
      if (done[ub]) {
        ids[ub] = config.pad_token_id;
        continue;
      }
      last = logits.row(b * m + m - 1);
      const Index id = next_token(last, out[ub], config, rng);
      out[ub].push_back(id);
      ids[ub] = id;
      if (std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), id) != config.eos_token_ids.end()) {
        done[ub] = true;
        --running;
      }
    }
    ids.resize(static_cast<std::size_t>(B));
    layout = SequenceLayout(B, 1);
  }
  return out;
}

}  // namespace peft
