// Every row of the conformance table (conformance_cases.hpp) allocates nothing after warm-up:
// forward + backward (frozen and trainable base, with and without dx), forward_inference and the
// mixed-adapter batch, in eval mode and in train mode (dropout masks, rank / module dropout), every
// heap allocation counted (support/no_malloc.hpp: malloc interposed, or Eigen's guard under the
// sanitizers); a positive control proves the count is live for the layer's own code.
//
// Warm-up: a few calls, not one, since module dropout may skip the term on a call (its buffers are
// then sized by a later one). Each mode is warmed up on its own: switching eval ↔ train resizes the
// dropout buffers once, by design ("no allocation after the first call with a given shape").
//
#include "support/no_malloc.hpp"

#include <peft/layers/lora_mixed_batch.hpp>

#include <string>
#include <vector>

#include "layers/conformance_cases.hpp"

namespace conformance_no_malloc {

using namespace conformance;

/// Module dropout may skip the term on a call: a few warm-up calls, not one (see above).
template <class Fn>
long allocations_after_warmup(Fn&& fn) {
  return peft::test::no_malloc::allocations_after_warmup(fn, 6, 4);
}

template <class T>
void check_case(const Case& c) {
  Rng rng(9);
  AdaptedLinear<T> layer = make_base<T>(rng);
  layer.add_adapter("lora2", second_lora(), rng);
  perturb(layer, "lora2", rng);
  c.add(layer, "case", rng);
  perturb(layer, "case", rng);
  const Matrix<T> x = peft::test::random_matrix<T>(kRows, kIn, rng);
  const Matrix<T> g = peft::test::random_matrix<T>(kRows, kOut, rng);
  typename AdaptedLinear<T>::Cache cache, cache2;
  Matrix<T> y, y2, dx, dx2;

  for (const bool train : {false, true}) {
    INFO((train ? "train mode" : "eval mode"));
    layer.train(train);
    for (const bool frozen_base : {true, false}) {
      INFO((frozen_base ? "frozen base" : "trainable base"));
      if (frozen_base) {
        layer.freeze_base();
      } else {
        layer.weight.set_trainable(true);
        layer.bias.set_trainable(true);
      }
      for (const bool both : {false, true}) {
        INFO((both ? "case + LoRA active" : "case active"));
        if (both)
          layer.set_active({"case", "lora2"});
        else
          layer.set_active("case");
        {
          INFO("forward + backward");
          CHECK(allocations_after_warmup([&] {
                  layer.forward(x, y, cache);
                  layer.backward(cache, g, &dx);
                }) == 0);
        }
        {
          INFO("two caches in flight, backward without dx");
          CHECK(allocations_after_warmup([&] {
                  layer.forward(x, y, cache);
                  layer.forward(x, y2, cache2);
                  layer.backward(cache2, g, &dx2);
                  layer.backward(cache, g, nullptr);
                }) == 0);
        }
        {
          INFO("forward_inference");
          CHECK(allocations_after_warmup([&] { layer.forward_inference(x, y); }) == 0);
        }
      }
    }
  }
  {
    INFO("mixed batch");
    const std::vector<std::string> rows = {"case", "lora2", "none", "case", "lora2"};
    peft::MixedBatchWorkspace<T> ws;
    CHECK(allocations_after_warmup([&] { peft::forward_mixed(layer, x, rows, y, ws); }) == 0);
  }
}

}  // namespace conformance_no_malloc

TEST_CASE("conformance: the no-malloc guard is live for the layer's code", "[conformance][no_malloc]") {
  using namespace conformance_no_malloc;
  CHECK(allocations_after_warmup([] {
          peft::Matrix<float> m(7, 9);
          m.setZero();
        }) > 0);
  // A forward into fresh buffers allocates: if not, the linker took the layer's code from a TU
  // built without EIGEN_RUNTIME_NO_MALLOC (this file must be its own executable).
  Rng rng(0);
  AdaptedLinear<float> layer = make_base<float>(rng);
  cases().front().add(layer, "case", rng);
  const peft::Matrix<float> x = peft::Matrix<float>::Ones(kRows, kIn);
  CHECK(allocations_after_warmup([&] {
          typename AdaptedLinear<float>::Cache fresh;
          peft::Matrix<float> y;
          layer.forward(x, y, fresh);
        }) > 0);
}

TEMPLATE_TEST_CASE("conformance: no allocation after warm-up, every method", "[conformance][no_malloc]", float) {
  for (const conformance::Case& c : conformance::cases()) {
    INFO("case " << c.name);
    conformance_no_malloc::check_case<TestType>(c);
  }
}
