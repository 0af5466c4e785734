#pragma once
// Model-level parallelism (issue 16): loops over independent items (attention's sequences and
// heads, the rows of a normalisation) split between OpenMP's threads.
//
// Only when the program is compiled with OpenMP (-fopenmp; the CMake package passes it on when
// built with PEFT_USE_OPENMP). Without it, or inside a parallel region the caller opened, or when
// the work is too small to pay for waking a thread, the loop runs on the caller's thread: the
// library starts no threads of its own. The thread count is Eigen's (Eigen::setNbThreads, else
// OMP_NUM_THREADS / omp_get_max_threads), the same that peft::gemm and Eigen's products use.
//
// The body runs inside an OpenMP region: it must not throw (check inputs before the loop) and
// must write only what its own items own. Per-thread scratch is indexed by the `thread` argument,
// below the count parallel_threads returned.
#include <Eigen/Core>
#include <algorithm>
#if defined(_OPENMP)
#include <omp.h>
#endif

#include "peft/core/types.hpp"

namespace peft {

/// Floating-point operations below which one more thread does not pay (about 5 µs of one core).
inline constexpr double kParallelMinWorkPerThread = 1 << 19;

/// Threads a loop of `items` independent items costing about `work` operations in all will use.
inline int parallel_threads(Index items, double work) {
#if defined(_OPENMP)
  if (items < 2 || omp_in_parallel()) return 1;
  const double limit = std::min(static_cast<double>(items), work / kParallelMinWorkPerThread);
  const int threads = Eigen::nbThreads();
  return limit >= threads ? threads : std::max(1, static_cast<int>(limit));
#else
  (void)items;
  (void)work;
  return 1;
#endif
}

/// body(begin, end, thread) on contiguous chunks of [0, items), one per thread, with `threads`
/// from parallel_threads (1: the caller's thread runs body(0, items, 0)).
template <class Body>
void parallel_for(Index items, int threads, Body&& body) {
#if defined(_OPENMP)
  if (threads > 1) {
#pragma omp parallel num_threads(threads)
    {
      const Index t = omp_get_thread_num(), nt = omp_get_num_threads();
      const Index begin = items * t / nt, end = items * (t + 1) / nt;
      if (end > begin) body(begin, end, static_cast<int>(t));
    }
    return;
  }
#else
  (void)threads;
#endif
  body(Index{0}, items, 0);
}

/// body(begin, end) on contiguous row ranges of a [rows, ...] job costing about `work_per_row`
/// operations per row (element-wise work: activations, normalisations, optimizer updates).
template <class Body>
void parallel_rows(Index rows, double work_per_row, Body&& body) {
  const int threads = parallel_threads(rows, work_per_row * static_cast<double>(rows));
  parallel_for(rows, threads, [&](Index begin, Index end, int) { body(begin, end); });
}

namespace detail {
/// Columns [c0, c1) of dst[j] += Σ_i a(i, j) (· b(i, j) when b is given), rows in order, summed in
/// a register-sized block, then times scale[j] when scale is given, before the one addition to dst.
template <class T, class A>
void column_sums_range(const A& a, const A* b, const T* scale, T* dst, Index c0, Index c1) {
  constexpr int kWidth = 64;
  using Block = Eigen::Array<T, 1, Eigen::Dynamic, Eigen::RowMajor, 1, kWidth>;  // no heap
  for (Index c = c0; c < c1; c += kWidth) {
    const Index n = std::min<Index>(kWidth, c1 - c);
    Block acc = Block::Zero(n);
    if (b == nullptr) {
      for (Index i = 0; i < a.rows(); ++i) acc += a.row(i).segment(c, n).array();
    } else {
      for (Index i = 0; i < a.rows(); ++i) acc += a.row(i).segment(c, n).array() * b->row(i).segment(c, n).array();
    }
    if (scale != nullptr) acc *= Eigen::Map<const Eigen::Array<T, 1, Eigen::Dynamic>>(scale + c, n);
    Eigen::Map<Eigen::Array<T, 1, Eigen::Dynamic>>(dst + c, n) += acc;
  }
}

template <class T, class A>
void add_column_sums_impl(const A& a, const A* b, const T* scale, T* dst) {
  constexpr Index kBlock = 64;  // columns per item (one thread's columns are whole blocks)
  const Index cols = a.cols(), items = (cols + kBlock - 1) / kBlock;
  const double work = static_cast<double>(a.rows()) * static_cast<double>(cols) * 4.0;  // memory-bound
  parallel_for(items, parallel_threads(items, work), [&](Index begin, Index end, int) {
    column_sums_range<T, A>(a, b, scale, dst, begin * kBlock, std::min(cols, end * kBlock));
  });
}
}  // namespace detail

/// dst[j] += Σ_i a(i, j), or scale[j] · Σ_i a(i, j) when scale is given: a bias or shift gradient
/// (scaled: through a gain on the bias). Threads split the columns and every column sums its rows
/// in order, so the result is the same for any thread count. dst and scale hold a.cols().
template <class T>
void add_column_sums(const ConstMatrixRef<T>& a, T* dst, const T* scale = nullptr) {
  detail::add_column_sums_impl<T, ConstMatrixRef<T>>(a, nullptr, scale, dst);
}

/// dst[j] += Σ_i a(i, j) b(i, j): a scale gradient (LayerNorm's γ, RMSNorm's weight). Thread-count
/// independent like add_column_sums. a and b have the same shape; dst holds a.cols().
template <class T>
void add_column_product_sums(const ConstMatrixRef<T>& a, const ConstMatrixRef<T>& b, T* dst) {
  detail::add_column_sums_impl<T, ConstMatrixRef<T>>(a, &b, nullptr, dst);
}

/// dst += src, rows split between threads (residual connections, gradient sums). Same shapes.
template <class T>
void parallel_add(MatrixRef<T> dst, const ConstMatrixRef<T>& src) {
  parallel_rows(dst.rows(), 4.0 * static_cast<double>(dst.cols()),  // memory-bound: ~4 flops' time each
                [&](Index b, Index e) { dst.middleRows(b, e - b) += src.middleRows(b, e - b); });
}

/// y.row(i) += v for every row (a bias), rows split between threads. v is [1, y.cols()].
template <class T>
void parallel_add_to_rows(MatrixRef<T> y, const ConstMatrixRef<T>& v) {
  parallel_rows(y.rows(), 4.0 * static_cast<double>(y.cols()),
                [&](Index b, Index e) { y.middleRows(b, e - b).rowwise() += v.row(0); });
}

/// dst = src, dst resized to src's shape (no allocation when it has it), rows split between threads.
template <class T>
void parallel_assign(Matrix<T>& dst, const ConstMatrixRef<T>& src) {
  dst.resize(src.rows(), src.cols());
  parallel_rows(src.rows(), 4.0 * static_cast<double>(src.cols()),
                [&](Index b, Index e) { dst.middleRows(b, e - b) = src.middleRows(b, e - b); });
}

/// dst = a + b (residual connections), dst resized to a's shape, rows split between threads. dst
/// may be a or b.
template <class T>
void parallel_sum(Matrix<T>& dst, const ConstMatrixRef<T>& a, const ConstMatrixRef<T>& b) {
  dst.resize(a.rows(), a.cols());
  parallel_rows(a.rows(), 4.0 * static_cast<double>(a.cols()),
                [&](Index r, Index e) { dst.middleRows(r, e - r) = a.middleRows(r, e - r) + b.middleRows(r, e - r); });
}

// The helpers below that compute a + b·c walk their rows one at a time. Whether a + b·c becomes one
// fused multiply-add depends on the compiler and its -ffp-contract setting, and can differ between
// Eigen's vector code and its scalar tail (GCC 12's default fuses both, clang's neither, on the
// machines measured). Walking row by row keeps every element in the same place (packet or tail)
// whatever the thread count, so the results cannot depend on it under any such setting.

/// dst = s · src, dst resized to src's shape, rows split between threads. dst may be src.
template <class T>
void parallel_scale(Matrix<T>& dst, T s, const ConstMatrixRef<T>& src) {
  dst.resize(src.rows(), src.cols());
  parallel_rows(src.rows(), 4.0 * static_cast<double>(src.cols()),
                [&](Index r, Index e) { dst.middleRows(r, e - r) = s * src.middleRows(r, e - r); });
}

/// dst = a + s · b (a scaled residual branch), dst resized to a's shape, rows split between
/// threads. dst may be a or b when it already has a's shape (a resize would free what b views).
template <class T>
void parallel_scaled_sum(Matrix<T>& dst, const ConstMatrixRef<T>& a, T s, const ConstMatrixRef<T>& b) {
  dst.resize(a.rows(), a.cols());
  parallel_rows(a.rows(), 4.0 * static_cast<double>(a.cols()), [&](Index r0, Index e) {
    for (Index r = r0; r < e; ++r) dst.row(r) = a.row(r) + s * b.row(r);
  });
}

/// dst = src ⊙ v on every row (v [1, cols] scales the columns: a gain on the features), dst resized
/// to src's shape, rows split between threads. dst may be src.
template <class T>
void parallel_scale_columns(Matrix<T>& dst, const ConstMatrixRef<T>& src, const Eigen::Ref<const RowVector<T>>& v) {
  dst.resize(src.rows(), src.cols());
  parallel_rows(src.rows(), 4.0 * static_cast<double>(src.cols()), [&](Index r, Index e) {
    dst.middleRows(r, e - r).array() = src.middleRows(r, e - r).array().rowwise() * v.array();
  });
}

/// dst += src ⊙ v on every row (v [1, cols]); dst and src have the same shape.
template <class T>
void parallel_add_scaled_columns(MatrixRef<T> dst, const ConstMatrixRef<T>& src,
                                 const Eigen::Ref<const RowVector<T>>& v) {
  parallel_rows(dst.rows(), 4.0 * static_cast<double>(dst.cols()), [&](Index r0, Index e) {
    for (Index r = r0; r < e; ++r) dst.row(r).array() += src.row(r).array() * v.array();
  });
}

/// dst = src + src ⊙ v on every row (a gradient through a gain 1 + v), dst resized to src's shape.
template <class T>
void parallel_add_self_scaled_columns(Matrix<T>& dst, const ConstMatrixRef<T>& src,
                                      const Eigen::Ref<const RowVector<T>>& v) {
  dst.resize(src.rows(), src.cols());
  parallel_rows(src.rows(), 4.0 * static_cast<double>(src.cols()), [&](Index r0, Index e) {
    for (Index r = r0; r < e; ++r) dst.row(r).array() = src.row(r).array() + src.row(r).array() * v.array();
  });
}

}  // namespace peft
