#pragma once
// Preference-tuning losses on sequence log-probabilities: the log-probability utilities (sequence
// log-probs with masks, per-token KL estimators) and Direct Preference Optimization with its IPO and
// conservative variants. Built on loss/kl.hpp's label_log_probs.
//
// sequence_log_probs, causal (shifted like loss/causal_lm.hpp): row (b, t) of the logits predicts
// label y_{b,t+1}; targets equal to ignore_index (prompt tokens) and targets on padding positions
// (t + 1 ≥ length b) are masked out. Per sequence b:
//   log π(y_b) = Σ_{t kept} log softmax(z_{b,t})[y_{b,t+1}]      (average: divided by the kept count)
//   backward: ∂L/∂z_{b,t} = g_b (onehot(y_{b,t+1}) − softmax(z_{b,t}))   (/ count when averaged)
// A sequence with nothing kept has log-prob 0 and no gradient.
//
// DPO (Rafailov et al., 2023, "Direct Preference Optimization", eq. 7), with π the policy and
// π_ref the reference, over N pairs (chosen y⁺, rejected y⁻):
//   h_i = (log π(y⁺_i) − log π(y⁻_i)) − (log π_ref(y⁺_i) − log π_ref(y⁻_i))
//   sigmoid (DPO):          ℓ_i = −log σ(β h_i)
//   conservative (cDPO, Mitchell 2023, label smoothing ε ∈ [0, 0.5)):
//                           ℓ_i = −(1 − ε) log σ(β h_i) − ε log σ(−β h_i)
//   IPO (Azar et al., 2023, "A General Theoretical Paradigm to Understand Learning from Human
//        Preferences", eq. 17):  ℓ_i = (h_i − 1/(2β))²
//   L = (1/N) Σ_i ℓ_i, as TRL's DPOTrainer (loss_type "sigmoid" with label_smoothing, and "ipo").
//   ∂ℓ/∂h: sigmoid/cDPO  β (ε σ(β h) − (1 − ε) σ(−β h));   IPO  2 (h − 1/(2β))
//   ∂L/∂log π(y⁺_i) = ∂ℓ_i/∂h_i / N,   ∂L/∂log π(y⁻_i) = −∂ℓ_i/∂h_i / N. The reference is a
//   constant (no gradient). TRL feeds IPO the length-averaged log-probs (sequence_log_probs with
//   average = true); the loss itself takes whatever log-probs it is given.
// Implicit rewards (reported): r⁺_i = β (log π(y⁺_i) − log π_ref(y⁺_i)), r⁻_i likewise.
//
// Per-token KL estimators of KL(π ‖ π_ref) from tokens sampled from π (Schulman, 2020,
// "Approximating KL Divergence"; TRL's PPO/GRPO), with r = log π_ref(x) − log π(x):
//   k1 = −r             (unbiased, high variance, can be negative)   ∂/∂log π = 1
//   k2 = r² / 2         (biased, low variance)                       ∂/∂log π = −r
//   k3 = (eʳ − 1) − r   (unbiased, ≥ 0, low variance)                ∂/∂log π = 1 − eʳ
// Masked tokens whose two log-probs are both 0 (label_log_probs' ignored rows) give 0 in all three.
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/sequence.hpp"
#include "peft/core/types.hpp"
#include "peft/loss/bradley_terry.hpp"
#include "peft/loss/common.hpp"
#include "peft/loss/kl.hpp"

