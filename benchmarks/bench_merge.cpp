// Serving and combining adapters. Goals (issue "Merge and compose"), read as ratios in one run:
//   * mixed batch with 1, 4, 16 adapters vs. one adapter on all rows (rows 512, d 1024, r 16): ≤ 1.15× at 16;
//     and vs. merging each adapter into W per request group (merge, base GEMM on its rows, unmerge).
//   * factored SVD merge vs. materialize-then-SVD (BDCSVD of the d × d delta) at d = 4096: ≥ 20×.
// The dense 4096 SVD takes long, so it runs one iteration.
#include <benchmark/benchmark.h>

#include <peft/layers/lora_mixed_batch.hpp>
#include <peft/merge/combine.hpp>

#include <string>
#include <vector>

namespace {

using T = float;
using peft::Index;
using peft::Matrix;

constexpr Index kRows = 512;
constexpr Index kDim = 1024;
constexpr int kRank = 16;

peft::LoRALinear<T> make_layer(int adapters, peft::Rng& rng) {
  peft::LoRALinear<T> layer(kDim, kDim, rng, true, "bench");
  layer.freeze_base();
  peft::LoraConfig c;
  c.r = kRank;
  c.alpha = 32.0;
  c.init = peft::LoraInit::None;
  for (int a = 0; a < adapters; ++a) layer.add_adapter("task" + std::to_string(a), c, rng);
  return layer;
}

Matrix<T> random_input(Index rows, Index cols, peft::Rng& rng) {
  Matrix<T> x(rows, cols);
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = static_cast<T>(rng.normal());
  return x;
}

double forward_flops(int adapters_used) {
  (void)adapters_used;  // adapter work is Σ_a |R_a| r (in + out) = rows · r · 2d whatever the split
  return 2.0 * kRows * kDim * kDim + 2.0 * kRows * kRank * (2.0 * kDim);
}

// Baseline: one adapter active on every row, the layer's serving forward (keeps nothing for
// backward, as forward_mixed does not).
void BM_OneAdapterAllRows(benchmark::State& state) {
  peft::Rng rng(1);
  peft::LoRALinear<T> layer = make_layer(1, rng);
  layer.eval();
  const Matrix<T> x = random_input(kRows, kDim, rng);
  Matrix<T> y;
  for (auto _ : state) {
    layer.forward_inference(x, y);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["FLOP/s"] = benchmark::Counter(forward_flops(1), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["rows/s"] = benchmark::Counter(kRows, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_OneAdapterAllRows)->Unit(benchmark::kMillisecond);

// Mixed batch: rows spread round-robin over n adapters (interleaved, the worst case for grouping).
void BM_MixedBatch(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  peft::Rng rng(2);
  peft::LoRALinear<T> layer = make_layer(n, rng);
  const Matrix<T> x = random_input(kRows, kDim, rng);
  std::vector<int> routing(kRows);
  for (Index r = 0; r < kRows; ++r) routing[static_cast<std::size_t>(r)] = static_cast<int>(r % n);
  peft::MixedBatchWorkspace<T> ws;
  Matrix<T> y;
  for (auto _ : state) {
    peft::forward_mixed(layer, x, routing, y, ws);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["adapters"] = n;
  state.counters["FLOP/s"] = benchmark::Counter(forward_flops(n), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["rows/s"] = benchmark::Counter(kRows, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_MixedBatch)->ArgNames({"adapters"})->Arg(1)->Arg(4)->Arg(16)->Unit(benchmark::kMillisecond);

// Same, routing by name (string lookups per row included).
void BM_MixedBatchByName(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  peft::Rng rng(3);
  peft::LoRALinear<T> layer = make_layer(n, rng);
  const Matrix<T> x = random_input(kRows, kDim, rng);
  std::vector<std::string> names(kRows);
  for (Index r = 0; r < kRows; ++r) names[static_cast<std::size_t>(r)] = "task" + std::to_string(r % n);
  peft::MixedBatchWorkspace<T> ws;
  Matrix<T> y;
  for (auto _ : state) {
    peft::forward_mixed(layer, x, names, y, ws);
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["adapters"] = n;
  state.counters["rows/s"] = benchmark::Counter(kRows, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_MixedBatchByName)->ArgNames({"adapters"})->Arg(16)->Unit(benchmark::kMillisecond);

// Alternative: requests grouped per adapter (kRows / n contiguous rows each); for each group merge the
// adapter into W, run the (merged) layer on its rows, unmerge.
void BM_MergePerRequest(benchmark::State& state) {
  const int n = static_cast<int>(state.range(0));
  peft::Rng rng(4);
  peft::LoRALinear<T> layer = make_layer(n, rng);
  layer.eval();
  const Matrix<T> x = random_input(kRows, kDim, rng);
  const Index per = kRows / n;
  Matrix<T> y(kRows, kDim), yg;
  for (auto _ : state) {
    for (int a = 0; a < n; ++a) {
      const std::string name = "task" + std::to_string(a);
      layer.set_active(name);
      layer.merge();
      layer.forward_inference(x.middleRows(a * per, per), yg);
      y.middleRows(a * per, per) = yg;
      layer.unmerge();
    }
    benchmark::DoNotOptimize(y.data());
    benchmark::ClobberMemory();
  }
  state.counters["adapters"] = n;
  state.counters["rows/s"] = benchmark::Counter(kRows, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_MergePerRequest)->ArgNames({"adapters"})->Arg(1)->Arg(4)->Arg(16)->Unit(benchmark::kMillisecond);

// ---- SVD merge ---------------------------------------------------------------------------------

constexpr int kMergeAdapters = 4;

std::vector<peft::LoraFactors<T>> merge_sources(Index d, peft::Rng& rng) {
  std::vector<peft::LoraFactors<T>> fs;
  for (int i = 0; i < kMergeAdapters; ++i)
    fs.push_back({random_input(kRank, d, rng), random_input(d, kRank, rng), 2.0, ""});
  return fs;
}

const std::vector<double> kMergeWeights = {0.5, -0.25, 1.0, 0.75};

void BM_SvdMergeFactored(benchmark::State& state) {
  const Index d = state.range(0);
  peft::Rng rng(5);
  const auto fs = merge_sources(d, rng);
  peft::CombineOptions opt;
  opt.method = peft::CombineMethod::Svd;
  opt.rank = kRank;
  for (auto _ : state) {
    peft::CombineResult<T> r = peft::combine(fs, kMergeWeights, opt);
    benchmark::DoNotOptimize(r.factors.A.data());
    benchmark::DoNotOptimize(r.factors.B.data());
  }
  state.counters["d"] = static_cast<double>(d);
  state.counters["total_rank"] = kMergeAdapters * kRank;
}
BENCHMARK(BM_SvdMergeFactored)->ArgNames({"d"})->Arg(1024)->Arg(4096)->Unit(benchmark::kMillisecond);

// Materialize ΔW = Σ w_i s_i B_i A_i (d × d), BDCSVD it, keep rank k: what a dense implementation does.
void BM_SvdMergeDense(benchmark::State& state) {
  const Index d = state.range(0);
  peft::Rng rng(5);
  const auto fs = merge_sources(d, rng);
  peft::CombineOptions opt;
  opt.method = peft::CombineMethod::Linear;  // dense target + dense SVD, same result as Svd
  opt.rank = kRank;
  for (auto _ : state) {
    peft::CombineResult<T> r = peft::combine(fs, kMergeWeights, opt);
    benchmark::DoNotOptimize(r.factors.A.data());
    benchmark::DoNotOptimize(r.factors.B.data());
  }
  state.counters["d"] = static_cast<double>(d);
}
BENCHMARK(BM_SvdMergeDense)->ArgNames({"d"})->Arg(1024)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_SvdMergeDense)->ArgNames({"d"})->Arg(4096)->Iterations(1)->Unit(benchmark::kMillisecond);

}  // namespace

BENCHMARK_MAIN();
