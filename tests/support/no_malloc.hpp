#pragma once
// Shared by the test_*no_malloc*.cpp executables: Eigen's EIGEN_RUNTIME_NO_MALLOC guard with a
// counter. Eigen reports a forbidden allocation through eigen_assert, which NDEBUG (Release)
// compiles out, so eigen_assert is routed to a counter here: each violation is counted (and the
// allocation then proceeds normally, so a violation is a test failure, never a crash).
//
// Include this header first, before anything that includes Eigen: the macros must be seen by the
// first Eigen include. Each such file is its own executable (tests/CMakeLists.txt): the macros
// change Eigen's inline code, and linked with other translation units the linker could keep their
// unguarded copies. Each file keeps a positive control proving the guard is live for the code under
// test.
//
// What Eigen's guard cannot see: std::string / std::vector allocations (reviewed by eye).
//
// The no-malloc tests run in float only. Whether a hot path allocates is decided by its code (reused
// buffers, noalias products), which is the same template for float and double; float is what
// models train in. Compiled without the test build's extern templates, the double copies were
// half of this executable's compile time (GCC 12 -O1: 117 CPU-s with them, 62 without; every layer
// and method instantiated again) and tested nothing float does not. (One difference the float tests cannot see: Eigen puts a product's
// blocking buffer on the stack up to EIGEN_STACK_ALLOCATION_LIMIT bytes, so a double product of a
// given shape reaches the heap at half the size a float one does; these tests use small shapes.)
#if defined(EIGEN_CORE_MODULE_H) || defined(EIGEN_CORE_H)
#error "support/no_malloc.hpp must be included before any Eigen header"
#endif

#include <atomic>

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

/// Runs fn `warmup` times with allocation allowed (buffers reach their final size), then `reps`
/// times with Eigen's allocator forbidden; returns the number of forbidden allocations.
template <class Fn>
long allocations_after_warmup(Fn&& fn, int warmup = 1, int reps = 3) {
  for (int i = 0; i < warmup; ++i) fn();
  violations = 0;
  Eigen::internal::set_is_malloc_allowed(false);
  for (int i = 0; i < reps; ++i) fn();
  Eigen::internal::set_is_malloc_allowed(true);
  return violations.load();
}

/// Runs fn once with Eigen's allocator forbidden (no warm-up); returns the forbidden allocations.
template <class Fn>
long count_allocations(Fn&& fn) {
  return allocations_after_warmup(fn, 0, 1);
}

}  // namespace peft::test::no_malloc
