// Hot paths allocate nothing after the first call: repeated forward + backward of Linear and
// LoRALinear (with and without dropout, one and two adapters, frozen base) with reused caches and
// outputs, plain LoRA and DoRA, the mixed-adapter batch, and the sequence blocks (attention,
// feed-forward, layer norm, dropout, embeddings, prefix), every heap allocation counted.
//
// The count: support/no_malloc.hpp (included first): malloc interposed (every allocation, std::string
// and std::vector included) in release/debug builds, Eigen's EIGEN_RUNTIME_NO_MALLOC guard (Eigen's
// allocator only) under the sanitizers. A positive control proves the count is live in this build.
//
// Note: a GEMM whose packing blocks exceed EIGEN_STACK_ALLOCATION_LIMIT (128 KiB) allocates its
// workspace on the heap on every call (Eigen's design); the sizes here stay below that, as the
// guarantee we test is about our code, not Eigen's large-GEMM workspace.
#include "support/no_malloc.hpp"

#include <peft/layers/attention.hpp>
#include <peft/layers/dropout.hpp>
#include <peft/layers/embedding.hpp>
#include <peft/layers/feed_forward.hpp>
#include <peft/layers/layer_norm.hpp>
#include <peft/layers/linear.hpp>
#include <peft/layers/lora_linear.hpp>
#include <peft/layers/lora_mixed_batch.hpp>
#include <peft/layers/prefix_attention.hpp>

#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

namespace {

using peft::test::no_malloc::allocations_after_warmup;

LoraConfig cfg(int r, double alpha, double dropout, bool dora = false) {
  LoraConfig c;
  c.use_dora = dora;
  c.r = r;
  c.alpha = alpha;
  c.dropout = dropout;
  c.init = LoraInit::None;
  return c;
}

}  // namespace

TEST_CASE("the no-malloc guard is live in this build", "[no_malloc]") {
  const long n = allocations_after_warmup([] {
    Matrix<float> m(7, 9);  // a fresh heap allocation every call
    m.setZero();
  });
  REQUIRE(n >= 3);
  // The layers' own code must be instrumented too: a forward into fresh buffers allocates. If this
  // fails while the check above passes, the linker took LoRALinear's code from another translation
  // unit compiled without EIGEN_RUNTIME_NO_MALLOC (guard mode, sanitizer builds: one definition per template
  // instantiation): this file must then be built as its own test executable.
  Rng rng(0);
  LoRALinear<float> layer(6, 4, rng);
  layer.add_adapter("a", cfg(2, 2.0, 0.0));
  const Matrix<float> x = Matrix<float>::Ones(3, 6);
  const long m = allocations_after_warmup([&] {
    typename LoRALinear<float>::Cache fresh;
    Matrix<float> y;
    layer.forward(x, y, fresh);
  });
  INFO("test_no_malloc.cpp must be linked into its own executable (see the comment above)");
  REQUIRE(m >= 3);
}

TEMPLATE_TEST_CASE("Linear forward/backward allocate nothing after warm-up", "[no_malloc]", float) {
  Rng rng(1);
  Linear<TestType> layer(24, 16, rng, true, "fc");
  const Matrix<TestType> x = test::random_matrix<TestType>(8, 24, rng);
  const Matrix<TestType> g = test::random_matrix<TestType>(8, 16, rng);
  typename Linear<TestType>::Cache cache;
  Matrix<TestType> y, dx;
  auto step = [&] {
    layer.forward(x, y, cache);
    layer.backward(cache, g, &dx);
  };
  CHECK(allocations_after_warmup(step) == 0);
  layer.weight.set_trainable(false);
  CHECK(allocations_after_warmup(step) == 0);
  CHECK(allocations_after_warmup([&] {
          layer.forward(x, y, cache);
          layer.backward(cache, g, nullptr);
        }) == 0);
}

