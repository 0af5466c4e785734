// A TransformerClassifier training step (zero_grad, forward, backward, AdamW) in its steady state
// allocates nothing and touches no fresh page, with LoRA and with full fine-tuning. Counted by
// interposing malloc and operator new for the whole process (support/count_malloc.hpp: glibc has
// no malloc hooks any more), so unlike EIGEN_RUNTIME_NO_MALLOC it also sees std::vector / string
// allocations and Eigen's GEMM packing blocks; page faults from getrusage. Left out of sanitizer
// builds (tests/CMakeLists.txt), where ASan owns malloc.
//
// The shapes are large enough that Eigen's GEMM blocking space exceeds its stack limit (128 KiB)
// and so would come from the heap on every product.
#include "support/count_malloc.hpp"

#include <peft/models/peft_config.hpp>
#include <peft/models/transformer.hpp>
#include <peft/optim/adam.hpp>

#include "support/test_utils.hpp"

namespace {

using peft::Index;
using peft::Matrix;

struct SteadyCounts {
  long first_allocs = 0, allocs = 0, faults = 0;
};

/// Runs `warmup` steps, then `steps` more, counting allocations and minor faults in the latter.
enum class Method { Full, Lora, IA3 };

SteadyCounts steady_state_counts(Method method, int warmup, int steps) {
  peft::TransformerConfig c;
  c.input_dim = 16;
  c.max_seq_len = 32;
  c.dim = 128;
  c.num_heads = 4;
  c.ffn_dim = 512;
  c.num_layers = 2;
  c.num_classes = 5;
  peft::Rng rng(3);
  peft::TransformerClassifier<float> model(c, rng);
  if (method == Method::IA3) {  // k_proj, v_proj (output scaling) and fc2 (input scaling: its own products)
    peft::PeftConfig pc;
    pc.ia3.emplace();
    peft::apply_peft(model, pc, rng);
  }
  if (method == Method::Lora) {
    peft::PeftConfig pc;
    peft::LoraTargetConfig lc;
    lc.target_modules = {"q_proj", "v_proj"};
    lc.lora.r = 4;
    lc.lora.alpha = 8;
    pc.lora = lc;
    pc.modules_to_save = {"classifier"};
    peft::apply_peft(model, pc, rng);
  }
  peft::AdamW<float> opt(model, peft::AdamWOptions{});
  const peft::SequenceLayout layout(4, 32, {32, 20, 32, 9});  // padded rows too
  const Matrix<float> x = Matrix<float>::Random(4 * 32, 16);
  const Matrix<float> dlogits = Matrix<float>::Random(4, 5);
  peft::TransformerClassifier<float>::Cache cache;
  Matrix<float> logits;
  auto step = [&] {
    opt.zero_grad();
    model.forward(x, layout, logits, cache);
    model.backward(cache, dlogits);
    opt.step();
  };
  SteadyCounts out;
  const long a0 = peft::count_malloc::allocations();
  step();
  out.first_allocs = peft::count_malloc::allocations() - a0;
  for (int i = 1; i < warmup; ++i) step();
  const long a1 = peft::count_malloc::allocations(), f1 = peft::count_malloc::minor_faults();
  for (int i = 0; i < steps; ++i) step();
  out.allocs = peft::count_malloc::allocations() - a1;
  out.faults = peft::count_malloc::minor_faults() - f1;
  REQUIRE(logits.allFinite());
  return out;
}

}  // namespace

TEST_CASE("Transformer training step: steady state allocates nothing and faults no page",
          "[transformer][steady_state]") {
  if (!peft::count_malloc::available()) {
    WARN("malloc counting needs glibc without a sanitizer: not checked");
    return;
  }
  // (IA)³'s fc2 products once went through Eigen's own GEMM, which takes its blocking space from
  // the heap on every call above 128 KiB: 6 allocations per step at these shapes.
  for (const Method method : {Method::Lora, Method::Full, Method::IA3}) {
    INFO((method == Method::Lora  ? "LoRA on q_proj, v_proj"
          : method == Method::IA3 ? "(IA)3 on k_proj, v_proj, fc2"
                                  : "full fine-tuning")
         << ", AdamW step included");
    const SteadyCounts n = steady_state_counts(method, 2, 3);
    CHECK(n.first_allocs > 0);  // positive control: the interposer sees the model's allocations
    CHECK(n.allocs == 0);
    CHECK(n.faults <= 2);  // ~0: a stray page (Catch2, the kernel) is not a per-step buffer
  }
}
