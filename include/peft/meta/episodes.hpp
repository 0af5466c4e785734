#pragma once
// Few-shot episodes: N-way K-shot support/query sampling over any labelled dataset (Vinyals et al.,
// 2016, "Matching Networks for One Shot Learning", §4: the training procedure that mirrors test time;
// Snell et al., 2017, "Prototypical Networks for Few-shot Learning", Algorithm 1).
//
// An episode draws N distinct classes uniformly from the sampler's classes (without replacement),
// then, for each class, K + Q distinct examples uniformly without replacement from that class: the
// first K are its support examples, the other Q its query examples. So every episode is exactly
// class-balanced (K support and Q query rows per class). Episode labels are 0 … N−1 in the order the
// classes were drawn (classes[i] is the dataset class of episode label i); rows are grouped by class,
// support row i·K + k and query row i·Q + q belong to episode label i.
//
// The only randomness is a peft::Rng; each class's examples are drawn by a partial Fisher-Yates over
// a scratch copy of the class's index list, reset to the dataset order every time, so an episode is
// a function of the generator's state alone. That state and the episode count are the whole
// sampler state (state() / set_state()): a run resumed from a checkpoint draws the same episodes as
// one that never stopped. Drawing an episode allocates nothing once `Episode` has been used once.
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/types.hpp"

namespace peft {

/// One N-way K-shot episode: indices into the dataset and episode labels in [0, N).
struct Episode {
  std::vector<std::int64_t> classes;         ///< [N] dataset class of episode label i
  std::vector<Index> support;                ///< [N·K] dataset rows, grouped by episode label
  std::vector<std::int64_t> support_labels;  ///< [N·K] episode labels
  std::vector<Index> query;                  ///< [N·Q]
  std::vector<std::int64_t> query_labels;    ///< [N·Q]
};

class EpisodeSampler {
 public:
  /// Episodes over the rows of a dataset whose row i has class labels[i]. `classes` restricts the
  /// draw to those classes (meta-train / validation / test class splits); empty means every class
  /// present in `labels`. Every class drawn from must have at least K + Q examples.
  EpisodeSampler(const std::vector<std::int64_t>& labels, Index n_way, Index k_shot, Index n_query, std::uint64_t seed,
                 const std::vector<std::int64_t>& classes = {})
      : n_way_(n_way), k_shot_(k_shot), n_query_(n_query), rng_(seed) {
    if (n_way < 1) throw ConfigError("EpisodeSampler: n_way must be >= 1, got " + std::to_string(n_way));
    if (k_shot < 1) throw ConfigError("EpisodeSampler: k_shot must be >= 1, got " + std::to_string(k_shot));
    if (n_query < 0) throw ConfigError("EpisodeSampler: n_query must be >= 0, got " + std::to_string(n_query));
    for (std::size_t i = 0; i < labels.size(); ++i)
      if (labels[i] < 0)
        throw ConfigError("EpisodeSampler: label of row " + std::to_string(i) + " is " + std::to_string(labels[i]) +
                          ", expected a class >= 0");
    if (classes.empty()) {
      std::int64_t max_class = -1;
      for (std::int64_t y : labels) max_class = y > max_class ? y : max_class;
      std::vector<char> present(static_cast<std::size_t>(max_class + 1), 0);
      for (std::int64_t y : labels) present[static_cast<std::size_t>(y)] = 1;
      for (std::int64_t c = 0; c <= max_class; ++c)
        if (present[static_cast<std::size_t>(c)]) classes_.push_back(c);
    } else {
      classes_ = classes;
      for (std::size_t i = 0; i < classes_.size(); ++i)
        for (std::size_t j = 0; j < i; ++j)
          if (classes_[i] == classes_[j])
            throw ConfigError("EpisodeSampler: class " + std::to_string(classes_[i]) + " is listed twice");
    }
    if (static_cast<Index>(classes_.size()) < n_way)
      throw ConfigError("EpisodeSampler: " + std::to_string(n_way) + "-way episodes need " + std::to_string(n_way) +
                        " classes, got " + std::to_string(classes_.size()));
    pools_.resize(classes_.size());
    std::int64_t max_label = -1;
    for (std::int64_t y : labels) max_label = y > max_label ? y : max_label;
    std::vector<std::int64_t> slot(static_cast<std::size_t>(max_label + 1), -1);  // class → position in classes_
    for (std::size_t c = 0; c < classes_.size(); ++c)
      if (classes_[c] >= 0 && classes_[c] <= max_label)
        slot[static_cast<std::size_t>(classes_[c])] = static_cast<std::int64_t>(c);
    for (std::size_t i = 0; i < labels.size(); ++i) {
      const std::int64_t c = slot[static_cast<std::size_t>(labels[i])];
      if (c >= 0) pools_[static_cast<std::size_t>(c)].push_back(static_cast<Index>(i));
    }
    const Index need = k_shot + n_query;
    for (std::size_t c = 0; c < classes_.size(); ++c)
      if (static_cast<Index>(pools_[c].size()) < need)
        throw ConfigError("EpisodeSampler: class " + std::to_string(classes_[c]) + " has " +
                          std::to_string(pools_[c].size()) + " examples, expected >= " + std::to_string(need) +
                          " (k_shot " + std::to_string(k_shot) + " + n_query " + std::to_string(n_query) + ")");
    class_order_.resize(classes_.size());
    std::size_t largest = 0;
    for (const auto& p : pools_) largest = p.size() > largest ? p.size() : largest;
    scratch_.resize(largest);
  }

