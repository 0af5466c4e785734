#pragma once
// Shared by the step benchmarks (bench_transformer, bench_lora): the core's measured FMA peak, CPU
// time of the process, and per-step allocation / page-fault counts (tests/support/count_malloc.hpp
// interposes malloc: include this header in one TU per benchmark program only).
//
// FMA peak: independent chains of fused multiply-adds on registers (AVX-512 when the compiler
// targets it, else AVX2 + FMA, else scalar), enough chains to cover the FMA latency on two ports.
// It is what one core can do at most for float; % of peak = a step's GF/s (2·m·n·k summed over its
// matrix products) over this.
#include <benchmark/benchmark.h>
#include <immintrin.h>
#include <time.h>

#include <algorithm>
#include <chrono>

#include "../tests/support/count_malloc.hpp"

namespace peft::bench {

inline double now_s() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

/// CPU time of the whole process (every thread), seconds.
inline double process_cpu_s() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

/// Which instruction set the FMA loop uses.
inline const char* fma_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__) && defined(__FMA__)
  return "avx2";
#else
  return "scalar";
#endif
}

/// Runs `iters` rounds of 16 independent FMA chains; returns the float FLOPs done (2 per lane).
inline double fma_chains(long iters) {
#if defined(__AVX512F__)
  using V = __m512;
  constexpr int lanes = 16;
#define PEFT_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define PEFT_SET1(x) _mm512_set1_ps(x)
#elif defined(__AVX2__) && defined(__FMA__)
  using V = __m256;
  constexpr int lanes = 8;
#define PEFT_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define PEFT_SET1(x) _mm256_set1_ps(x)
#else
  using V = float;
  constexpr int lanes = 1;
#define PEFT_FMA(a, b, c) ((a) * (b) + (c))
#define PEFT_SET1(x) (x)
#endif
  constexpr int chains = 16;
  V acc[chains];
  for (int i = 0; i < chains; ++i) acc[i] = PEFT_SET1(0.001f * static_cast<float>(i));
  const V mul = PEFT_SET1(0.999999f), add = PEFT_SET1(1e-7f);
  for (long it = 0; it < iters; ++it) {
#if defined(__GNUC__)
#pragma GCC unroll 16
#endif
    for (int i = 0; i < chains; ++i) acc[i] = PEFT_FMA(acc[i], mul, add);
  }
  for (int i = 0; i < chains; ++i) benchmark::DoNotOptimize(acc[i]);
#undef PEFT_FMA
#undef PEFT_SET1
  return 2.0 * lanes * chains * static_cast<double>(iters);
}

/// CPU time of the calling thread, seconds.
inline double thread_cpu_s() {
  timespec t{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

/// The core's float FMA peak in GFLOP/s: best of 20 runs of ~5 ms, over the thread's CPU time (so
/// a loaded machine, which takes the core away now and then, does not lower it). Measured once per
/// process, at start-up (kFmaPeakAtStart below): measured after the timed GEMM loops on a loaded
/// machine it came out at a third of BM_FmaPeak's figure.
inline double fma_peak_gflops() {
  static const double peak = [] {
    double best = 0;
    for (int r = 0; r < 20; ++r) {
      const double t0 = thread_cpu_s();
      const double flops = fma_chains(1000000);
      best = std::max(best, flops / (thread_cpu_s() - t0) * 1e-9);
    }
    return best;
  }();
  return peak;
}
inline const double kFmaPeakAtStart = fma_peak_gflops();

/// Counts for a timed region: wall, process CPU, allocations, minor faults.
struct Meter {
  double wall0 = now_s(), cpu0 = process_cpu_s();
  long alloc0 = count_malloc::allocations(), fault0 = count_malloc::minor_faults();
  double wall() const { return now_s() - wall0; }
  double cpu() const { return process_cpu_s() - cpu0; }
  long allocations() const { return count_malloc::allocations() - alloc0; }
  long faults() const { return count_malloc::minor_faults() - fault0; }
};

/// Step counters every step benchmark reports (steady state = the timed loop).
///   GF/s, %peak        flops / steady step wall time, against fma_peak_gflops() (one core)
///   GF/s_cpu, %peak_cpu    flops / process CPU time per step: per-core efficiency, the figure that
///                      survives a loaded machine (equal to the wall ones on a quiet one at 1 thread)
///   cpu/wall           process CPU over wall in the loop (≈ threads busy)
///   allocs/step, faults/step   in the loop
///   first_ms, first/steady     the very first step of a fresh model in this process (no warm-up)
///   first_cpu_ms, first/steady_cpu  the same on process CPU time
///   first_allocs, first_faults that step's counts
struct StepCounters {
  double flops = 0;  ///< per step
  double first_s = 0, first_cpu_s = 0;
  long first_allocs = 0, first_faults = 0;
};

/// `in_steps`: allocations and faults counted around the steps alone (not Google Benchmark's own
/// bookkeeping between them, which a loop-wide count would charge to a 1-iteration run); null:
/// counted over the whole loop.
struct StepCounts {
  long allocations = 0, faults = 0;
};
inline void report(benchmark::State& state, const StepCounters& c, const Meter& loop,
                   const StepCounts* in_steps = nullptr) {
  const double n = static_cast<double>(state.iterations());
  const double step = loop.wall() / n, step_cpu = loop.cpu() / n;
  const double gfs = c.flops / step * 1e-9, gfs_cpu = c.flops / step_cpu * 1e-9;
  state.counters["GFLOP/step"] = c.flops * 1e-9;
  state.counters["GF/s"] = gfs;
  state.counters["%peak"] = 100.0 * gfs / fma_peak_gflops();
  state.counters["GF/s_cpu"] = gfs_cpu;
  state.counters["%peak_cpu"] = 100.0 * gfs_cpu / fma_peak_gflops();
  state.counters["peak_GF/s"] = fma_peak_gflops();
  state.counters["cpu/wall"] = loop.cpu() / loop.wall();
  state.counters["allocs/step"] =
      static_cast<double>(in_steps != nullptr ? in_steps->allocations : loop.allocations()) / n;
  state.counters["faults/step"] = static_cast<double>(in_steps != nullptr ? in_steps->faults : loop.faults()) / n;
  state.counters["first_ms"] = 1e3 * c.first_s;
  state.counters["first/steady"] = c.first_s / step;
  state.counters["first_cpu_ms"] = 1e3 * c.first_cpu_s;
  state.counters["first/steady_cpu"] = c.first_cpu_s / step_cpu;
  state.counters["first_allocs"] = static_cast<double>(c.first_allocs);
  state.counters["first_faults"] = static_cast<double>(c.first_faults);
}

/// BM_FmaPeak: the FMA loop as a benchmark of its own (GF/s counter over CPU time, ISA in the
/// label). Register it without UseRealTime.
inline void BM_FmaPeak(benchmark::State& state) {
  double flops = 0;
  for (auto _ : state) flops += fma_chains(1000000);
  state.counters["GF/s"] = benchmark::Counter(flops * 1e-9, benchmark::Counter::kIsRate);
  state.SetLabel(fma_isa());
}

}  // namespace peft::bench
