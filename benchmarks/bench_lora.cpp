// Linear vs. LoRALinear: forward, backward, merged forward and a full train step
// (forward + backward + AdamW) at the Foundation issue's sizes. Ratios, not absolute times, are
// the point: run benchmarks/run_lora_peer.sh to see them next to PyTorch on the same CPU.
//
//   LinearForward        peft::Linear, frozen, inference (the base every ratio refers to)
//   LinearBackward       peft::Linear, trainable: dW, db and dX (what full fine-tuning pays)
//   LinearTrainStep      full fine-tuning step of the Linear: forward, backward (no dX), AdamW on W, b
//   LoraForward          LoRALinear, unmerged, inference (forward_inference: nothing kept)
//   LoraMergedForward    LoRALinear after merge()
//   LoraBackward         LoRALinear on a frozen base: dA, dB and dX (a middle layer)
//   LoraTrainStep        LoRA step on a frozen base: forward, backward (no dX), AdamW on A, B
//
// Args: rows, in, out, r. Counters (bench_support.hpp): GF/s of the matrix products each case must
// do and % of the core's FMA peak, cpu/wall, allocations and page faults per call, and the first
// call on a fresh layer against a steady one.
#include <benchmark/benchmark.h>

#include <peft/peft.hpp>

#include "bench_support.hpp"

