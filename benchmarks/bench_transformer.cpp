// Forward + backward throughput of the TransformerClassifier under each PEFT method, at the
// Sequence-methods issue's size: 4 blocks, d = 256, 4 heads, FFN 1024, seq 64, batch 32, feature
// input (16-pixel patches), 10 classes, pre-norm, mean pooling.
//
// Methods (classifier trainable in every PEFT case, as modules_to_save):
//   0 full     every parameter trainable
//   1 lora     LoRA r = 8, alpha = 16 on q_proj, v_proj
//   2 adapter  Houlsby adapters (after attention and FFN), bottleneck 16 (reduction factor 16)
//   3 ia3      (IA)³ on k_proj, v_proj, fc2
//   4 prefix   prefix tuning, 16 virtual tokens per layer (flat table)
//   5 prompt   prompt tuning, 16 virtual tokens
//
// One iteration = one training step: zero_grad + forward + backward (dlogits fixed) + AdamW.
// Counters: trainable parameters, trainable share (%), sequences/s, and bench_support.hpp's step
// counters (GF/s and % of the core's FMA peak from step_flops(), cpu/wall, allocations and page
// faults per steady step, the first step's time against a steady one). BM_FmaPeak: the peak itself.
// Ratios against PyTorch: benchmarks/run_transformer_peer.sh.
#include <benchmark/benchmark.h>

#include <memory>

#include <peft/models/peft_config.hpp>
#include <peft/optim/adam.hpp>

#include "bench_support.hpp"

namespace {

using T = float;
using peft::Index;
using peft::Matrix;

constexpr Index kBatch = 32, kSeq = 64, kPatch = 16;
const char* const kMethods[] = {"full", "lora", "adapter", "ia3", "prefix", "prompt"};

peft::TransformerConfig bench_config() {
  peft::TransformerConfig c;
  c.input_dim = kPatch;
  c.max_seq_len = kSeq;
  c.dim = 256;
  c.num_heads = 4;
  c.ffn_dim = 1024;
  c.num_layers = 4;
  c.num_classes = 10;
  c.norm = peft::NormPlacement::Pre;
  c.pooling = peft::Pooling::Mean;
  c.activation = peft::Activation::GELU;
  return c;
}

peft::PeftConfig method_config(int method) {
  peft::PeftConfig pc;
  pc.modules_to_save = {"classifier"};
  switch (method) {
    case 1: {
      peft::LoraTargetConfig lc;
      lc.target_modules = {"q_proj", "v_proj"};
      lc.lora.r = 8;
      lc.lora.alpha = 16;
      pc.lora = lc;
      break;
    }
    case 2: {
      peft::AdapterTargetConfig ac;
      ac.placement = peft::AdapterPlacement::Houlsby;
      ac.options.reduction_factor = 16;
      pc.adapter = ac;
      break;
    }
    case 3: pc.ia3.emplace(); break;
    case 4: pc.prefix = peft::PrefixTargetConfig{16, false, 0}; break;
    case 5: pc.prompt = peft::PromptTargetConfig{16, peft::PromptInit::Random, 1.0, {}}; break;
    default: break;
  }
  return pc;
}

/// FLOPs of one training step: 2·m·n·k summed over every matrix product the step computes
/// (forward and backward, attention included; element-wise work, norms, softmax, pooling and the
/// optimizer excluded), from the model's shapes and what each method trains. It follows the
/// implementation's own skips: a frozen weight gets no dW product, and the lowest block's q/k/v
/// input-gradient products are skipped when nothing below the blocks trains (every PEFT method but
/// prompt tuning); the attention backward always computes dV, dA, dQ and dK.
double step_flops(const peft::TransformerConfig& c, int method) {
  const double B = kBatch, p = c.input_dim, d = c.dim, F = c.ffn_dim, C = c.num_classes;
  const double prompt = method == 5 ? 16 : 0, prefix = method == 4 ? 16 : 0;
  const double S = kSeq + prompt;  // rows per sequence inside the blocks
  const double K = S + prefix;     // keys per query
  const double N = B * S;          // rows inside the blocks
  const bool full = method == 0;
  const bool need_below = full || method == 5;  // patch_embed trains, or the soft prompt does
  // a linear [in → out] on `rows` rows: forward, dX when needed, dW when trainable
  auto lin = [](double rows, double in, double out, bool dx, bool dw) {
    return 2 * rows * in * out * (1.0 + (dx ? 1 : 0) + (dw ? 1 : 0));
  };
  double f = lin(B * kSeq, p, d, false, full);  // patch_embed (never a dX: the input)
  for (Index i = 0; i < c.num_layers; ++i) {
    const bool qkv_dx = i > 0 || need_below;
    f += 3 * lin(N, d, d, qkv_dx, full) + lin(N, d, d, true, full);  // q, k, v, out_proj
    f += lin(N, d, F, true, full) + lin(N, F, d, true, full);        // fc1, fc2
    f += 3 * 4 * B * S * K * d;  // attention: Q Kᵀ and A V forward (2 · 2·S·K·d per sequence), 4 backward
    if (method == 1) {           // LoRA r = 8 on q and v: x Aᵀ, (x Aᵀ) Bᵀ; dB, G = dY B, dA, dX += G A
      const double r = 8;
      f += 2 * (2 * N * d * r * 2 + 2 * N * d * r * (qkv_dx ? 4 : 3));
    }
    if (method == 2) {  // Houlsby: two adapters d → d/16 → d, both trainable, dX always
      const double b = d / 16;
      f += 2 * (lin(N, d, b, true, true) + lin(N, b, d, true, true));
    }
  }
  f += lin(B, d, C, true, true);  // classifier (trainable in every method; dX feeds the pooling)
  return f;
}

/// A model, its input and its training state, kept for the whole process: Google Benchmark calls
/// the benchmark function several times (iteration estimate, warm-up, repetitions); each call
/// must time the same, already warm model, and the first step is taken (and measured) only once.
struct Rig {
  peft::TransformerClassifier<T> model;
  Matrix<T> x, dlogits, logits;
  peft::SequenceLayout layout{kBatch, kSeq};
  peft::TransformerClassifier<T>::Cache cache;
  std::unique_ptr<peft::AdamW<T>> opt;
  peft::bench::StepCounters counters;

