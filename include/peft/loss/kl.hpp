#pragma once
// Log-probabilities and Kullback–Leibler divergences between row-wise categorical distributions:
// the one module that distillation (here), Learning without Forgetting and preference tuning share.
//
// label_log_probs: log p_{i,y_i} per row (ignore_index rows give 0), the per-token term that
// sequence log-likelihoods (DPO-style preference losses) sum; backward g_i (onehot(y_i) − p_i).
//
// log_softmax (row-wise, stable):
//   log p_ic = z_ic − logsumexp(z_i),  logsumexp(z) = m + log Σ_c exp(z_c − m),  m = max_c z_c
//   backward: ∂L/∂z_ic = g_ic − p_ic Σ_c' g_ic'   with g = ∂L/∂log p
//
// kl_div on log-probabilities (torch.nn.functional.kl_div(input = log q, target = log p,
// reduction = "batchmean", log_target = True)):
//   KL(p ‖ q) = (1/N) Σ_i Σ_c p_ic (log p_ic − log q_ic)
//   ∂/∂log q_ic = −p_ic / N,   ∂/∂log p_ic = p_ic (log p_ic − log q_ic + 1) / N
// A category with p_ic = 0 (log p = −inf) contributes 0, as 0 · log 0 = 0; −inf in log q where
// p > 0 is an infinite divergence and refused.
//
// Knowledge distillation (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a Neural
// Network", §2): with temperature τ, teacher p = softmax(t / τ), student q = softmax(s / τ),
//   kl_distillation  = τ² · (1/N) Σ_i KL(p_i ‖ q_i)
//   soft_target_ce   = τ² · (1/N) Σ_i −Σ_c p_ic log q_ic     (= kl_distillation + τ² · mean H(p))
// Both have the same student gradient, ∂/∂s_ic = τ² · (q_ic − p_ic) / (τ N) = τ (q_ic − p_ic) / N:
// the τ² factor keeps the gradient's magnitude comparable across temperatures, as Hinton et al.
// prescribe when the soft term is mixed with the hard-label loss. The teacher is a constant (no
// gradient), as in distillation; kl_div gives both sides when the reference is trained too.
//
// Reduction: mean over rows ("batchmean"), like the other losses. Sums are accumulated in double.
#include <cmath>
#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/types.hpp"
#include "peft/loss/common.hpp"

