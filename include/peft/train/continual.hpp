#pragma once
// Continual learning: a sequence of tasks learned one after the other by one model.
//
// Accuracy matrix and metrics. R[i][j] is the test accuracy on task j after training on tasks
// 0..i (T tasks), b[j] the accuracy on task j of the model before any training (the random
// baseline for forward transfer). With these (Lopez-Paz & Ranzato, 2017, "Gradient Episodic Memory
// for Continual Learning", §3; Chaudhry et al., 2018, "Riemannian Walk for Incremental Learning",
// §4 for forgetting):
//   ACC = (1/T)     Σ_{j<T}    R[T−1][j]                  average accuracy at the end
//   BWT = (1/(T−1)) Σ_{j<T−1} (R[T−1][j] − R[j][j])        backward transfer (< 0: forgetting)
//   FWT = (1/(T−1)) Σ_{j≥1}   (R[j−1][j] − b[j])           forward transfer (before task j is seen)
//   F   = (1/(T−1)) Σ_{j<T−1} max_{l<T−1} (R[l][j] − R[T−1][j])   average forgetting: the drop
//         from the best accuracy task j had at any earlier step (Chaudhry et al.'s f_j^T, l over
//         every step before the last, as in their definition).
// run_task_sequence() trains and evaluates through two callbacks and fills R and b.
//
// Online EWC (Schwarz et al., 2018, "Progress & Compress", §2.2; Kirkpatrick et al., 2017): one
// penalty whose Fisher is a decayed running sum over tasks, anchored at the weights after the last
// task,
//   F̃_t = γ F̃_{t−1} + F_t,   θ*_t = θ after task t,   R(θ) = λ/2 Σ F̃_t ⊙ (θ − θ*_t)²
// with F_t the diagonal empirical Fisher of task t (mean of squared batch gradients, as peft::EWC).
// γ = 1 gives the summed Fisher with the latest anchor; γ = 0 keeps only the last task's Fisher.
// The original EWC keeps one penalty per task (a vector of peft::EWC, optim/regularizers.hpp).
//
// Replay buffer: reservoir sampling (Vitter, 1985, Algorithm R) keeps a uniform sample of every
// item offered so far in a fixed capacity: the n-th item (0-based) replaces a uniformly chosen slot
// with probability capacity / (n + 1). The class-balanced option is Chrysakis & Moens' (2020,
// "Online Continual Learning from Imbalanced Data") class-balancing reservoir: when full, an item of
// a class that is not among the largest in the buffer replaces a random item of a largest class;
// an item of a largest class replaces a random item of its own class with probability m_c / n_c
// (m_c stored, n_c offered so far). The buffer stores item ids and labels (the data stays where it
// is), and its whole state (items, counts, generator) is checkpointable.
//
// Learning without Forgetting (Li & Hoiem, 2016): the loss on new data plus λ times the
// distillation loss (loss/kl.hpp) between the current model's outputs for the old tasks and those
// of the model before the new task; add_distillation() adds that term and its gradient.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/parameters.hpp"
#include "peft/core/rng.hpp"
#include "peft/loss/kl.hpp"
#include "peft/optim/regularizers.hpp"

namespace peft {

// ---- accuracy matrix and metrics ------------------------------------------------------------

struct ContinualMetrics {
  double acc = 0.0;         ///< average final accuracy
  double bwt = 0.0;         ///< backward transfer
  double fwt = 0.0;         ///< forward transfer (NaN without a baseline)
  double forgetting = 0.0;  ///< average forgetting (Chaudhry et al.)
};

class AccuracyMatrix {
 public:
  explicit AccuracyMatrix(int tasks) : tasks_(tasks) {
    if (tasks < 1) throw ConfigError("AccuracyMatrix: needs >= 1 task, got " + std::to_string(tasks));
    r_.assign(static_cast<std::size_t>(tasks * tasks), std::numeric_limits<double>::quiet_NaN());
    b_.assign(static_cast<std::size_t>(tasks), std::numeric_limits<double>::quiet_NaN());
  }

