// NF4LoRALinear's hot path allocates nothing after the first call with a given shape: forward
// decodes into a reused tile, backward reuses its scratch and the cache.
//
// The guard and its counter: support/no_malloc.hpp (included first); a positive control proves the
// guard is live. Sizes stay small so Eigen's GEMM blocking lives on the stack (above
// EIGEN_STACK_ALLOCATION_LIMIT Eigen itself heap-allocates its GEMM workspace).
#include "support/no_malloc.hpp"

#include <peft/quant/nf4_lora_linear.hpp>

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
  NF4LoRALinear<float> layer = NF4LoRALinear<float>::from_linear(base);
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