namespace peft {

/// Reusable buffers of sequence_log_probs (allocation-free once the shapes are fixed). After a
/// forward, `token_log_probs` [B·S, 1] holds the per-token log-probs (0 where masked) and `counts`
/// the kept tokens per sequence; backward reads them.
template <class T>
struct SequenceLogProbWorkspace {
  std::vector<std::int64_t> targets;  ///< label predicted by each row, ignore_index where masked
  std::vector<Index> counts;          ///< kept targets per sequence
  Matrix<T> token_log_probs;          ///< [B·S, 1]
  Matrix<T> token_grad;               ///< [B·S, 1] backward scratch
  bool average = false;
  std::int64_t ignore_index = -100;
};

/// Per-sequence log-probability of `labels` [B·S] under `logits` [B·S, V] laid out by `layout`
/// (causal shift, masks as above), into *out [B, 1] (resized only when its shape differs); the
/// per-token terms stay in ws.token_log_probs. `average` divides each sum by its kept count.
template <class T>
void sequence_log_probs(const ConstMatrixRef<T>& logits, const std::vector<std::int64_t>& labels,
                        const SequenceLayout& layout, Matrix<T>& out, SequenceLogProbWorkspace<T>& ws,
                        bool average = false, std::int64_t ignore_index = -100) {
  const Index n = logits.rows(), V = logits.cols();
  layout.validate("sequence_log_probs", n);
  if (static_cast<Index>(labels.size()) != n)
    throw ShapeError("sequence_log_probs: " + std::to_string(labels.size()) + " labels for logits of shape " +
                     shape_str(n, V) + ", expected " + std::to_string(n));
  const Index B = layout.batch, S = layout.seq;
  ws.targets.resize(static_cast<std::size_t>(n));
  ws.counts.assign(static_cast<std::size_t>(B), 0);
  ws.average = average;
  ws.ignore_index = ignore_index;
  for (Index b = 0; b < B; ++b)
    for (Index t = 0; t < S; ++t) {
      const std::int64_t y = t + 1 < layout.length(b) ? labels[static_cast<std::size_t>(b * S + t + 1)] : ignore_index;
      ws.targets[static_cast<std::size_t>(b * S + t)] = y;
      if (y != ignore_index) ++ws.counts[static_cast<std::size_t>(b)];
    }
  label_log_probs<T>(logits, ws.targets, ws.token_log_probs, ignore_index);  // checks the labels
  if (out.rows() != B || out.cols() != 1) out.resize(B, 1);
  for (Index b = 0; b < B; ++b) {
    double sum = 0.0;
    for (Index t = 0; t < S; ++t) sum += static_cast<double>(ws.token_log_probs(b * S + t, 0));
    const Index c = ws.counts[static_cast<std::size_t>(b)];
    out(b, 0) = static_cast<T>(average && c > 0 ? sum / static_cast<double>(c) : sum);
  }
}

/// Backward of sequence_log_probs (the same logits, labels and layout as the forward that filled
/// `ws`): g = ∂L/∂log π [B, 1] → ∂L/∂logits into *dlogits (overwritten; resized only when needed).
template <class T>
void sequence_log_probs_backward(const ConstMatrixRef<T>& logits, const SequenceLayout& layout,
                                 const ConstMatrixRef<T>& grad, Matrix<T>& dlogits, SequenceLogProbWorkspace<T>& ws) {
  const Index n = logits.rows(), B = layout.batch, S = layout.seq;
  if (static_cast<Index>(ws.targets.size()) != n || static_cast<Index>(ws.counts.size()) != B || B * S != n)
    throw ShapeError("sequence_log_probs_backward: logits of shape " + shape_str(n, logits.cols()) + " and a layout [" +
                     std::to_string(B) + ", " + std::to_string(S) + "], but the workspace holds " +
                     std::to_string(ws.targets.size()) + " targets of " + std::to_string(ws.counts.size()) +
                     " sequences (run sequence_log_probs on these logits first)");
  if (grad.rows() != B || grad.cols() != 1)
    throw ShapeError("sequence_log_probs_backward: gradient of shape " + shape_str(grad.rows(), grad.cols()) +
                     ", expected " + shape_str(B, 1));
  if (ws.token_grad.rows() != n || ws.token_grad.cols() != 1) ws.token_grad.resize(n, 1);
  for (Index b = 0; b < B; ++b) {
    const Index c = ws.counts[static_cast<std::size_t>(b)];
    const T g = ws.average && c > 0 ? grad(b, 0) / static_cast<T>(c) : grad(b, 0);
    for (Index t = 0; t < S; ++t) ws.token_grad(b * S + t, 0) = g;
  }
  label_log_probs_backward<T>(logits, ws.targets, ws.token_grad, dlogits, ws.ignore_index);
}

// ------------------------------------------------------------------------------------------------
// Per-token KL estimators
// ------------------------------------------------------------------------------------------------

enum class KLEstimator {
  kK1,  ///< log π − log π_ref
  kK2,  ///< (log π_ref − log π)² / 2
  kK3,  ///< exp(log π_ref − log π) − 1 − (log π_ref − log π)
};

/// Elementwise estimator of KL(π ‖ π_ref) from `log_probs` (log π of sampled tokens) and
/// `ref_log_probs` (log π_ref of the same tokens), any equal shapes, into *out; writes
/// ∂estimate/∂log π elementwise into *dlog_probs unless null. The reference gets no gradient.
template <class T>
void kl_estimate(const ConstMatrixRef<T>& log_probs, const ConstMatrixRef<T>& ref_log_probs, KLEstimator kind,
                 Matrix<T>& out, Matrix<T>* dlog_probs = nullptr) {
  if (log_probs.rows() != ref_log_probs.rows() || log_probs.cols() != ref_log_probs.cols())
    throw ShapeError("kl_estimate: log-probabilities have shape " + shape_str(log_probs.rows(), log_probs.cols()) +
                     ", reference log-probabilities have shape " +
                     shape_str(ref_log_probs.rows(), ref_log_probs.cols()) + ", expected equal shapes");
  detail::check_finite_rows<T>("kl_estimate", log_probs, "log-probabilities");
  detail::check_finite_rows<T>("kl_estimate", ref_log_probs, "reference log-probabilities");
  const Index n = log_probs.rows(), c = log_probs.cols();
  if (out.rows() != n || out.cols() != c) out.resize(n, c);
  if (dlog_probs && (dlog_probs->rows() != n || dlog_probs->cols() != c)) dlog_probs->resize(n, c);
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < c; ++j) {
      const T r = ref_log_probs(i, j) - log_probs(i, j);
      T v = T(0), d = T(0);
      switch (kind) {
        case KLEstimator::kK1:
          v = -r;
          d = T(1);
          break;
        case KLEstimator::kK2:
          v = r * r / T(2);
          d = -r;
          break;
        case KLEstimator::kK3: {
          const T em1 = std::expm1(r);  // eʳ − 1, exact near r = 0
          v = em1 - r;
          d = -em1;
          break;
        }
      }
      if (!std::isfinite(v))
        throw NumericError("kl_estimate: estimate at (" + std::to_string(i) + ", " + std::to_string(j) +
                           ") overflows (log-ratio " + check::num(static_cast<double>(r)) + ")");
      out(i, j) = v;
      if (dlog_probs) (*dlog_probs)(i, j) = d;
    }
}

