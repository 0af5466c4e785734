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

}  // namespace peft
