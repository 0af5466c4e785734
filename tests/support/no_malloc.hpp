#pragma once
// Shared by the test_*no_malloc*.cpp files (one executable, peft_tests_no_malloc): counts the heap
// allocations a hot path makes after its warm-up. Two ways, chosen by tests/CMakeLists.txt:
//
// - Counting (PEFT_NO_MALLOC_COUNT; release and debug builds on glibc): every heap allocation of
//   the process is counted by interposing malloc and operator new (support/count_malloc.hpp, its
//   definitions compiled once in support/count_malloc.cpp). It sees everything: Eigen's allocator,
//   GEMM blocking space, std::vector and std::string. Nothing in the code under test changes, so
//   the executable links the test build's explicit instantiations (peft_test_instantiations) like
//   every other test executable and compiles only its own test code (GCC 12 -Og: 80 -> ~20 CPU-s).
// - Eigen's guard (sanitizer builds, where ASan owns malloc): EIGEN_RUNTIME_NO_MALLOC with
//   eigen_assert routed to a counter (NDEBUG would compile the assert out), so each forbidden
//   allocation is counted and then proceeds (a test failure, never a crash). The guard changes
//   Eigen's inline code, so in this mode the executable links no instantiations compiled without it:
//   every TU instantiates what it uses, with the guard. It sees only Eigen's allocator.
//
// Include this header first, before anything that includes Eigen (the guard's macros must be seen
// by the first Eigen include). Each file keeps a positive control proving the count is live for
// the code under test.
//
// The no-malloc tests run in float only. Whether a hot path allocates is decided by its code (reused
// buffers, noalias products), which is the same template for float and double; float is what
// models train in. (One difference the float tests cannot see: Eigen puts a product's blocking
// buffer on the stack up to EIGEN_STACK_ALLOCATION_LIMIT bytes, so a double product of a given
// shape reaches the heap at half the size a float one does; these tests use small shapes.)
#include <atomic>

#ifdef PEFT_NO_MALLOC_COUNT

#define PEFT_COUNT_MALLOC_NO_DEFINITIONS  // support/count_malloc.cpp holds them
#include "support/count_malloc.hpp"
#undef PEFT_COUNT_MALLOC_NO_DEFINITIONS
#if !PEFT_COUNT_MALLOC
#error "PEFT_NO_MALLOC_COUNT needs glibc and no sanitizer (tests/CMakeLists.txt chooses the guard otherwise)"
#endif

namespace peft::test::no_malloc {
inline long allocations_now() { return peft::count_malloc::allocations(); }
inline void forbid() {}
inline void allow() {}
}  // namespace peft::test::no_malloc

#else

#if defined(EIGEN_CORE_MODULE_H) || defined(EIGEN_CORE_H)
#error "support/no_malloc.hpp must be included before any Eigen header"
#endif

namespace peft::test::no_malloc {
inline std::atomic<long> violations{0};
inline void on_eigen_assert(bool ok) {
  if (!ok) ++violations;
}
}  // namespace peft::test::no_malloc

#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) ::peft::test::no_malloc::on_eigen_assert(static_cast<bool>(x))

#include <Eigen/Core>

namespace peft::test::no_malloc {
inline long allocations_now() { return violations.load(); }
inline void forbid() { Eigen::internal::set_is_malloc_allowed(false); }
inline void allow() { Eigen::internal::set_is_malloc_allowed(true); }
}  // namespace peft::test::no_malloc

#endif

namespace peft::test::no_malloc {

/// Runs fn `warmup` times with allocation allowed (buffers reach their final size), then `reps`
/// times counted; returns the number of heap allocations those made (see the modes above).
template <class Fn>
long allocations_after_warmup(Fn&& fn, int warmup = 1, int reps = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  const long before = allocations_now();
  forbid();
  for (int i = 0; i < reps; ++i) fn();
  allow();
  return allocations_now() - before;
}

/// Runs fn once, counted, with no warm-up; returns its heap allocations.
template <class Fn>
long count_allocations(Fn&& fn) {
  return allocations_after_warmup(fn, 0, 1);
}

}  // namespace peft::test::no_malloc