  /// Draws the next episode into `e` (its vectors are resized, not reallocated, after the first use).
  void next(Episode& e) {
    const std::size_t n = static_cast<std::size_t>(n_way_);
    const std::size_t k = static_cast<std::size_t>(k_shot_);
    const std::size_t q = static_cast<std::size_t>(n_query_);
    e.classes.resize(n);
    e.support.resize(n * k);
    e.support_labels.resize(n * k);
    e.query.resize(n * q);
    e.query_labels.resize(n * q);
    // N classes: partial Fisher-Yates over the class list, reset to its order first.
    for (std::size_t c = 0; c < class_order_.size(); ++c) class_order_[c] = c;
    partial_shuffle(class_order_, class_order_.size(), n);
    for (std::size_t i = 0; i < n; ++i) {
      const std::size_t c = class_order_[i];
      e.classes[i] = classes_[c];
      const std::vector<Index>& pool = pools_[c];
      for (std::size_t j = 0; j < pool.size(); ++j) scratch_[j] = pool[j];
      partial_shuffle(scratch_, pool.size(), k + q);
      for (std::size_t j = 0; j < k; ++j) {
        e.support[i * k + j] = scratch_[j];
        e.support_labels[i * k + j] = static_cast<std::int64_t>(i);
      }
      for (std::size_t j = 0; j < q; ++j) {
        e.query[i * q + j] = scratch_[k + j];
        e.query_labels[i * q + j] = static_cast<std::int64_t>(i);
      }
    }
    ++episodes_;
  }

  /// Where the sampler is: the generator's state and the number of episodes drawn.
  struct State {
    Rng::State rng{};
    std::int64_t episodes = 0;
    /// The fields by name (fn("rng", Rng::State&), fn("episodes", std::int64_t&)), for a checkpoint
    /// (io::save_episode_sampler_state), as ReplayBuffer::State::visit.
    template <class F>
    void visit(F&& fn) {
      fn("rng", rng);
      fn("episodes", episodes);
    }
  };
  State state() const { return State{rng_.state(), episodes_}; }
  /// Continues from a state() of a sampler over the same labels, classes, N, K and Q.
  void set_state(const State& st) {
    if (st.episodes < 0)
      throw ConfigError("EpisodeSampler: state episode count is " + std::to_string(st.episodes) + ", expected >= 0");
    rng_.set_state(st.rng);
    episodes_ = st.episodes;
  }

  Index n_way() const { return n_way_; }
  Index k_shot() const { return k_shot_; }
  Index n_query() const { return n_query_; }
  std::int64_t episodes() const { return episodes_; }
  /// The classes episodes are drawn from.
  const std::vector<std::int64_t>& classes() const { return classes_; }

 private:
  /// Moves a uniform random m-subset of v[0, size) into v[0, m) in uniform random order.
  template <class V>
  void partial_shuffle(V& v, std::size_t size, std::size_t m) {
    for (std::size_t i = 0; i < m; ++i) {
      const std::size_t j = i + static_cast<std::size_t>(rng_.uniform_int(static_cast<std::uint64_t>(size - i)));
      std::swap(v[i], v[j]);
    }
  }

  Index n_way_;
  Index k_shot_;
  Index n_query_;
  Rng rng_;
  std::int64_t episodes_ = 0;
  std::vector<std::int64_t> classes_;
  std::vector<std::vector<Index>> pools_;  ///< [class] dataset rows of that class, in dataset order
  std::vector<std::size_t> class_order_;
  std::vector<Index> scratch_;
};

}  // namespace peft
