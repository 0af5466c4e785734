#pragma once
// Causal language-modelling loss as transformers' ForCausalLMLoss computes it (loss_utils.py):
// logits at position t predict the label at t + 1 ("shifted labels"), the last position of every
// sequence predicts nothing, labels equal to ignore_index (-100: prompt tokens, padding) are
// skipped, and the loss is the mean over the kept targets:
//
//   L = (1/N) Σ_{b, t : y_{b,t+1} kept} (logsumexp(z_{b,t}) − z_{b,t}[y_{b,t+1}])
//   ∂L/∂z_{b,t} = (softmax(z_{b,t}) − onehot(y_{b,t+1})) / N   (0 for rows predicting nothing)
//
// With a SequenceLayout, targets on padding positions (t + 1 ≥ length b, or before first(b) when
// left-padded) are skipped as well,
// whatever their label (Hugging Face's collators set them to -100; the model's padding rows are not
// HF's, see models/llama.hpp). When nothing is kept the loss is 0 with a zero gradient (torch: NaN).
// perplexity = exp(L); bits per byte = Σ nll / (ln 2 · bytes of the text scored).
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/parallel.hpp"
#include "peft/core/sequence.hpp"
#include "peft/core/types.hpp"
#include "peft/loss/common.hpp"

namespace peft {

/// What a causal-LM loss evaluation summed: Σ nll (nats) over `tokens` kept targets.
struct CausalLMStats {
  double nll_sum = 0.0;
  Index tokens = 0;
};

/// Mean next-token cross-entropy of `logits` [B·S, V] against `labels` [B·S] (the input ids with
/// ignore_index where nothing is to be predicted), laid out by `layout`. Writes ∂L/∂logits into
/// *dlogits unless null (resized only when its shape differs) and the sums into *stats unless null.
template <class T>
T causal_lm_loss(const ConstMatrixRef<T>& logits, const std::vector<std::int64_t>& labels, const SequenceLayout& layout,
                 Matrix<T>* dlogits, CausalLMStats* stats = nullptr, std::int64_t ignore_index = -100) {
  const Index n = logits.rows(), V = logits.cols();
  layout.validate("causal_lm_loss", n);
  if (static_cast<Index>(labels.size()) != n)
    throw ShapeError("causal_lm_loss: " + std::to_string(labels.size()) + " labels for logits of shape " +
                     shape_str(n, V) + ", expected " + std::to_string(n));
  const Index S = layout.seq;
  auto target = [&](Index b, Index t) -> std::int64_t {                       // label predicted by row (b, t)
    if (!layout.valid(b, t) || !layout.valid(b, t + 1)) return ignore_index;  // left or right padding
    return labels[static_cast<std::size_t>(b * S + t + 1)];
  };
  Index kept = 0;
  for (Index b = 0; b < layout.batch; ++b)
    for (Index t = 0; t < S; ++t) {
      const std::int64_t y = target(b, t);
      if (y == ignore_index) continue;
      if (y < 0 || y >= static_cast<std::int64_t>(V))
        throw ShapeError("causal_lm_loss: label at sequence " + std::to_string(b) + ", position " +
                         std::to_string(t + 1) + " is " + std::to_string(y) + ", expected a token in [0, " +
                         std::to_string(V) + ") or ignore_index " + std::to_string(ignore_index));
      ++kept;
    }
  if (dlogits != nullptr && (dlogits->rows() != n || dlogits->cols() != V)) dlogits->resize(n, V);
  if (stats != nullptr) *stats = CausalLMStats{0.0, kept};
  if (kept == 0) {
    if (dlogits != nullptr) dlogits->setZero();
    return T(0);
  }
  const T inv_n = T(1) / static_cast<T>(kept);
  // Rows split between threads; each row's term kept apart and summed below in row order, so the
  // loss does not depend on the thread count. A non-finite row leaves NaN there (thrown below: the
  // parallel body must not throw).
  // The calling thread's buffer, named through a reference: inside the region the name of a
  // thread_local would be each worker's own (empty) instance.
  thread_local std::vector<double> row_nll_buffer;  // grows once, then reused
  std::vector<double>& row_nll = row_nll_buffer;
  row_nll.resize(static_cast<std::size_t>(n));
  parallel_rows(n, 16.0 * static_cast<double>(V), [&](Index begin, Index end) {
    for (Index r = begin; r < end; ++r) {
      const std::int64_t y = target(r / S, r % S);
      double& term = row_nll[static_cast<std::size_t>(r)];
      if (y == ignore_index) {
        term = 0.0;
        if (dlogits != nullptr) dlogits->row(r).setZero();
        continue;
      }
      const auto z = logits.row(r);
      if (!z.allFinite()) {
        term = std::numeric_limits<double>::quiet_NaN();
        continue;
      }
      const T m = z.maxCoeff();
      const T lse = m + std::log((z.array() - m).exp().sum());  // logsumexp(z)
      term = static_cast<double>(lse - z(static_cast<Index>(y)));
      if (dlogits != nullptr) {
        dlogits->row(r).array() = (z.array() - lse).exp() * inv_n;  // softmax / N
        (*dlogits)(r, static_cast<Index>(y)) -= inv_n;              // − onehot / N
      }
    }
  });
  double total = 0.0;
  for (Index r = 0; r < n; ++r) {
    const double term = row_nll[static_cast<std::size_t>(r)];
    if (std::isnan(term)) throw NumericError("causal_lm_loss: logits row " + std::to_string(r) + " contains NaN or Inf");
    total += term;
  }
  if (stats != nullptr) stats->nll_sum = total;
  return static_cast<T>(total / static_cast<double>(kept));
}

/// exp(mean nll).
inline double perplexity(double mean_nll) { return std::exp(mean_nll); }
inline double perplexity(const CausalLMStats& s) {
  if (s.tokens <= 0) throw ConfigError("perplexity: no scored tokens");
  return std::exp(s.nll_sum / static_cast<double>(s.tokens));
}

/// Bits per byte: Σ nll (nats) / (ln 2 · bytes), bytes = the UTF-8 size of the scored text.
inline double bits_per_byte(double nll_sum, std::int64_t bytes) {
  if (bytes <= 0) throw ConfigError("bits_per_byte: byte count must be > 0, got " + std::to_string(bytes));
  return nll_sum / (std::log(2.0) * static_cast<double>(bytes));
}
inline double bits_per_byte(const CausalLMStats& s, std::int64_t bytes) { return bits_per_byte(s.nll_sum, bytes); }

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_CAUSAL_LM_TEMPLATES(KW, T)                                                                              \
  KW template T causal_lm_loss<T>(const ConstMatrixRef<T>&, const std::vector<std::int64_t>&, const SequenceLayout&, \
                                  Matrix<T>*, CausalLMStats*, std::int64_t);
namespace peft {
PEFT_CAUSAL_LM_TEMPLATES(extern, float)
PEFT_CAUSAL_LM_TEMPLATES(extern, double)
}  // namespace peft
#endif