namespace peft {

/// Row-wise log-softmax of `logits` [rows, classes] divided by `temperature`, into *out (resized
/// only when its shape differs). Stable for any finite logits.
template <class T>
void log_softmax(const ConstMatrixRef<T>& logits, Matrix<T>& out, double temperature = 1.0) {
  if (logits.cols() == 0)
    throw ShapeError("log_softmax: logits of shape " + shape_str(logits.rows(), logits.cols()) +
                     " have no classes, expected >= 1");
  if (!std::isfinite(temperature) || temperature <= 0.0)
    throw ConfigError("log_softmax: temperature must be finite and > 0, got " + check::num(temperature));
  detail::check_finite_rows<T>("log_softmax", logits, "logits");
  if (out.rows() != logits.rows() || out.cols() != logits.cols()) out.resize(logits.rows(), logits.cols());
  const T inv_tau = static_cast<T>(1.0 / temperature);
  for (Index i = 0; i < logits.rows(); ++i) {
    auto o = out.row(i);
    o.noalias() = logits.row(i) * inv_tau;
    const T m = o.maxCoeff();
    const T lse = m + std::log((o.array() - m).exp().sum());
    o.array() -= lse;
  }
}

/// Backward of log_softmax: given log p [rows, classes] (its output) and g = ∂L/∂log p, writes
/// ∂L/∂z into *dlogits: (g − p · rowsum(g)) / τ. `dlogits` may alias `grad`.
template <class T>
void log_softmax_backward(const ConstMatrixRef<T>& log_probs, const ConstMatrixRef<T>& grad, Matrix<T>& dlogits,
                          double temperature = 1.0) {
  if (log_probs.rows() != grad.rows() || log_probs.cols() != grad.cols())
    throw ShapeError("log_softmax_backward: log-probabilities have shape " +
                     shape_str(log_probs.rows(), log_probs.cols()) + ", their gradient has shape " +
                     shape_str(grad.rows(), grad.cols()));
  if (!std::isfinite(temperature) || temperature <= 0.0)
    throw ConfigError("log_softmax_backward: temperature must be finite and > 0, got " + check::num(temperature));
  if (dlogits.rows() != grad.rows() || dlogits.cols() != grad.cols()) dlogits.resize(grad.rows(), grad.cols());
  const T inv_tau = static_cast<T>(1.0 / temperature);
  for (Index i = 0; i < grad.rows(); ++i) {
    const T s = grad.row(i).sum();
    // ∂L/∂z_c = (g_c − p_c Σ g) / τ   (read g before writing: dlogits may be grad's storage)
    dlogits.row(i).array() = (grad.row(i).array() - log_probs.row(i).array().exp() * s) * inv_tau;
  }
}

namespace detail {
template <class T>
void check_same_shape(const char* who, const ConstMatrixRef<T>& a, const char* a_name, const ConstMatrixRef<T>& b,
                      const char* b_name) {
  if (a.rows() != b.rows() || a.cols() != b.cols())
    throw ShapeError(std::string(who) + ": " + a_name + " have shape " + shape_str(a.rows(), a.cols()) + ", " + b_name +
                     " have shape " + shape_str(b.rows(), b.cols()));
  if (a.cols() == 0)
    throw ShapeError(std::string(who) + ": " + a_name + " of shape " + shape_str(a.rows(), a.cols()) +
                     " have no classes, expected >= 1");
}

template <class T>
void resize_like(Matrix<T>* m, Index rows, Index cols) {
  if (m && (m->rows() != rows || m->cols() != cols)) m->resize(rows, cols);
}
}  // namespace detail

/// KL(p ‖ q) averaged over rows, from log p (`target_log_probs`) and log q (`log_probs`), both
/// [rows, classes] (torch's F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)).
/// Writes ∂/∂log q into *dlog_q and ∂/∂log p into *dlog_p when non-null. −inf in log p is a
/// category of probability 0; NaN, +inf, and −inf in log q where p > 0 are refused.
template <class T>
T kl_div(const ConstMatrixRef<T>& log_probs, const ConstMatrixRef<T>& target_log_probs, Matrix<T>* dlog_q,
         Matrix<T>* dlog_p = nullptr) {
  detail::check_same_shape<T>("kl_div", target_log_probs, "target log-probabilities", log_probs, "log-probabilities");
  const Index n = log_probs.rows();
  const Index c = log_probs.cols();
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < c; ++j) {
      const T lp = target_log_probs(i, j);
      const T lq = log_probs(i, j);
      if (std::isnan(lp) || lp == std::numeric_limits<T>::infinity())
        throw NumericError("kl_div: target log-probabilities row " + std::to_string(i) + " contains NaN or +inf");
      if (std::isnan(lq) || lq == std::numeric_limits<T>::infinity() || (std::isinf(lq) && std::isfinite(lp)))
        throw NumericError("kl_div: log-probabilities row " + std::to_string(i) +
                           " contain NaN, +inf, or -inf where the target has mass (infinite divergence)");
    }
  detail::resize_like(dlog_q, n, c);
  detail::resize_like(dlog_p, n, c);
  if (n == 0) return T(0);
  const T inv_n = T(1) / static_cast<T>(n);
  double total = 0.0;
  for (Index i = 0; i < n; ++i)
    for (Index j = 0; j < c; ++j) {
      const T lp = target_log_probs(i, j);
      if (std::isinf(lp)) {  // p = 0: 0 · (log 0 − log q) = 0, and so are both derivatives
        if (dlog_q) (*dlog_q)(i, j) = T(0);
        if (dlog_p) (*dlog_p)(i, j) = T(0);
        continue;
      }
      const T p = std::exp(lp);
      const T diff = lp - log_probs(i, j);
      total += static_cast<double>(p * diff);
      if (dlog_q) (*dlog_q)(i, j) = -p * inv_n;                 // ∂/∂log q = −p / N
      if (dlog_p) (*dlog_p)(i, j) = p * (diff + T(1)) * inv_n;  // ∂/∂log p = p (log p − log q + 1) / N
    }
  return static_cast<T>(total / static_cast<double>(n));
}