  int tasks() const { return tasks_; }
  /// R[after][task]: accuracy on `task` after training tasks 0..after.
  double at(int after, int task) const { return r_[index(after, task)]; }
  void set(int after, int task, double accuracy) { r_[index(after, task)] = accuracy; }
  /// b[task]: accuracy before any training.
  double baseline(int task) const { return b_[index(0, task)]; }
  void set_baseline(int task, double accuracy) { b_[index(0, task)] = accuracy; }
  bool has_baseline() const {
    return std::all_of(b_.begin(), b_.end(), [](double v) { return !std::isnan(v); });
  }

  /// The metrics of the header comment. Every R entry must be set; with one task BWT, FWT and F are 0.
  ContinualMetrics metrics() const {
    for (int i = 0; i < tasks_; ++i)
      for (int j = 0; j < tasks_; ++j)
        if (std::isnan(at(i, j)))
          throw ConfigError("AccuracyMatrix: R[" + std::to_string(i) + "][" + std::to_string(j) +
                            "] is not set; every entry is needed for the metrics");
    const int t = tasks_;
    ContinualMetrics m;
    for (int j = 0; j < t; ++j) m.acc += at(t - 1, j);
    m.acc /= t;
    if (t == 1) return m;
    for (int j = 0; j + 1 < t; ++j) {
      m.bwt += at(t - 1, j) - at(j, j);
      double best = -std::numeric_limits<double>::infinity();
      for (int l = 0; l + 1 < t; ++l) best = std::max(best, at(l, j));
      m.forgetting += best - at(t - 1, j);
    }
    m.bwt /= (t - 1);
    m.forgetting /= (t - 1);
    if (has_baseline()) {
      for (int j = 1; j < t; ++j) m.fwt += at(j - 1, j) - baseline(j);
      m.fwt /= (t - 1);
    } else {
      m.fwt = std::numeric_limits<double>::quiet_NaN();
    }
    return m;
  }

 private:
  std::size_t index(int after, int task) const {
    if (after < 0 || after >= tasks_ || task < 0 || task >= tasks_)
      throw ConfigError("AccuracyMatrix: entry [" + std::to_string(after) + "][" + std::to_string(task) +
                        "] is outside a " + std::to_string(tasks_) + "-task matrix");
    return static_cast<std::size_t>(after * tasks_ + task);
  }
  int tasks_;
  std::vector<double> r_, b_;
};

/// Evaluates every task before training (the baseline b), then for i = 0..T−1 calls train(i) and
/// records R[i][j] = evaluate(j) for every j. Callbacks may throw; nothing is caught.
inline AccuracyMatrix run_task_sequence(int tasks, const std::function<void(int)>& train,
                                        const std::function<double(int)>& evaluate) {
  AccuracyMatrix r(tasks);
  if (!train || !evaluate) throw ConfigError("run_task_sequence: train and evaluate callbacks are required");
  for (int j = 0; j < tasks; ++j) r.set_baseline(j, evaluate(j));
  for (int i = 0; i < tasks; ++i) {
    train(i);
    for (int j = 0; j < tasks; ++j) r.set(i, j, evaluate(j));
  }
  return r;
}

// ---- online EWC -----------------------------------------------------------------------------

template <class T>
class OnlineEWC {
 public:
  /// `gamma` ∈ [0, 1] decays the Fisher of earlier tasks. No penalty until the first end_task().
  OnlineEWC(std::vector<NamedParameter<T>> params, double lambda, double gamma)
      : params_(std::move(params)), lambda_(lambda), gamma_(gamma) {
    detail::check_lambda("OnlineEWC", lambda_);
    detail::check_params("OnlineEWC", params_);
    if (!std::isfinite(gamma) || gamma < 0.0 || gamma > 1.0)
      throw ConfigError("OnlineEWC: gamma must be in [0, 1], got " + check::num(gamma));
    for (const auto& np : params_) {
      anchors_.push_back(np.param->value);
      fisher_.push_back(Matrix<T>::Zero(np.param->value.rows(), np.param->value.cols()));
      task_fisher_.push_back(fisher_.back());
    }
  }

