#pragma once
// Counts every heap allocation of the process by interposing malloc, calloc, realloc,
// aligned_alloc, posix_memalign, memalign and valloc (glibc removed __malloc_hook in 2.34, so the
// C functions themselves are replaced; each forwards to glibc's __libc_* entry point). operator new
// and new[] are replaced too (libstdc++'s call malloc anyway; replacing them makes the count
// independent of that). Also what Eigen's GEMM takes for its packing blocks, which
// EIGEN_RUNTIME_NO_MALLOC (support/no_malloc.hpp) sees only for Eigen's own allocator.
//
// Include it in exactly ONE translation unit of an executable (it defines the global functions),
// or define PEFT_COUNT_MALLOC_NO_DEFINITIONS before including it for the counters alone and link
// one TU that defines them (support/count_malloc.cpp, as peft_tests_no_malloc does).
// Not for sanitizer builds (ASan interposes malloc itself): the including file is left out of them
// (tests/CMakeLists.txt) and the guard below makes the header empty there.
//
// Counting is always on (a relaxed atomic add per call); read `allocations()` before and after the
// code under test. Page faults: `minor_faults()` (getrusage, the whole process).
#include <sys/resource.h>

#include <atomic>
#include <cstddef>  // on glibc this brings <features.h>, which defines __GLIBC__
#include <new>

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__) || !defined(__GLIBC__)
#define PEFT_COUNT_MALLOC 0
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define PEFT_COUNT_MALLOC 0
#endif
#endif
#ifndef PEFT_COUNT_MALLOC
#define PEFT_COUNT_MALLOC 1
#endif
namespace peft::count_malloc {

inline std::atomic<long>& counter() {
  static std::atomic<long> n{0};
  return n;
}
/// Heap allocations made by the process so far (0 forever where counting is unavailable).
inline long allocations() { return counter().load(std::memory_order_relaxed); }
/// Whether allocations() counts (glibc, no sanitizer).
constexpr bool available() { return PEFT_COUNT_MALLOC != 0; }
/// Minor page faults of the process so far (fresh pages touched: first use of new memory).
inline long minor_faults() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_minflt;
}

}  // namespace peft::count_malloc

#if PEFT_COUNT_MALLOC && !defined(PEFT_COUNT_MALLOC_NO_DEFINITIONS)
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void* __libc_valloc(std::size_t);
void __libc_free(void*);

void* malloc(std::size_t n) noexcept {
  peft::count_malloc::counter().fetch_add(1, std::memory_order_relaxed);
  return __libc_malloc(n);
}
void* calloc(std::size_t n, std::size_t s) noexcept {
  peft::count_malloc::counter().fetch_add(1, std::memory_order_relaxed);
  return __libc_calloc(n, s);
}
void* realloc(void* p, std::size_t n) noexcept {
  peft::count_malloc::counter().fetch_add(1, std::memory_order_relaxed);
  return __libc_realloc(p, n);
}
void* aligned_alloc(std::size_t a, std::size_t n) noexcept {
  peft::count_malloc::counter().fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(a, n);
}
void* memalign(std::size_t a, std::size_t n) noexcept {
  peft::count_malloc::counter().fetch_add(1, std::memory_order_relaxed);
  return __libc_memalign(a, n);
}
void* valloc(std::size_t n) noexcept {
  peft::count_malloc::counter().fetch_add(1, std::memory_order_relaxed);
  return __libc_valloc(n);
}
int posix_memalign(void** out, std::size_t a, std::size_t n) noexcept {
  peft::count_malloc::counter().fetch_add(1, std::memory_order_relaxed);
  void* p = __libc_memalign(a, n);
  if (p == nullptr) return 12;  // ENOMEM
  *out = p;
  return 0;
}
void free(void* p) noexcept { __libc_free(p); }
}  // extern "C"

void* operator new(std::size_t n) {
  if (void* p = malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t n) {
  if (void* p = malloc(n == 0 ? 1 : n)) return p;
  throw std::bad_alloc();
}
void* operator new(std::size_t n, const std::nothrow_t&) noexcept { return malloc(n == 0 ? 1 : n); }
void* operator new[](std::size_t n, const std::nothrow_t&) noexcept { return malloc(n == 0 ? 1 : n); }
void operator delete(void* p) noexcept { free(p); }
void operator delete[](void* p) noexcept { free(p); }
void operator delete(void* p, std::size_t) noexcept { free(p); }
void operator delete[](void* p, std::size_t) noexcept { free(p); }
#endif
