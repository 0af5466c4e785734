// QLoRA's memory and speed story on CPU: a 4096 x 4096 layer stored as fp32 vs NF4 (+ double
// quantization), measured from the actual buffers; the NF4 base's forward (tile-by-tile decode +
// GEMM) vs the fp32 forward at (rows, d) = (512, 4096); and a LoRA train step (forward + backward
// with dX) on an NF4 base vs on an fp32 base.
//
// Every NF4 case reports "x_fp32" (wall time) and "x_fp32_cpu" (process CPU time, the steadier one
// on a shared machine): its throughput as a fraction of the fp32 case run just before it with the
// same arguments (goal for the forward: >= 0.5). Counters "MiB" and "bits/param" come from
// NF4Tensor::storage_bytes(), i.e. the bytes a file stores for the tensor.
#include <benchmark/benchmark.h>

#include <chrono>
#include <ctime>
#include <map>
#include <string>

#include <peft/layers/lora_linear.hpp>
#include <peft/quant/nf4_lora_linear.hpp>

namespace {

using T = float;
using peft::Index;
using peft::Matrix;
using Clock = std::chrono::steady_clock;

struct Seconds {
  double wall = 0.0;
  double cpu = 0.0;  // process CPU time: steadier than wall time on a shared machine
};

std::map<std::string, Seconds>& fp32_seconds() {  // per-iteration time of the fp32 reference runs
  static std::map<std::string, Seconds> m;
  return m;
}

std::string key(const benchmark::State& s, const char* what) {
  return std::string(what) + "/" + std::to_string(s.range(0)) + "/" + std::to_string(s.range(1));
}

peft::Linear<T> dense(Index d) {
  peft::Rng rng(42);
  return peft::Linear<T>(d, d, rng, false);
}

peft::LoraConfig lora(int r) {
  peft::LoraConfig c;
  c.r = r;
  c.alpha = 2.0 * r;
  return c;
}

template <class Fn>
void timed(benchmark::State& state, Fn&& fn, const std::string& ref_key, bool is_reference) {
  const auto t0 = Clock::now();
  const std::clock_t c0 = std::clock();
  for (auto _ : state) fn();
  const double iters = static_cast<double>(state.iterations());
  Seconds per_iter;
  per_iter.wall = std::chrono::duration<double>(Clock::now() - t0).count() / iters;
  per_iter.cpu = static_cast<double>(std::clock() - c0) / CLOCKS_PER_SEC / iters;
  if (is_reference) {
    fp32_seconds()[ref_key] = per_iter;
  } else if (fp32_seconds().count(ref_key)) {  // throughput relative to fp32 (> 1: faster)
    state.counters["x_fp32"] = fp32_seconds()[ref_key].wall / per_iter.wall;
    state.counters["x_fp32_cpu"] = fp32_seconds()[ref_key].cpu / per_iter.cpu;
  }
}

void BM_Memory4096(benchmark::State& state) {
  const Index d = 4096;
  const peft::Linear<T> base = dense(d);
  peft::quant::NF4Options opt;
  opt.double_quant = state.range(0) != 0;
  peft::quant::NF4Tensor q;
  for (auto _ : state) {
    q = peft::quant::quantize_nf4<T>(base.weight.value, opt);
    benchmark::DoNotOptimize(q.packed.data());
  }
  const double fp32_bytes = static_cast<double>(base.weight.value.size()) * sizeof(T);
  state.counters["fp32_MiB"] = fp32_bytes / (1 << 20);
  state.counters["MiB"] = static_cast<double>(q.storage_bytes()) / (1 << 20);
  state.counters["bits/param"] = q.bits_per_parameter();
  state.counters["x_smaller"] = fp32_bytes / static_cast<double>(q.storage_bytes());
  // While an NF4 host runs LoRA, it also holds its decode tile: tile_rows · in scalars (reused).
  const double tile_bytes = static_cast<double>(peft::NF4LoRALinear<T>().tile_rows()) * d * sizeof(T);
  state.counters["tile_MiB"] = tile_bytes / (1 << 20);
  state.counters["MiB_running"] = (static_cast<double>(q.storage_bytes()) + tile_bytes) / (1 << 20);
}

void BM_ForwardFP32(benchmark::State& state) {
  const Index rows = state.range(0), d = state.range(1);
  peft::Linear<T> layer = dense(d);
  layer.weight.set_trainable(false);
  const Matrix<T> x = Matrix<T>::Random(rows, d);
  Matrix<T> y;
  peft::Linear<T>::Cache cache;
  timed(
      state,
      [&] {
        layer.forward(x, y, cache);
        benchmark::DoNotOptimize(y.data());
      },
      key(state, "fwd"), true);
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * rows * d * d * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_ForwardNF4(benchmark::State& state) {
  const Index rows = state.range(0), d = state.range(1);
  peft::NF4LoRALinear<T> layer = peft::quantize_linear(dense(d));
  layer.set_tile_rows(state.range(2));
  const Matrix<T> x = Matrix<T>::Random(rows, d);
  Matrix<T> y;
  peft::NF4LoRALinear<T>::Cache cache;
  timed(
      state,
      [&] {
        layer.forward(x, y, cache);
        benchmark::DoNotOptimize(y.data());
      },
      key(state, "fwd"), false);
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * rows * d * d * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["MiB"] = static_cast<double>(layer.quantized_weight().storage_bytes()) / (1 << 20);
}

// One LoRA train step: forward, backward with dX (a layer inside a network), r = 16.
void BM_LoraStepFP32(benchmark::State& state) {
  const Index rows = state.range(0), d = state.range(1);
  peft::LoRALinear<T> layer(dense(d), "fp32");
  layer.freeze_base();
  peft::Rng rng(7);
  layer.add_adapter("default", lora(16), rng);
  const Matrix<T> x = Matrix<T>::Random(rows, d);
  const Matrix<T> dy = Matrix<T>::Random(rows, d);
  Matrix<T> y, dx;
  peft::LoRALinear<T>::Cache cache;
  timed(
      state,
      [&] {
        layer.forward(x, y, cache);
        layer.backward(cache, dy, &dx);
        benchmark::DoNotOptimize(dx.data());
      },
      key(state, "step"), true);
}

void BM_LoraStepNF4(benchmark::State& state) {
  const Index rows = state.range(0), d = state.range(1);
  peft::NF4LoRALinear<T> layer = peft::quantize_linear(dense(d));
  layer.set_tile_rows(state.range(2));
  peft::Rng rng(7);
  layer.add_adapter("default", lora(16), rng);
  const Matrix<T> x = Matrix<T>::Random(rows, d);
  const Matrix<T> dy = Matrix<T>::Random(rows, d);
  Matrix<T> y, dx;
  peft::NF4LoRALinear<T>::Cache cache;
  timed(
      state,
      [&] {
        layer.forward(x, y, cache);
        layer.backward(cache, dy, &dx);
        benchmark::DoNotOptimize(dx.data());
      },
      key(state, "step"), false);
}

// Decoding alone: how much of the NF4 forward is dequantization.
void BM_DequantizeRows(benchmark::State& state) {
  const Index d = state.range(1);
  const peft::quant::NF4Tensor q = peft::quant::quantize_nf4<T>(dense(d).weight.value);
  Matrix<T> tile;
  const Index tr = state.range(2);
  for (auto _ : state) {
    for (Index r0 = 0; r0 < d; r0 += tr) peft::quant::dequantize_nf4_rows<T>(q, r0, std::min(tr, d - r0), tile);
    benchmark::DoNotOptimize(tile.data());
  }
  state.counters["Gvalues/s"] =
      benchmark::Counter(static_cast<double>(d) * d * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK(BM_Memory4096)->ArgNames({"dq"})->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->Iterations(1);
BENCHMARK(BM_ForwardFP32)->ArgNames({"rows", "d"})->Args({512, 4096})->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK(BM_ForwardNF4)
    ->ArgNames({"rows", "d", "tile"})
    ->Args({512, 4096, 128})
    ->Args({512, 4096, 256})
    ->Args({512, 4096, 512})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);
BENCHMARK(BM_LoraStepFP32)->ArgNames({"rows", "d"})->Args({512, 4096})->Unit(benchmark::kMillisecond)->MinTime(1.0);
BENCHMARK(BM_LoraStepNF4)
    ->ArgNames({"rows", "d", "tile"})
    ->Args({512, 4096, 256})
    ->Unit(benchmark::kMillisecond)
    ->MinTime(1.0);
BENCHMARK(BM_DequantizeRows)->ArgNames({"rows", "d", "tile"})->Args({0, 4096, 128})->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