/// Log-probability of each row's label, log p_i = z_{i,y_i} − logsumexp(z_i), for `logits`
/// [rows, classes] (the per-token term preference losses sum per sequence); rows labelled
/// `ignore_index` get 0. Writes into *out [rows, 1] (resized only when its shape differs).
template <class T>
void label_log_probs(const ConstMatrixRef<T>& logits, const std::vector<std::int64_t>& labels, Matrix<T>& out,
                     std::int64_t ignore_index = -100) {
  const Index n = logits.rows(), c = logits.cols();
  if (static_cast<Index>(labels.size()) != n)
    throw ShapeError("label_log_probs: " + std::to_string(labels.size()) + " labels for logits of shape " +
                     shape_str(n, c) + ", expected " + std::to_string(n));
  if (c == 0)
    throw ShapeError("label_log_probs: logits of shape " + shape_str(n, c) + " have no classes, expected >= 1");
  for (Index i = 0; i < n; ++i) {
    const std::int64_t y = labels[static_cast<std::size_t>(i)];
    if (y != ignore_index && (y < 0 || y >= static_cast<std::int64_t>(c)))
      throw ShapeError("label_log_probs: label at row " + std::to_string(i) + " is " + std::to_string(y) +
                       ", expected a class in [0, " + std::to_string(c) + ") or ignore_index " +
                       std::to_string(ignore_index));
  }
  detail::check_finite_rows<T>("label_log_probs", logits, "logits");
  if (out.rows() != n || out.cols() != 1) out.resize(n, 1);
  for (Index i = 0; i < n; ++i) {
    const std::int64_t y = labels[static_cast<std::size_t>(i)];
    if (y == ignore_index) {
      out(i, 0) = T(0);
      continue;
    }
    const T m = logits.row(i).maxCoeff();
    const T lse = m + std::log((logits.row(i).array() - m).exp().sum());
    out(i, 0) = logits(i, static_cast<Index>(y)) - lse;
  }
}

/// Backward of label_log_probs: given g_i = ∂L/∂log p_i [rows, 1], writes
/// ∂L/∂z_i = g_i (onehot(y_i) − softmax(z_i)) into *dlogits (0 for ignored rows).
template <class T>
void label_log_probs_backward(const ConstMatrixRef<T>& logits, const std::vector<std::int64_t>& labels,
                              const ConstMatrixRef<T>& grad, Matrix<T>& dlogits, std::int64_t ignore_index = -100) {
  const Index n = logits.rows(), c = logits.cols();
  if (static_cast<Index>(labels.size()) != n || grad.rows() != n || grad.cols() != 1)
    throw ShapeError("label_log_probs_backward: logits of shape " + shape_str(n, c) + ", " +
                     std::to_string(labels.size()) + " labels and a gradient of shape " +
                     shape_str(grad.rows(), grad.cols()) + ", expected " + std::to_string(n) + " labels and [" +
                     std::to_string(n) + ", 1]");
  if (dlogits.rows() != n || dlogits.cols() != c) dlogits.resize(n, c);
  for (Index i = 0; i < n; ++i) {
    const std::int64_t y = labels[static_cast<std::size_t>(i)];
    if (y == ignore_index) {
      dlogits.row(i).setZero();
      continue;
    }
    if (y < 0 || y >= static_cast<std::int64_t>(c))
      throw ShapeError("label_log_probs_backward: label at row " + std::to_string(i) + " is " + std::to_string(y) +
                       ", expected a class in [0, " + std::to_string(c) + ")");
    const T m = logits.row(i).maxCoeff();
    const T lse = m + std::log((logits.row(i).array() - m).exp().sum());
    // ∂ log p_y / ∂z = onehot(y) − softmax(z)
    dlogits.row(i).array() = -(logits.row(i).array() - lse).exp() * grad(i, 0);
    dlogits(i, static_cast<Index>(y)) += grad(i, 0);
  }
}