  double lambda() const { return lambda_; }
  double gamma() const { return gamma_; }
  int tasks_consolidated() const { return tasks_; }

  /// F_t += g ⊙ g for the current gradients (call after each backward of the finished task's data).
  void accumulate() {
    for (std::size_t i = 0; i < params_.size(); ++i) {
      if (!params_[i].param->trainable())
        throw ConfigError("OnlineEWC: parameter \"" + params_[i].name +
                          "\" has no gradient (frozen); every EWC parameter needs one while the Fisher is estimated");
      detail::check_grad("OnlineEWC", params_[i], task_fisher_[i]);
    }
    for (std::size_t i = 0; i < params_.size(); ++i) task_fisher_[i].array() += params_[i].param->grad.array().square();
    ++batches_;
  }

  /// F̃ ← γ F̃ + F_t / B and θ* ← θ. Needs at least one accumulate() since the last end_task().
  void end_task() {
    if (batches_ == 0)
      throw ConfigError("OnlineEWC: end_task() before any accumulate(); the task's Fisher needs >= 1 batch");
    const T g = static_cast<T>(gamma_);
    const T inv = T(1) / static_cast<T>(batches_);
    for (std::size_t i = 0; i < params_.size(); ++i) {
      detail::check_anchor("OnlineEWC", params_[i], anchors_[i]);
      fisher_[i] = g * fisher_[i] + inv * task_fisher_[i];
      task_fisher_[i].setZero();
      anchors_[i] = params_[i].param->value;
    }
    batches_ = 0;
    ++tasks_;
  }

  /// λ/2 Σ F̃ (θ − θ*)² (0 before the first end_task()).
  T value() const { return detail::fisher_penalty("OnlineEWC", params_, anchors_, fisher_, lambda_); }

  /// Adds λF̃(θ − θ*) to the gradient of every trainable parameter; returns value().
  T add_to_gradients() { return detail::add_fisher_penalty("OnlineEWC", params_, anchors_, fisher_, lambda_); }

  const Matrix<T>& fisher(std::size_t i) const { return fisher_.at(i); }
  const Matrix<T>& anchor(std::size_t i) const { return anchors_.at(i); }
  const std::vector<NamedParameter<T>>& parameters() const { return params_; }

 private:
  std::vector<NamedParameter<T>> params_;
  std::vector<Matrix<T>> anchors_, fisher_, task_fisher_;
  double lambda_, gamma_;
  std::int64_t batches_ = 0;
  int tasks_ = 0;
};

// ---- replay buffer --------------------------------------------------------------------------

struct ReplayItem {
  std::int64_t id = 0;     ///< the caller's handle of the example (e.g. its row in the data set)
  std::int64_t label = 0;  ///< its class, >= 0 (the balancing key)
  std::int64_t task = 0;   ///< the task it came from
};

class ReplayBuffer {
 public:
  struct State {
    std::vector<ReplayItem> items;
    std::int64_t seen = 0;
    std::vector<std::int64_t> seen_per_class;
    Rng::State rng{};