namespace {

using T = float;
using peft::Index;
using peft::Matrix;

struct Case {
  Index rows, in, out;
  int r;
  explicit Case(const benchmark::State& s)
      : rows(s.range(0)), in(s.range(1)), out(s.range(2)), r(static_cast<int>(s.range(3))) {}
  double base_flops() const { return 2.0 * rows * in * out; }
  double lora_flops() const { return 2.0 * rows * r * (in + out); }
};

peft::LoRALinear<T> make_layer(const Case& c, bool with_adapter) {
  peft::Rng rng(42);
  peft::LoRALinear<T> layer(c.in, c.out, rng, true, "bench");
  layer.freeze_base();
  if (with_adapter) {
    layer.add_adapter("default", peft::LoraConfig{c.r, 2.0 * c.r}, rng);
    peft::init::normal<T>(layer.adapter("default").B.value, rng, 0.0, 0.02);  // B ≠ 0: real work
  }
  layer.eval();
  return layer;
}

/// Times fn: its first call on the fresh layer (first_ms), then the steady loop; step counters.
template <class Fn>
void run_timed(benchmark::State& state, double flops, Fn&& fn) {
  peft::bench::StepCounters c;
  c.flops = flops;
  const peft::bench::Meter first;
  fn();
  c.first_s = first.wall();
  c.first_cpu_s = first.cpu();
  c.first_allocs = first.allocations();
  c.first_faults = first.faults();
  // Allocations and faults are counted around each call alone: Google Benchmark's own bookkeeping
  // between iterations would otherwise be charged to the few-iteration large cases.
  peft::bench::StepCounts counts;
  const peft::bench::Meter loop;
  for (auto _ : state) {
    const long a0 = peft::count_malloc::allocations(), f0 = peft::count_malloc::minor_faults();
    fn();
    counts.allocations += peft::count_malloc::allocations() - a0;
    counts.faults += peft::count_malloc::minor_faults() - f0;
    benchmark::ClobberMemory();
  }
  peft::bench::report(state, c, loop, &counts);
}

/// Times layer.forward_inference on a fixed input with a reused output buffer.
void time_forward(benchmark::State& state, peft::LoRALinear<T>& layer, const Case& c, double flops) {
  const Matrix<T> x = Matrix<T>::Random(c.rows, c.in);
  Matrix<T> y;
  run_timed(state, flops, [&] {
    layer.forward_inference(x, y);
    benchmark::DoNotOptimize(y.data());
  });
}

peft::Linear<T> make_linear(const Case& c, bool trainable) {
  peft::Rng rng(42);
  peft::Linear<T> layer(c.in, c.out, rng, true, "bench");
  layer.weight.set_trainable(trainable);
  layer.bias.set_trainable(trainable);
  return layer;
}

void BM_LinearForward(benchmark::State& state) {
  const Case c(state);
  auto layer = make_linear(c, false);
  const Matrix<T> x = Matrix<T>::Random(c.rows, c.in);
  Matrix<T> y;
  peft::Linear<T>::Cache cache;  // frozen: forward keeps nothing in it
  run_timed(state, c.base_flops(), [&] {
    layer.forward(x, y, cache);
    benchmark::DoNotOptimize(y.data());
  });
}

/// Backward of a trainable Linear with the input gradient: dW = dYᵀX, db, dX = dY W.
void BM_LinearBackward(benchmark::State& state) {
  const Case c(state);
  auto layer = make_linear(c, true);
  const Matrix<T> x = Matrix<T>::Random(c.rows, c.in);
  const Matrix<T> dy = Matrix<T>::Random(c.rows, c.out);
  Matrix<T> y, dx;
  peft::Linear<T>::Cache cache;
  layer.forward(x, y, cache);
  run_timed(state, 2.0 * c.base_flops(), [&] {
    layer.backward(cache, dy, &dx);
    benchmark::DoNotOptimize(dx.data());
  });
}

/// A full fine-tuning step of the Linear (first layer: no dX): forward, dW and db, AdamW on both.
void BM_LinearTrainStep(benchmark::State& state) {
  const Case c(state);
  auto layer = make_linear(c, true);
  peft::AdamW<T> opt(layer, peft::AdamWOptions{});
  const Matrix<T> x = Matrix<T>::Random(c.rows, c.in);
  const Matrix<T> dy = Matrix<T>::Random(c.rows, c.out);
  Matrix<T> y;
  peft::Linear<T>::Cache cache;
  run_timed(state, 2.0 * c.base_flops(), [&] {
    opt.zero_grad();
    layer.forward(x, y, cache);
    layer.backward(cache, dy, nullptr);
    opt.step();
    benchmark::DoNotOptimize(layer.weight.value.data());
  });
}

void BM_LoraForward(benchmark::State& state) {
  const Case c(state);
  auto layer = make_layer(c, true);
  time_forward(state, layer, c, c.base_flops() + c.lora_flops());
}

void BM_LoraMergedForward(benchmark::State& state) {
  const Case c(state);
  auto layer = make_layer(c, true);
  layer.merge();
  time_forward(state, layer, c, c.base_flops());
}

/// Backward of a LoRA layer on a frozen base, input gradient included (a middle layer).
void BM_LoraBackward(benchmark::State& state) {
  const Case c(state);
  auto layer = make_layer(c, true);
  layer.train();
  const Matrix<T> x = Matrix<T>::Random(c.rows, c.in);
  const Matrix<T> dy = Matrix<T>::Random(c.rows, c.out);
  Matrix<T> y, dx;
  peft::LoRALinear<T>::Cache cache;
  layer.forward(x, y, cache);
  // dX = dY W (base) + the low-rank terms dB, G = dY B, dA, G A.
  run_timed(state, c.base_flops() + 2.0 * c.lora_flops(), [&] {
    layer.backward(cache, dy, &dx);
    benchmark::DoNotOptimize(dx.data());
  });
}

/// One optimisation step of a LoRA layer on a frozen base: zero_grad, forward, backward (no input
/// gradient: the first layer of a model), AdamW. The PEFT promise is that this costs little more
/// than the base forward, since the frozen W gets no gradient GEMM.
void BM_LoraTrainStep(benchmark::State& state) {
  const Case c(state);
  auto layer = make_layer(c, true);
  layer.train();
  peft::AdamW<T> opt(layer, peft::AdamWOptions{});
  const Matrix<T> x = Matrix<T>::Random(c.rows, c.in);
  const Matrix<T> dy = Matrix<T>::Random(c.rows, c.out);
  Matrix<T> y;
  peft::LoRALinear<T>::Cache cache;
  run_timed(state, c.base_flops() + 2.0 * c.lora_flops(), [&] {
    opt.zero_grad();
    layer.forward(x, y, cache);
    layer.backward(cache, dy, nullptr);
    opt.step();
    benchmark::DoNotOptimize(layer.adapter("default").A.value.data());
  });
}

void cases(benchmark::internal::Benchmark* b) {
  b->ArgNames({"rows", "in", "out", "r"});
  b->Args({64, 256, 256, 8});
  b->Args({512, 1024, 1024, 16});
  b->Args({512, 4096, 4096, 16});
  b->Unit(benchmark::kMicrosecond);
  b->UseRealTime();
  b->MeasureProcessCPUTime();
}

}  // namespace

BENCHMARK(BM_LinearForward)->Apply(cases);
BENCHMARK(BM_LinearBackward)->Apply(cases);
BENCHMARK(BM_LinearTrainStep)->Apply(cases);
BENCHMARK(BM_LoraForward)->Apply(cases);
BENCHMARK(BM_LoraMergedForward)->Apply(cases);
BENCHMARK(BM_LoraBackward)->Apply(cases);
BENCHMARK(BM_LoraTrainStep)->Apply(cases);

BENCHMARK(peft::bench::BM_FmaPeak)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