TEMPLATE_TEST_CASE("LoRALinear forward/backward allocate nothing after warm-up", "[no_malloc]", float) {
  Rng rng(2);
  const Matrix<TestType> x = test::random_matrix<TestType>(8, 24, rng);
  const Matrix<TestType> g = test::random_matrix<TestType>(8, 16, rng);
  const double dropout = GENERATE(0.0, 0.25);
  const bool frozen_base = GENERATE(false, true);
  const int n_adapters = GENERATE(1, 2);
  const bool dora = GENERATE(false, true);
  INFO("dropout " << dropout << ", frozen base " << frozen_base << ", adapters " << n_adapters << ", DoRA " << dora);

  LoRALinear<TestType> layer(24, 16, rng, true, "q");
  layer.add_adapter("a", cfg(4, 8.0, dropout, dora));
  if (n_adapters == 2) {
    layer.add_adapter("b", cfg(2, 3.0, dropout, dora));
    layer.set_active({"a", "b"});
  }
  if (frozen_base) layer.freeze_base();
  layer.train();
  typename LoRALinear<TestType>::Cache cache, cache2;
  Matrix<TestType> y, y2, dx, dx2;
  CHECK(allocations_after_warmup([&] {
          layer.forward(x, y, cache);
          layer.backward(cache, g, &dx);
        }) == 0);
  // Two caches in flight (reward-model pattern), and backward without dx.
  CHECK(allocations_after_warmup([&] {
          layer.forward(x, y, cache);
          layer.forward(x, y2, cache2);
          layer.backward(cache2, g, &dx2);
          layer.backward(cache, g, nullptr);
        }) == 0);
  // Inference: nothing kept, nothing allocated.
  CHECK(allocations_after_warmup([&] { layer.forward_inference(x, y); }) == 0);
  // eval mode (no dropout), same buffers.
  layer.eval();
  CHECK(allocations_after_warmup([&] {
          layer.forward(x, y, cache);
          layer.backward(cache, g, &dx);
        }) == 0);
}

TEST_CASE("Sequence blocks allocate nothing after the first forward/backward", "[attention][no_malloc]") {
  // Positive control: the guard sees an allocation in this build.
  CHECK(allocations_after_warmup([] {
          Matrix<float> m(7, 9);
          m.setZero();
        }) > 0);

  Rng rng(40);
  const Index d = 8, S = 5;
  const SequenceLayout layout(2, S, {5, 3});
  MultiHeadAttention<float> attn(d, 2, rng, AttentionOptions{true, true}, "attn");
  LoraConfig lora;
  lora.r = 2;
  lora.alpha = 3.0;
  lora.init = LoraInit::None;
  attn.q_proj.add_adapter("default", lora, rng);
  attn.add_ia3();
  FeedForward<float> ffn(d, 16, Activation::GELU, rng, true, "ffn");
  ffn.add_ia3();
  LayerNorm<float> ln(d, 1e-5, true, "ln");
  Dropout<float> drop(0.1, 3, "drop");
  Embedding<float> emb(20, d, rng, "emb");
  PositionalEmbedding<float> pos(S, d, rng, "pos");
  PrefixAttention<float> prefix(PrefixConfig{3, d, 1, true, 6}, rng, "prefix");
  const std::vector<Index> ids = {1, 2, 3, 4, 5, 6, 7, 8, 0, 0};
  const Matrix<float> g = test::random_matrix<float>(2 * S, d, rng);

  typename MultiHeadAttention<float>::Cache ca;
  typename FeedForward<float>::Cache cf;
  typename LayerNorm<float>::Cache cl;
  typename Dropout<float>::Cache cd;
  typename Embedding<float>::Cache ce;
  typename PositionalEmbedding<float>::Cache cp;
  typename PrefixAttention<float>::Cache cpre;
  Matrix<float> x, h1, h2, h3, y, dy, dx1, dx2, dx3;
  const long n = allocations_after_warmup([&] {
    emb.forward(ids, x, ce);
    pos.forward_inplace(x, layout, cp);
    ln.forward(x, h1, cl);
    prefix.forward(cpre);
    const PrefixKV<float> kv = prefix.layer(cpre, 0);
    attn.forward(h1, layout, h2, ca, &kv);
    drop.forward(h2, h3, cd);
    ffn.forward(h3, y, cf);
    ffn.backward(cf, g, &dx1);
    drop.backward(cd, dx1, &dx2);
    PrefixGrad<float> pg = prefix.layer_grad(cpre, 0);
    attn.backward(ca, dx2, &dx3, &pg);
    prefix.backward(cpre);
    ln.backward(cl, dx3, &dx1);
    pos.backward(cp, dx1);
    emb.backward(ce, dx1);
  });
  CHECK(n == 0);
}

TEST_CASE("mixed-adapter batch allocates nothing after warm-up", "[no_malloc][mixed]") {
  Rng rng(42);
  LoRALinear<float> layer(10, 7, rng, true, "layers.3.o");
  layer.add_adapter("a", cfg(2, 4.0, 0.0));
  layer.add_adapter("b", cfg(3, 6.0, 0.0));
  layer.add_adapter("c", cfg(1, 0.5, 0.0));
  const Matrix<float> x = test::random_matrix<float>(16, 10, rng);
  std::vector<std::string> names;
  for (int r = 0; r < 16; ++r) names.push_back(r % 4 == 3 ? "none" : std::string(1, static_cast<char>('a' + r % 4)));
  MixedBatchWorkspace<float> ws;
  Matrix<float> y;
  CHECK(allocations_after_warmup([&] { forward_mixed(layer, x, names, y, ws); }) == 0);
}
