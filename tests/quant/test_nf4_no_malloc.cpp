// The adapted-linear host on an NF4 base allocates nothing after the first call with a given shape:
// forward decodes into a reused tile, backward reuses its scratch and the cache; methods that read
// W₀ (DoRA, (IA)³ on inputs) reuse one dense decode buffer. Every row of the conformance table runs
// on an NF4 base: forward + backward, forward_inference and the mixed-adapter batch, in eval and
// train mode.
//
// The guard and its counter: support/no_malloc.hpp (included first); a positive control proves the
// guard is live. Sizes stay small so Eigen's GEMM blocking lives on the stack (above
// EIGEN_STACK_ALLOCATION_LIMIT Eigen itself heap-allocates its GEMM workspace).
#include "support/no_malloc.hpp"

#include <peft/quant/nf4_lora_linear.hpp>

#include "layers/conformance_cases.hpp"
#include "support/test_utils.hpp"

using namespace peft;

using peft::test::no_malloc::count_allocations;

TEST_CASE("The allocation guard is live in this build", "[quant][alloc]") {
  Matrix<float> m;
  CHECK(count_allocations([&] { m.resize(64, 64); }) > 0);
}

TEST_CASE("NF4LoRALinear forward/backward do not allocate after the first call", "[quant][nf4_lora][alloc]") {
  Rng rng(61);
  const Linear<float> base(24, 20, rng, true);
  NF4LoRALinear<float> layer = quantize_linear(base);
  layer.set_tile_rows(8);
  LoraConfig c;
  c.r = 4;
  c.alpha = 8.0;
  c.dropout = 0.1;
  layer.add_adapter("default", c, rng);
  LoraConfig c2 = c;
  c2.dropout = 0.0;
  layer.add_adapter("plain", c2, rng);
  layer.set_active(std::vector<std::string>{"default", "plain"});
  layer.train();
  const Matrix<float> x = test::random_matrix<float>(6, 24, rng);
  const Matrix<float> dy = test::random_matrix<float>(6, 20, rng);
  Matrix<float> y, dx;
  typename NF4LoRALinear<float>::Cache cache;
  layer.forward(x, y, cache);  // the first call sizes every buffer
  layer.backward(cache, dy, &dx);
  CHECK(count_allocations([&] {
          for (int i = 0; i < 3; ++i) {
            layer.forward(x, y, cache);
            layer.backward(cache, dy, &dx);
          }
        }) == 0);
  CHECK(y.allFinite());
  CHECK(dx.allFinite());
}

namespace nf4_no_malloc {

template <class T>
void check_nf4_case(const conformance::Case& c) {
  Rng rng(9);
  const Linear<T> base(conformance::kIn, conformance::kOut, rng, true);
  AdaptedLinear<T> layer = quantize_linear(base, quant::NF4Options{}, "layers.0.q");
  layer.set_tile_rows(3);
  layer.add_adapter("lora2", conformance::second_lora(), rng);
  conformance::perturb(layer, "lora2", rng);
  c.add(layer, "case", rng);
  conformance::perturb(layer, "case", rng);
  const Matrix<T> x = test::random_matrix<T>(conformance::kRows, conformance::kIn, rng);
  const Matrix<T> g = test::random_matrix<T>(conformance::kRows, conformance::kOut, rng);
  typename AdaptedLinear<T>::Cache cache;
  Matrix<T> y, dx;
  const std::vector<int> routing = {0, 1, -1, 1, 0};
  RoutedWorkspace<T> ws;
  for (const bool train : {false, true}) {
    INFO((train ? "train mode" : "eval mode"));
    layer.train(train);
    for (const bool both : {false, true}) {
      INFO((both ? "case + LoRA active" : "case active"));
      if (both)
        layer.set_active({"case", "lora2"});
      else
        layer.set_active("case");
      CHECK(test::no_malloc::allocations_after_warmup(
                [&] {
                  layer.forward(x, y, cache);
                  layer.backward(cache, g, &dx);
                },
                6, 4) == 0);
      CHECK(test::no_malloc::allocations_after_warmup([&] { layer.forward_inference(x, y); }, 6, 4) == 0);
      CHECK(test::no_malloc::allocations_after_warmup([&] { layer.forward_routed(x, routing, y, ws); }, 2, 3) == 0);
    }
  }
}

}  // namespace nf4_no_malloc

TEST_CASE("Every method on an NF4 base: no allocation after warm-up", "[quant][nf4_lora][alloc][conformance]") {
  for (const conformance::Case& c : conformance::cases()) {
    INFO("case " << c.name);
    nf4_no_malloc::check_nf4_case<float>(c);
  }
}
