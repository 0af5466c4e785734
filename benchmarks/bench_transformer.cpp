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
// One iteration = zero_grad + forward + backward (dlogits fixed). Counters: trainable parameters,
// trainable share (%), sequences/s. Ratios against PyTorch: benchmarks/run_transformer_peer.sh.
#include <benchmark/benchmark.h>

#include <peft/models/peft_config.hpp>

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

void BM_TransformerStep(benchmark::State& state) {
  const int method = static_cast<int>(state.range(0));
  peft::Rng rng(7);
  peft::TransformerClassifier<T> model(bench_config(), rng);
  if (method != 0) peft::apply_peft(model, method_config(method), rng);
  // Move LoRA B / adapter up-projections off zero so every path does real work.
  model.visit_parameters([&](const std::string& name, peft::Parameter<T>& p) {
    if (name.find("lora_B") != std::string::npos || name.find("adapter_up.weight") != std::string::npos)
      peft::init::normal<T>(p.value, rng, 0.0, 0.02);
  });
  const Matrix<T> x = Matrix<T>::Random(kBatch * kSeq, kPatch);
  const Matrix<T> dlogits = Matrix<T>::Random(kBatch, 10);
  const peft::SequenceLayout layout(kBatch, kSeq);
  peft::TransformerClassifier<T>::Cache cache;
  Matrix<T> logits;
  const std::vector<peft::NamedParameter<T>> trainable = peft::trainable_parameters(model);  // listed once
  for (auto _ : state) {
    for (const auto& np : trainable) np.param->zero_grad();
    model.forward(x, layout, logits, cache);
    model.backward(cache, dlogits);
    benchmark::DoNotOptimize(logits.data());
    benchmark::ClobberMemory();
  }
  const peft::ParameterCount pc = peft::count_parameters(model);
  state.SetLabel(kMethods[method]);
  state.counters["trainable"] = static_cast<double>(pc.trainable);
  state.counters["trainable_%"] = pc.trainable_percent();
  state.counters["seq/s"] =
      benchmark::Counter(static_cast<double>(kBatch), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK(BM_TransformerStep)->DenseRange(0, 5)->ArgNames({"method"})->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