  explicit Rig(int method) {
    peft::Rng rng(7);
    model = peft::TransformerClassifier<T>(bench_config(), rng);
    if (method != 0) peft::apply_peft(model, method_config(method), rng);
    // Move LoRA B / adapter up-projections off zero so every path does real work.
    model.visit_parameters([&](const std::string& name, peft::Parameter<T>& p) {
      if (name.find("lora_B") != std::string::npos || name.find("adapter_up.weight") != std::string::npos)
        peft::init::normal<T>(p.value, rng, 0.0, 0.02);
    });
    x = Matrix<T>::Random(kBatch * kSeq, kPatch);
    dlogits = Matrix<T>::Random(kBatch, 10);
    opt = std::make_unique<peft::AdamW<T>>(model, peft::AdamWOptions{});
    counters.flops = step_flops(bench_config(), method);
    const peft::bench::Meter first;  // the very first step: nothing allocated or touched before
    step();
    counters.first_s = first.wall();
    counters.first_cpu_s = first.cpu();
    counters.first_allocs = first.allocations();
    counters.first_faults = first.faults();
  }

  /// One training step: zero_grad, forward, backward (dlogits fixed), AdamW.
  void step() {
    opt->zero_grad();
    model.forward(x, layout, logits, cache);
    model.backward(cache, dlogits);
    opt->step();
  }
};

Rig& rig(int method) {
  static std::unique_ptr<Rig> rigs[6];
  if (!rigs[method]) rigs[method] = std::make_unique<Rig>(method);
  return *rigs[method];
}

void BM_TransformerStep(benchmark::State& state) {
  const int method = static_cast<int>(state.range(0));
  Rig& r = rig(method);
  peft::bench::StepCounts counts;
  const peft::bench::Meter loop;
  for (auto _ : state) {
    const long a0 = peft::count_malloc::allocations(), f0 = peft::count_malloc::minor_faults();
    r.step();
    counts.allocations += peft::count_malloc::allocations() - a0;
    counts.faults += peft::count_malloc::minor_faults() - f0;
    benchmark::DoNotOptimize(r.logits.data());
    benchmark::ClobberMemory();
  }
  peft::bench::report(state, r.counters, loop, &counts);
  const peft::ParameterCount pc = peft::count_parameters(r.model);
  state.SetLabel(kMethods[method]);
  state.counters["trainable"] = static_cast<double>(pc.trainable);
  state.counters["trainable_%"] = pc.trainable_percent();
  state.counters["seq/s"] =
      benchmark::Counter(static_cast<double>(kBatch), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

// Times are wall clock (UseRealTime); CPU time is the whole process's (every thread), so
// cpu/wall ≈ the threads actually busy. Run with --benchmark_min_warmup_time (the peer harness
// does): the warm-up steps then precede the timed ones, and first_ms reports the cold step.
BENCHMARK(BM_TransformerStep)
    ->DenseRange(0, 5)
    ->ArgNames({"method"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MeasureProcessCPUTime();
BENCHMARK(peft::bench::BM_FmaPeak)->Unit(benchmark::kMillisecond);

BENCHMARK_MAIN();
