#pragma once
// Scratch matrices shared by every layer on a thread.
//
// A layer's temporaries that live only while one of its calls runs (a block's forward
// intermediates that backward does not read, backward's intermediate gradients) would, as members,
// exist once per layer: a model of L blocks would hold L copies, page-fault all of them in on the
// first training step and keep them for the model's life, although only one block runs at a time.
// They come from one pool per thread and scalar type instead, keyed by (owner, slot, columns):
// every block of a model uses the same few matrices, and the memory of a training step is the
// caches backward needs plus ONE block's temporaries, whatever the depth.
//
// The contract of a matrix from scratch():
// - it is valid until the public call that asked for it returns; nothing keeps one across calls,
//   returns data in one to another class, or reads what an earlier call left in it (contents are
//   unspecified: initialise);
// - owners are classes, and a method never calls, while it holds a slot, another method of the same
//   owner that takes that slot (give the helper its own slot); layers nest by kind: block →
//   attention / feed-forward → linear, and no kind calls itself;
// - the key includes the number of columns, so layers of one kind but different widths get their own
//   matrices, and a step over a fixed batch shape allocates nothing after the first;
// - per thread: models trained on different threads never share one, and OpenMP workers only index
//   into the calling thread's matrices.
// scratch_bytes<T>() reports the calling thread's pool; release_scratch() frees it (the next call
// allocates again).

#include <cstddef>
#include <memory>
#include <vector>

#include "peft/core/types.hpp"

namespace peft {

/// The classes that take scratch (one enumerator per class keeps their slots apart).
enum class ScratchOwner : unsigned char {
  AdaptedLinear,
  TransformerBlock,
  MultiHeadAttention,
  FeedForward,
  LlamaAttention,
  LlamaMlp,
  LlamaDecoderLayer,
};

namespace detail {

template <class T>
class ScratchPool {
 public:
  Matrix<T>& get(ScratchOwner owner, int slot, Index rows, Index cols) {
    for (const auto& e : entries_)
      if (e->owner == owner && e->slot == slot && e->cols == cols) {
        e->m.resize(rows, cols);  // no allocation while the shape stays
        return e->m;
      }
    entries_.push_back(std::make_unique<Entry>(Entry{owner, slot, cols, Matrix<T>(rows, cols)}));
    return entries_.back()->m;  // stable: entries are held by pointer
  }
  std::size_t bytes() const {
    std::size_t n = 0;
    for (const auto& e : entries_) n += static_cast<std::size_t>(e->m.size()) * sizeof(T);
    return n;
  }
  void clear() { entries_.clear(); }
  static ScratchPool& local() {
    thread_local ScratchPool pool;
    return pool;
  }

 private:
  struct Entry {
    ScratchOwner owner;
    int slot;
    Index cols;
    Matrix<T> m;
  };
  std::vector<std::unique_ptr<Entry>> entries_;
};

}  // namespace detail

/// The calling thread's scratch matrix `slot` of `owner` with `cols` columns, resized to
/// [rows, cols] (contents unspecified). See the contract at the top of this header.
template <class T>
Matrix<T>& scratch(ScratchOwner owner, int slot, Index rows, Index cols) {
  return detail::ScratchPool<T>::local().get(owner, slot, rows, cols);
}

/// Bytes the calling thread's scratch of scalar T holds.
template <class T>
std::size_t scratch_bytes() {
  return detail::ScratchPool<T>::local().bytes();
}

/// Frees the calling thread's scratch (float and double). Call it between calls only, never while
/// a layer method runs.
inline void release_scratch() {
  detail::ScratchPool<float>::local().clear();
  detail::ScratchPool<double>::local().clear();
}

}  // namespace peft