// ------------------------------------------------------------------------------------------------
// DPO and its variants
// ------------------------------------------------------------------------------------------------

enum class PreferenceLoss {
  kSigmoid,  ///< DPO's −log σ(β h) (with label_smoothing: conservative DPO)
  kIPO,      ///< IPO's (h − 1/(2β))²
};

struct DPOOptions {
  double beta = 0.1;  ///< β > 0: the KL-penalty strength (IPO: the target margin is 1/(2β))
  PreferenceLoss loss = PreferenceLoss::kSigmoid;
  double label_smoothing = 0.0;  ///< ε ∈ [0, 0.5): cDPO's probability that a label is flipped (sigmoid only)
};

/// What a DPO loss evaluation measured (means over pairs, TRL's rewards/* metrics).
struct DPOStats {
  double loss = 0.0;
  double reward_chosen = 0.0;    ///< mean β (log π(y⁺) − log π_ref(y⁺))
  double reward_rejected = 0.0;  ///< mean β (log π(y⁻) − log π_ref(y⁻))
  double margin = 0.0;           ///< mean of r⁺ − r⁻ (= β h)
  double accuracy = 0.0;         ///< fraction of pairs with r⁺ > r⁻
  Index pairs = 0;
};

namespace detail {
inline void check_dpo_options(const DPOOptions& o) {
  if (!std::isfinite(o.beta) || o.beta <= 0.0)
    throw ConfigError("dpo_loss: beta must be finite and > 0, got " + check::num(o.beta));
  if (!(o.label_smoothing >= 0.0 && o.label_smoothing < 0.5))
    throw ConfigError("dpo_loss: label_smoothing must be in [0, 0.5), got " + check::num(o.label_smoothing));
  if (o.loss == PreferenceLoss::kIPO && o.label_smoothing != 0.0)
    throw ConfigError("dpo_loss: label_smoothing applies to the sigmoid loss only, got " +
                      check::num(o.label_smoothing) + " with IPO");
}
}  // namespace detail

