// A PPO update (epochs of shuffled minibatches: policy forward with the value head, the clipped
// losses, backward through the value head into the LoRA backbone, gradient clipping, AdamW) and
// the rollout's evaluate (policy, value head, reference with the adapters disabled, GAE) allocate
// nothing after the first call with given shapes (support/no_malloc.hpp; std::vector resizes to
// the same size reviewed by eye).
#include "support/no_malloc.hpp"

#include <peft/models/llama.hpp>
#include <peft/optim/adam.hpp>
#include <peft/train/ppo.hpp>

#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

TEST_CASE("no-malloc: PPO evaluate and update on llama with LoRA and a value head", "[llama][ppo][no_malloc]") {
  Rng rng(9);
  LlamaConfig c;
  c.vocab_size = 13;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  LlamaForCausalLM<float> model(c, rng);
  model.freeze_all();
  for (auto& layer : model.model.layers) {
    layer.self_attn.q_proj.add_adapter("policy", LoraConfig{2, 4.0});
    layer.mlp.down_proj.add_adapter("policy", LoraConfig{2, 4.0});
  }
  ValueHead<float> v_head(c.hidden_size, rng);
  PPOOptions o;
  o.generation.max_new_tokens = 4;
  o.ppo_epochs = 2;
  o.mini_batch_size = 2;
  o.entropy_coef = 0.01;
  o.max_grad_norm = 1.0;
  PPOTrainer<float> ppo(model, v_head, o);
  AdamW<float> opt(ppo.trainable_parameters(), AdamWOptions{1e-2});
  PPORollout<float> r;
  ppo.generate({{1, 2}, {3, 4, 5}, {6}, {7, 8}}, rng, r);  // generation allocates (once per rollout)
  ppo.score(r, [](const std::vector<Index>&, const std::vector<Index>& resp) { return resp.front() == 3 ? 1.0 : 0.0; });
  PPOStats s;
  const long e = peft::test::no_malloc::allocations_after_warmup([&] { ppo.evaluate(r); });
  CHECK(e == 0);
  const long n = peft::test::no_malloc::allocations_after_warmup([&] { s = ppo.update(r, opt, rng); });
  CHECK(n == 0);
  CHECK(std::isfinite(s.loss));
  CHECK(s.minibatches == 4);
}