    /// The state's fields by name, as an optimizer state lists its tensors (visit_tensors), so a
    /// checkpoint stores and restores them without knowing the type (io::save_object_state):
    ///   fn("items", std::vector<std::int64_t>&)           id, label, task of each item, in order
    ///   fn("seen", std::int64_t&)                         items offered so far
    ///   fn("seen_per_class", std::vector<std::int64_t>&)  items offered per class
    ///   fn("rng", Rng::State&)                            the generator
    /// A visitor may change the fields (a reader); set_state() then validates them.
    template <class F>
    void visit(F&& fn) {
      std::vector<std::int64_t> flat;
      flat.reserve(3 * items.size());
      for (const ReplayItem& it : items) flat.insert(flat.end(), {it.id, it.label, it.task});
      fn("items", flat);
      if (flat.size() % 3 != 0)
        throw ConfigError("ReplayBuffer: state field \"items\" has " + std::to_string(flat.size()) +
                          " numbers, expected 3 per item (id, label, task)");
      items.resize(flat.size() / 3);
      for (std::size_t i = 0; i < items.size(); ++i)
        items[i] = ReplayItem{flat[3 * i], flat[3 * i + 1], flat[3 * i + 2]};
      fn("seen", seen);
      fn("seen_per_class", seen_per_class);
      fn("rng", rng);
    }
  };

  ReplayBuffer(std::size_t capacity, bool class_balanced, std::uint64_t seed)
      : capacity_(capacity), balanced_(class_balanced), rng_(seed) {
    if (capacity == 0) throw ConfigError("ReplayBuffer: capacity must be > 0");
    items_.reserve(capacity);
  }

  std::size_t capacity() const { return capacity_; }
  std::size_t size() const { return items_.size(); }
  bool class_balanced() const { return balanced_; }
  std::int64_t seen() const { return seen_; }
  const std::vector<ReplayItem>& items() const { return items_; }

  /// Offers one item; it is stored or not as the header comment says.
  void add(const ReplayItem& item) {
    if (item.label < 0) throw ConfigError("ReplayBuffer: label " + std::to_string(item.label) + " is negative");
    const std::size_t c = static_cast<std::size_t>(item.label);
    if (seen_per_class_.size() <= c) seen_per_class_.resize(c + 1, 0);
    const std::int64_t n = seen_++;
    const std::int64_t nc = seen_per_class_[c]++;
    if (items_.size() < capacity_) {
      items_.push_back(item);
      return;
    }
    if (!balanced_) {  // Algorithm R: keep with probability capacity / (n + 1), in a uniform slot
      const std::uint64_t j = rng_.uniform_int(static_cast<std::uint64_t>(n) + 1);
      if (j < capacity_) items_[static_cast<std::size_t>(j)] = item;
      return;
    }
    count_classes();
    const std::int64_t largest = *std::max_element(counts_.begin(), counts_.end());
    const std::int64_t mine = c < counts_.size() ? counts_[c] : 0;
    if (mine < largest) {  // evict a random item of a (random) largest class
      std::int64_t n_largest = 0;
      for (std::size_t k = 0; k < counts_.size(); ++k) n_largest += counts_[k] == largest ? 1 : 0;
      std::int64_t pick = static_cast<std::int64_t>(rng_.uniform_int(static_cast<std::uint64_t>(n_largest)));
      std::size_t victim_class = 0;
      for (std::size_t k = 0; k < counts_.size(); ++k)
        if (counts_[k] == largest && pick-- == 0) {
          victim_class = k;
          break;
        }
      replace_random_of_class(static_cast<std::int64_t>(victim_class), largest, item);
    } else {  // own class is a largest one: reservoir within the class, m_c / n_c
      const std::uint64_t j = rng_.uniform_int(static_cast<std::uint64_t>(nc) + 1);
      if (static_cast<std::int64_t>(j) < mine) replace_random_of_class(item.label, mine, item);
    }
  }

  /// Draws min(k, size()) distinct items uniformly into *out (reuses its storage).
  void sample(std::size_t k, std::vector<ReplayItem>& out) {
    out.clear();
    k = std::min(k, items_.size());
    order_.resize(items_.size());
    for (std::size_t i = 0; i < order_.size(); ++i) order_[i] = i;
    for (std::size_t i = 0; i < k; ++i) {  // partial Fisher-Yates
      const std::size_t j = i + static_cast<std::size_t>(rng_.uniform_int(order_.size() - i));
      std::swap(order_[i], order_[j]);
      out.push_back(items_[order_[i]]);
    }
  }

