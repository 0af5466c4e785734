// TransformerClassifier::forward_inference allocates nothing after the first call with a given
// shape, with every kind of PEFT module the model holds (LoRA, (IA)³, Houlsby adapters, a projected
// prefix, a soft prompt, a modules_to_save head) on a padded batch; and a training step and an
// evaluation of the same batch shape alternate without allocating (support/no_malloc.hpp;
// std::vector / std::string allocations are reviewed by eye).
#include "support/no_malloc.hpp"

#include <peft/models/peft_config.hpp>
#include <peft/models/transformer.hpp>

#include <string>

#include "support/test_utils.hpp"

using namespace peft;

namespace {

TransformerClassifier<float> tiny_vit_with_everything(Rng& rng) {
  TransformerConfig c;
  c.input_dim = 5;
  c.max_seq_len = 6;
  c.dim = 8;
  c.num_heads = 2;
  c.ffn_dim = 12;
  c.num_layers = 2;
  c.num_classes = 3;
  TransformerClassifier<float> model(c, rng);
  PeftConfig pc;
  LoraTargetConfig lc;
  lc.target_modules = ModuleSelector::pattern("all-linear");
  lc.lora.r = 2;
  pc.lora = lc;
  pc.ia3.emplace();
  AdapterTargetConfig ac;
  ac.options.bottleneck = 3;
  pc.adapter = ac;
  PrefixTargetConfig xc;
  xc.num_virtual_tokens = 2;
  xc.prefix_projection = true;
  xc.encoder_hidden_size = 4;
  pc.prefix = xc;
  PromptTargetConfig sc;
  sc.num_virtual_tokens = 2;
  pc.prompt = sc;
  pc.modules_to_save = {"classifier"};
  apply_peft(model, pc, rng);
  return model;
}

}  // namespace

TEST_CASE("no-malloc: transformer forward_inference, alone and between training steps",
          "[transformer][inference][no_malloc]") {
  Rng rng(7);
  TransformerClassifier<float> model = tiny_vit_with_everything(rng);
  model.eval();
  const SequenceLayout layout(3, 4, {4, 2, 3});
  const Matrix<float> x = test::random_matrix<float>(12, 5, rng), xe = test::random_matrix<float>(15, 5, rng);
  Matrix<float> logits, eval_logits;
  const long n = peft::test::no_malloc::allocations_after_warmup([&] { model.forward_inference(x, layout, logits); });
  CHECK(n == 0);
  CHECK(logits.rows() == 3);
  // a training step (forward, backward) and an evaluation, alternating (same batch shape: with an
  // evaluation shape other than training's, 4 allocations per alternation remain, not yet located)
  typename TransformerClassifier<float>::Cache cache;
  Matrix<float> g = Matrix<float>::Constant(3, 3, 0.1f);
  const long mixed = peft::test::no_malloc::allocations_after_warmup([&] {
    model.forward(x, layout, logits, cache);
    model.forward_inference(x, layout, eval_logits);
    model.backward(cache, g);
  });
  CHECK(mixed == 0);
  CHECK(eval_logits == logits);
  // Positive control: a new shape allocates, and the guard sees it.
  const long control = peft::test::no_malloc::count_allocations(
      [&] { model.forward_inference(xe.topRows(6), SequenceLayout(2, 3), eval_logits); });
  CHECK(control > 0);
}
