// Memory of LoRA training on a SmolLM-135M-shaped Llama (hidden 576, intermediate 1536, 30 layers,
// 9 query heads over 3 key/value heads, vocabulary 49152, tied embeddings: 134.5 M parameters),
// LoRA r 8 on every linear of every layer, AdamW, batch 4 × 128 random tokens, float. No download.
//
//   llama_train_memory [steps]
//
// Prints the heap in use (glibc mallinfo2: what the process holds, freed memory excluded) after the
// model, adapters and optimizer are set up and after the training steps (the forward caches and the
// thread's scratch stay allocated between steps), the bytes of the thread's scratch
// (peft::scratch_bytes), the process's peak RSS and the time of each step. Run with
// OMP_NUM_THREADS=1 for the single-thread figure.
#include <sys/resource.h>
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 33))
#include <malloc.h>
#define PEFT_HAVE_MALLINFO2 1
#endif

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <peft/core/scratch.hpp>
#include <peft/loss/causal_lm.hpp>
#include <peft/models/llama.hpp>
#include <peft/optim/adam.hpp>

#include "llama_bench_utils.hpp"

namespace {

using T = float;
using peft::Index;
using peft::Matrix;

/// Heap in use (MB), or -1 where glibc's mallinfo2 is not available.
double heap_mb() {
#ifdef PEFT_HAVE_MALLINFO2
  const struct mallinfo2 m = mallinfo2();
  return static_cast<double>(m.uordblks + m.hblkhd) / (1024.0 * 1024.0);
#else
  return -1.0;
#endif
}

double peak_rss_mb() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<double>(u.ru_maxrss) / 1024.0;
}

}  // namespace

int main(int argc, char** argv) {
  const int steps = argc > 1 ? std::atoi(argv[1]) : 3;
  if (steps < 1) {
    std::fprintf(stderr, "usage: llama_train_memory [steps >= 1]\n");
    return 2;
  }
  peft::LlamaConfig c;
  c.vocab_size = 49152;
  c.hidden_size = 576;
  c.intermediate_size = 1536;
  c.num_hidden_layers = 30;
  c.num_attention_heads = 9;
  c.num_key_value_heads = 3;
  c.max_position_embeddings = 512;
  c.rms_norm_eps = 1e-5;
  c.rope.theta = 10000.0;
  c.tie_word_embeddings = true;
  peft::Rng rng(7);
  peft::LlamaForCausalLM<T> model(c, rng);
  peft::bench::add_all_linear_lora(model, rng, 8, 16.0);
  model.train();
  peft::AdamW<T> opt(model, peft::AdamWOptions{1e-4, 0.9, 0.999, 1e-8, 0.0});

  const Index batch = 4, seq = 128;
  std::vector<Index> ids(static_cast<std::size_t>(batch * seq));
  for (Index& id : ids) id = static_cast<Index>(rng.uniform_int(static_cast<std::uint64_t>(c.vocab_size)));
  const std::vector<std::int64_t> labels(ids.begin(), ids.end());
  const peft::SequenceLayout layout(batch, seq);
  typename peft::LlamaForCausalLM<T>::Cache cache;
  Matrix<T> logits, dlogits;
  const double setup = heap_mb();
  std::printf("llama_train_memory: 30 layers, d 576, LoRA r 8 all-linear, batch %ld x %ld, float\n",
              static_cast<long>(batch), static_cast<long>(seq));
  std::printf("heap after setup (model, adapters, AdamW)   %8.1f MB\n", setup);
  for (int k = 0; k < steps; ++k) {
    const auto t0 = std::chrono::steady_clock::now();
    opt.zero_grad();
    model.forward(ids, layout, logits, cache);
    const double loss = peft::causal_lm_loss<T>(logits, labels, layout, &dlogits);
    model.backward(cache, dlogits);
    opt.step();
    const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::printf("step %d: %8.1f ms, loss %.4f\n", k + 1, ms, loss);
  }
  const double after = heap_mb();
  std::printf("heap after the steps                        %8.1f MB (+%.1f MB: caches, scratch, logits)\n", after,
              after - setup);
  std::printf("thread scratch (peft::scratch_bytes)        %8.1f MB\n",
              static_cast<double>(peft::scratch_bytes<T>()) / (1024.0 * 1024.0));
  std::printf("process peak RSS                            %8.1f MB\n", peak_rss_mb());
  return 0;
}