  /// Items stored per class (index = label).
  std::vector<std::int64_t> class_counts() {
    count_classes();
    return counts_;
  }

  State state() const { return State{items_, seen_, seen_per_class_, rng_.state()}; }
  void set_state(const State& st) {
    if (st.items.size() > capacity_)
      throw ConfigError("ReplayBuffer: state holds " + std::to_string(st.items.size()) + " items, capacity is " +
                        std::to_string(capacity_));
    std::int64_t total = 0;
    for (auto v : st.seen_per_class) {
      if (v < 0) throw ConfigError("ReplayBuffer: state has a negative per-class count " + std::to_string(v));
      total += v;
    }
    for (const ReplayItem& it : st.items)
      if (it.label < 0 || it.label >= static_cast<std::int64_t>(st.seen_per_class.size()) ||
          st.seen_per_class[static_cast<std::size_t>(it.label)] == 0)
        throw ConfigError("ReplayBuffer: state item " + std::to_string(it.id) + " has label " +
                          std::to_string(it.label) + ", which no offered item had (" +
                          std::to_string(st.seen_per_class.size()) + " classes counted)");
    if (total != st.seen || st.seen < static_cast<std::int64_t>(st.items.size()))
      throw ConfigError("ReplayBuffer: state counts are inconsistent (seen " + std::to_string(st.seen) +
                        ", per-class sum " + std::to_string(total) + ", " + std::to_string(st.items.size()) +
                        " items)");
    items_ = st.items;
    seen_ = st.seen;
    seen_per_class_ = st.seen_per_class;
    rng_.set_state(st.rng);
  }

 private:
  void count_classes() {
    counts_.assign(seen_per_class_.size(), 0);
    for (const auto& it : items_) ++counts_[static_cast<std::size_t>(it.label)];
  }
  void replace_random_of_class(std::int64_t label, std::int64_t count, const ReplayItem& item) {
    std::int64_t pick = static_cast<std::int64_t>(rng_.uniform_int(static_cast<std::uint64_t>(count)));
    for (auto& it : items_)
      if (it.label == label && pick-- == 0) {
        it = item;
        return;
      }
  }

  std::size_t capacity_;
  bool balanced_;
  Rng rng_;
  std::vector<ReplayItem> items_;
  std::int64_t seen_ = 0;
  std::vector<std::int64_t> seen_per_class_;
  std::vector<std::int64_t> counts_;  ///< scratch
  std::vector<std::size_t> order_;    ///< scratch
};

// ---- distillation term (LwF, personalisation) ----------------------------------------------

/// Adds λ · distillation_loss(student, teacher) (loss/kl.hpp) to a loss whose gradient is in
/// *dstudent_accum [rows, classes] (the term's gradient is added there); returns the term's value.
/// Buffers in `ws` are reused. λ = 0 adds nothing and returns 0.
template <class T>
T add_distillation(const ConstMatrixRef<T>& student_logits, const ConstMatrixRef<T>& teacher_logits, double lambda,
                   const DistillationOptions& options, Matrix<T>& dstudent_accum, DistillationWorkspace<T>& ws,
                   Matrix<T>& scratch) {
  detail::check_lambda("add_distillation", lambda);
  if (dstudent_accum.rows() != student_logits.rows() || dstudent_accum.cols() != student_logits.cols())
    throw ShapeError("add_distillation: gradient accumulator has shape " +
                     shape_str(dstudent_accum.rows(), dstudent_accum.cols()) + ", student logits have shape " +
                     shape_str(student_logits.rows(), student_logits.cols()));
  if (lambda == 0.0) return T(0);
  const T v = distillation_loss<T>(student_logits, teacher_logits, &scratch, options, ws);
  dstudent_accum.noalias() += static_cast<T>(lambda) * scratch;
  return static_cast<T>(lambda) * v;
}

}  // namespace peft
