#pragma once
// Seeded mini-batch sampling: each epoch is a fresh Fisher-Yates permutation of [0, n) cut into
// consecutive batches (the last one smaller unless drop_last), as torch's DataLoader(shuffle=True)
// does. The permutation comes from peft::Rng, so the same seed gives the same batches on every
// compiler and platform.
//
// Each epoch shuffles the identity, so the epoch's permutation is a function of the generator's
// state when the epoch started. That state and the position in the epoch are the whole sampler
// state (state() / set_state(), saved by io::save_sampler_state): a run resumed mid-epoch from a
// checkpoint draws the same remaining batches, and every later epoch, as the run never stopped.
#include <cstdint>
#include <string>
#include <vector>

#include "peft/core/error.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/types.hpp"

namespace peft {

/// Shuffles v in place (Fisher-Yates: for i = n−1 … 1, swap v[i] with v[j], j uniform in [0, i]).
template <class V>
void shuffle(V& v, Rng& rng) {
  for (std::size_t i = v.size(); i > 1; --i) {
    const std::size_t j = static_cast<std::size_t>(rng.uniform_int(static_cast<std::uint64_t>(i)));
    std::swap(v[i - 1], v[j]);
  }
}

class BatchSampler {
 public:
  /// Batches over indices [0, n). `shuffle = false` keeps the natural order (evaluation).
  BatchSampler(Index n, Index batch_size, std::uint64_t seed, bool shuffle = true, bool drop_last = false)
      : n_(n), batch_(batch_size), shuffle_(shuffle), drop_last_(drop_last), rng_(seed) {
    if (n <= 0) throw ConfigError("BatchSampler: dataset size must be > 0, got " + std::to_string(n));
    if (batch_size <= 0) throw ConfigError("BatchSampler: batch size must be > 0, got " + std::to_string(batch_size));
    if (drop_last && batch_size > n)
      throw ConfigError("BatchSampler: drop_last with batch size " + std::to_string(batch_size) + " > dataset size " +
                        std::to_string(n) + " yields no batch");
    order_.resize(static_cast<std::size_t>(n));
    for (Index i = 0; i < n; ++i) order_[static_cast<std::size_t>(i)] = i;
    start_epoch();
  }

  /// Batches per epoch: ⌈n / b⌉, or ⌊n / b⌋ with drop_last.
  Index batches_per_epoch() const { return drop_last_ ? n_ / batch_ : (n_ + batch_ - 1) / batch_; }

  /// Starts a new epoch (a new permutation when shuffling). The constructor starts the first.
  void start_epoch() {
    epoch_rng_ = rng_.state();
    for (Index i = 0; i < n_; ++i) order_[static_cast<std::size_t>(i)] = i;
    if (shuffle_) shuffle(order_, rng_);
    pos_ = 0;
  }

  /// Where the sampler is: the generator's state at the start of the current epoch and the number
  /// of indices of the epoch already handed out.
  struct State {
    Rng::State epoch_rng{};
    Index position = 0;
  };
  State state() const { return State{epoch_rng_, pos_}; }

  /// Continues from a state() of a sampler with the same size, batch size and flags.
  void set_state(const State& st) {
    if (st.position < 0 || st.position > n_)
      throw ConfigError("BatchSampler: state position " + std::to_string(st.position) + " is outside [0, " +
                        std::to_string(n_) + "]");
    rng_.set_state(st.epoch_rng);
    start_epoch();  // the same permutation again, and the generator where it was after it
    pos_ = st.position;
  }

  /// Fills `batch` with the next indices; false (and `batch` empty) when the epoch is over.
  bool next(std::vector<Index>& batch) {
    batch.clear();
    const Index left = n_ - pos_;
    if (left <= 0 || (drop_last_ && left < batch_)) return false;
    const Index take = left < batch_ ? left : batch_;
    batch.assign(order_.begin() + static_cast<std::ptrdiff_t>(pos_),
                 order_.begin() + static_cast<std::ptrdiff_t>(pos_ + take));
    pos_ += take;
    return true;
  }

  Index size() const { return n_; }
  Index batch_size() const { return batch_; }

 private:
  Index n_;
  Index batch_;
  bool shuffle_;
  bool drop_last_;
  Rng rng_;
  Rng::State epoch_rng_{};  ///< rng_ before this epoch's shuffle
  std::vector<Index> order_;
  Index pos_ = 0;
};

}  // namespace peft
