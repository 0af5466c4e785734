// LoRA training and greedy generation throughput of the Llama causal LM (models/llama.hpp) on a
// SmolLM-shaped config of 12.6 M parameters: vocabulary 8192, hidden 384, 6 layers, 6 query heads
// over 2 key/value heads (head_dim 64), SwiGLU 1024, tied embeddings, rope theta 10000.
//
//   BM_LlamaLoraStep      one training step: zero_grad + forward + causal-LM loss + backward +
//                         AdamW step, LoRA r 8, alpha 16 on every linear but lm_head (all-linear),
//                         batch 4 × seq 128 random tokens. Counter tokens/s.
//   BM_LlamaGenerate      greedy generation with the KV cache (models/generation.hpp), the LoRA
//                         adapter active (unmerged, B ≠ 0), batch 1: a 16-token prompt, then 64 new
//                         tokens (no stop token). Counter new tokens/s (prefill included).
//
// Process CPU time is measured (MeasureProcessCPUTime), so cpu_time / real_time is the number of
// busy cores. benchmarks/run_llama_peer.sh runs this interleaved with transformers + peft
// (benchmarks/peer/llama_peer.py: the same config, shapes, batch, LoRA and steps).
#include <benchmark/benchmark.h>

#include <peft/loss/causal_lm.hpp>
#include <peft/models/generation.hpp>
#include <peft/models/llama.hpp>
#include <peft/optim/adam.hpp>

#include "llama_bench_utils.hpp"

namespace {

using T = float;
using peft::Index;
using peft::LlamaForCausalLM;
using peft::Matrix;

constexpr Index kBatch = 4, kSeq = 128, kPrompt = 16, kNewTokens = 64;

peft::LlamaConfig bench_llama_config() {
  peft::LlamaConfig c;
  c.vocab_size = 8192;
  c.hidden_size = 384;
  c.intermediate_size = 1024;
  c.num_hidden_layers = 6;
  c.num_attention_heads = 6;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  c.rope.theta = 10000.0;
  c.tie_word_embeddings = true;
  return c;
}

/// The model frozen, with a LoRA "default" (r 8, alpha 16) on every linear of every layer (PEFT's
/// all-linear: all but lm_head) whose B is off zero.
void add_lora(LlamaForCausalLM<T>& model, peft::Rng& rng) {
  peft::bench::add_all_linear_lora(model, rng, 8, 16.0);
  model.visit_parameters([&](const std::string& name, peft::Parameter<T>& p) {
    if (name.find("lora_B") != std::string::npos) peft::init::normal<T>(p.value, rng, 0.0, 0.02);
  });
}

std::vector<Index> random_ids(Index n, Index vocab, peft::Rng& rng) {
  std::vector<Index> ids(static_cast<std::size_t>(n));
  for (Index& id : ids) id = static_cast<Index>(rng.uniform_int(static_cast<std::uint64_t>(vocab)));
  return ids;
}

void BM_LlamaLoraStep(benchmark::State& state) {
  peft::Rng rng(7);
  LlamaForCausalLM<T> model(bench_llama_config(), rng);
  add_lora(model, rng);
  model.train();
  peft::AdamW<T> opt(model, peft::AdamWOptions{1e-4, 0.9, 0.999, 1e-8, 0.0});
  const std::vector<Index> ids = random_ids(kBatch * kSeq, model.config().vocab_size, rng);
  const std::vector<std::int64_t> labels(ids.begin(), ids.end());
  const peft::SequenceLayout layout(kBatch, kSeq);
  typename LlamaForCausalLM<T>::Cache cache;
  Matrix<T> logits, dlogits;
  double loss = 0.0;
  for (auto _ : state) {
    opt.zero_grad();
    model.forward(ids, layout, logits, cache);
    loss = peft::causal_lm_loss<T>(logits, labels, layout, &dlogits);
    model.backward(cache, dlogits);
    opt.step();
    benchmark::DoNotOptimize(loss);
    benchmark::ClobberMemory();
  }
  const peft::ParameterCount pc = peft::count_parameters(model);
  state.counters["params"] = static_cast<double>(pc.total);
  state.counters["trainable_%"] = pc.trainable_percent();
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(kBatch * kSeq), benchmark::Counter::kIsIterationInvariantRate);
}

void BM_LlamaGenerate(benchmark::State& state) {
  peft::Rng rng(7);
  LlamaForCausalLM<T> model(bench_llama_config(), rng);
  add_lora(model, rng);
  model.eval();
  const std::vector<Index> prompt = random_ids(kPrompt, model.config().vocab_size, rng);
  peft::GenerationConfig gc;
  gc.max_new_tokens = kNewTokens;  // greedy, no stop token: always kNewTokens
  peft::Rng unused(0);
  std::vector<Index> out;
  for (auto _ : state) {
    out = peft::generate(model, prompt, gc, unused);
    benchmark::DoNotOptimize(out.data());
  }
  if (static_cast<Index>(out.size()) != kPrompt + kNewTokens)
    state.SkipWithError("generate returned a different number of tokens");
  state.counters["new_tokens/s"] =
      benchmark::Counter(static_cast<double>(kNewTokens), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK(BM_LlamaLoraStep)->Unit(benchmark::kMillisecond)->UseRealTime()->MeasureProcessCPUTime();
BENCHMARK(BM_LlamaGenerate)->Unit(benchmark::kMillisecond)->UseRealTime()->MeasureProcessCPUTime();

BENCHMARK_MAIN();
