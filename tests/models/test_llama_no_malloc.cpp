// A Llama training step (forward, causal LM loss, backward) allocates nothing after the first call
// with given shapes: LoRA on q_proj / v_proj over a frozen base, with a frozen or trainable
// embedding table, tied or untied head, padded batch, sliding window (support/no_malloc.hpp; std::vector /
// std::string allocations are reviewed by eye: the hot path builds no string unless it throws).
#include "support/no_malloc.hpp"

#include <peft/loss/causal_lm.hpp>
#include <peft/models/llama.hpp>

#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("no-malloc: llama forward + causal LM loss + backward", "[llama][no_malloc]") {
  for (const bool tied : {false, true})
    for (const bool train_embed : {false, true}) {
      INFO("tied " << tied << ", trainable embeddings " << train_embed);
      LlamaConfig c;
      c.vocab_size = 13;
      c.hidden_size = 8;
      c.intermediate_size = 12;
      c.num_hidden_layers = 2;
      c.num_attention_heads = 4;
      c.num_key_value_heads = 2;
      c.qkv_bias = true;
      c.tie_word_embeddings = tied;
      c.rope.type = "llama3";
      c.rope.factor = 4.0;
      c.rope.original_max_position_embeddings = 16;
      Rng rng(4);
      LlamaForCausalLM<float> model(c, rng);
      model.freeze_all();
      for (auto& layer : model.model.layers) {
        layer.self_attn.q_proj.add_adapter("default", LoraConfig{2, 4.0});
        layer.self_attn.v_proj.add_adapter("default", LoraConfig{2, 4.0});
      }
      model.model.embed_tokens.weight.set_trainable(train_embed);
      const SequenceLayout layout(2, 6, {6, 4});
      const std::vector<Index> ids = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 0};
      const std::vector<std::int64_t> labels = {-100, 2, 3, 4, 5, 6, -100, 8, 9, 10, -100, -100};
      typename LlamaForCausalLM<float>::Cache cache;
      Matrix<float> logits, dlogits;
      float loss = 0;
      const long n = peft::test::no_malloc::allocations_after_warmup([&] {
        model.forward(ids, layout, logits, cache);
        loss = causal_lm_loss<float>(logits, labels, layout, &dlogits);
        model.backward(cache, dlogits);
      });
      CHECK(n == 0);
      CHECK(std::isfinite(loss));
      // Positive control: the guard sees the model's own code.
      const long control =
          peft::test::no_malloc::count_allocations([&] { model.forward(ids, SequenceLayout(1, 12), logits, cache); });
      CHECK(control > 0);
    }
}

TEST_CASE("no-malloc: llama with left padding and prompt / prefix tuning, forward + loss + backward",
          "[llama][no_malloc]") {
  for (int kind = 0; kind < 6; ++kind) {  // kinds 3 .. 5: the same with a sliding window of 3 on layer 1
    INFO("kind " << kind);
    LlamaConfig c;
    if (kind >= 3) {
      c.sliding_window = 3;
      c.layer_types = {"full_attention", "sliding_attention"};
    }
    c.vocab_size = 13;
    c.hidden_size = 8;
    c.intermediate_size = 12;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    Rng rng(6);
    LlamaForCausalLM<float> model(c, rng);
    model.freeze_all();
    if (kind % 3 == 1) model.add_prompt_tuning(3, rng);
    if (kind % 3 == 2) model.add_prefix_tuning(2, rng, true, 6);
    if (kind % 3 == 0) model.model.embed_tokens.weight.set_trainable(true);
    SequenceLayout layout(2, 6, {6, 4});
    layout.left_padded = true;
    const std::vector<Index> ids = {1, 2, 3, 4, 5, 6, 0, 0, 7, 8, 9, 10};
    const std::vector<std::int64_t> labels = model.prompt_labels({1, 2, 3, 4, 5, 6, -100, -100, 7, 8, 9, 10}, layout);
    const SequenceLayout out = model.output_layout(layout);
    typename LlamaForCausalLM<float>::Cache cache;
    Matrix<float> logits, dlogits;
    float loss = 0;
    const long n = peft::test::no_malloc::allocations_after_warmup([&] {
      model.forward(ids, layout, logits, cache);
      loss = causal_lm_loss<float>(logits, labels, out, &dlogits);
      model.backward(cache, dlogits);
    });
    CHECK(n == 0);
    CHECK(std::isfinite(loss));
  }
}