/// The DPO family's loss over N pairs: sequence log-probs of the policy and of the reference for
/// the chosen and the rejected answers, each [N, 1] (or any equal shapes: one pair per element).
/// Writes ∂L/∂(policy chosen) and ∂L/∂(policy rejected) (resized only when needed) unless null and
/// the metrics into *stats unless null. Empty inputs give 0.
template <class T>
T dpo_loss(const ConstMatrixRef<T>& policy_chosen, const ConstMatrixRef<T>& policy_rejected,
           const ConstMatrixRef<T>& ref_chosen, const ConstMatrixRef<T>& ref_rejected, Matrix<T>* dchosen,
           Matrix<T>* drejected, const DPOOptions& options = {}, DPOStats* stats = nullptr) {
  detail::check_dpo_options(options);
  const Index rows = policy_chosen.rows(), cols = policy_chosen.cols();
  auto same = [&](const ConstMatrixRef<T>& m, const char* name) {
    if (m.rows() != rows || m.cols() != cols)
      throw ShapeError(std::string("dpo_loss: ") + name + " log-probabilities have shape " +
                       shape_str(m.rows(), m.cols()) + ", expected the policy's chosen shape " + shape_str(rows, cols));
    detail::check_finite_rows<T>("dpo_loss", m, name);
  };
  same(policy_chosen, "policy chosen");
  same(policy_rejected, "policy rejected");
  same(ref_chosen, "reference chosen");
  same(ref_rejected, "reference rejected");
  if (dchosen && (dchosen->rows() != rows || dchosen->cols() != cols)) dchosen->resize(rows, cols);
  if (drejected && (drejected->rows() != rows || drejected->cols() != cols)) drejected->resize(rows, cols);
  const Index count = rows * cols;
  DPOStats st;
  st.pairs = count;
  if (count == 0) {
    if (stats) *stats = st;
    return T(0);
  }
  const double beta = options.beta, eps = options.label_smoothing;
  const double inv_n = 1.0 / static_cast<double>(count);
  double total = 0.0;
  for (Index i = 0; i < rows; ++i)
    for (Index j = 0; j < cols; ++j) {
      const double pc = static_cast<double>(policy_chosen(i, j)), pr = static_cast<double>(policy_rejected(i, j));
      const double rc = static_cast<double>(ref_chosen(i, j)), rr = static_cast<double>(ref_rejected(i, j));
      const double h = (pc - pr) - (rc - rr);
      double loss = 0.0, dh = 0.0;
      if (options.loss == PreferenceLoss::kSigmoid) {
        const double x = beta * h;
        // −log σ(x) = softplus(−x),  −log σ(−x) = softplus(x)
        loss = (1.0 - eps) * detail::stable_softplus(-x) + eps * detail::stable_softplus(x);
        dh = beta * (eps * detail::stable_sigmoid(x) - (1.0 - eps) * detail::stable_sigmoid(-x));
      } else {
        const double d = h - 1.0 / (2.0 * beta);
        loss = d * d;
        dh = 2.0 * d;
      }
      total += loss;
      if (dchosen) (*dchosen)(i, j) = static_cast<T>(dh * inv_n);
      if (drejected) (*drejected)(i, j) = static_cast<T>(-dh * inv_n);
      const double r_c = beta * (pc - rc), r_r = beta * (pr - rr);
      st.reward_chosen += r_c;
      st.reward_rejected += r_r;
      st.margin += r_c - r_r;
      st.accuracy += r_c > r_r ? 1.0 : 0.0;
    }
  st.loss = total * inv_n;
  st.reward_chosen *= inv_n;
  st.reward_rejected *= inv_n;
  st.margin *= inv_n;
  st.accuracy *= inv_n;
  if (stats) *stats = st;
  return static_cast<T>(st.loss);
}

}  // namespace peft