enum class DistillationLoss {
  kKL,                ///< τ² · KL(teacher ‖ student): 0 when the student matches the teacher
  kSoftCrossEntropy,  ///< τ² · H(teacher, student): the KL plus the teacher's entropy (a constant)
};

struct DistillationOptions {
  double temperature = 1.0;  ///< τ > 0, applied to both teacher and student logits
  DistillationLoss kind = DistillationLoss::kKL;
};

/// Reusable buffers of distillation_loss (no allocation once the shape is fixed).
template <class T>
struct DistillationWorkspace {
  Matrix<T> log_q;  ///< student log-softmax(s / τ)
  Matrix<T> log_p;  ///< teacher log-softmax(t / τ)
};

/// Hinton et al.'s distillation loss between student logits `s` and teacher logits `t`, both
/// [rows, classes], averaged over rows and scaled by τ²; writes ∂L/∂s into *dstudent (resized only
/// when its shape differs) unless null. The teacher is treated as a constant.
template <class T>
T distillation_loss(const ConstMatrixRef<T>& student_logits, const ConstMatrixRef<T>& teacher_logits,
                    Matrix<T>* dstudent, const DistillationOptions& options, DistillationWorkspace<T>& ws) {
  detail::check_same_shape<T>("distillation_loss", student_logits, "student logits", teacher_logits, "teacher logits");
  const double tau = options.temperature;
  if (!std::isfinite(tau) || tau <= 0.0)
    throw ConfigError("distillation_loss: temperature must be finite and > 0, got " + check::num(tau));
  detail::check_finite_rows<T>("distillation_loss", student_logits, "student logits");
  detail::check_finite_rows<T>("distillation_loss", teacher_logits, "teacher logits");
  log_softmax<T>(student_logits, ws.log_q, tau);
  log_softmax<T>(teacher_logits, ws.log_p, tau);
  const Index n = student_logits.rows();
  const Index c = student_logits.cols();
  detail::resize_like(dstudent, n, c);
  if (n == 0) return T(0);
  const T tau2 = static_cast<T>(tau * tau);
  const T scale = static_cast<T>(tau) / static_cast<T>(n);
  double total = 0.0;
  for (Index i = 0; i < n; ++i) {
    double row = 0.0;
    for (Index j = 0; j < c; ++j) {
      const double p = std::exp(static_cast<double>(ws.log_p(i, j)));
      const double lq = static_cast<double>(ws.log_q(i, j));
      row += options.kind == DistillationLoss::kKL ? p * (static_cast<double>(ws.log_p(i, j)) - lq) : -p * lq;
    }
    total += row;
    // ∂/∂s = τ² · (q − p) / (τ N) = τ (q − p) / N
    if (dstudent) dstudent->row(i).array() = (ws.log_q.row(i).array().exp() - ws.log_p.row(i).array().exp()) * scale;
  }
  return static_cast<T>(static_cast<double>(tau2) * total / static_cast<double>(n));
}

/// Convenience overload with its own buffers (allocates on every call).
template <class T>
T distillation_loss(const ConstMatrixRef<T>& student_logits, const ConstMatrixRef<T>& teacher_logits,
                    Matrix<T>* dstudent, const DistillationOptions& options = {}) {
  DistillationWorkspace<T> ws;
  return distillation_loss<T>(student_logits, teacher_logits, dstudent, options, ws);
}

}  // namespace peft

// The test build compiles these once (tests/support/instantiations_*.inc); never defined for users.
#ifdef PEFT_EXTERN_TEMPLATES
#define PEFT_KL_TEMPLATES(KW, T)                                                                           \
  KW template void label_log_probs_backward<T>(const ConstMatrixRef<T>&, const std::vector<std::int64_t>&, \
                                               const ConstMatrixRef<T>&, Matrix<T>&, std::int64_t);
namespace peft {
PEFT_KL_TEMPLATES(extern, float)
PEFT_KL_TEMPLATES(extern, double)
}  // namespace peft
#endif
