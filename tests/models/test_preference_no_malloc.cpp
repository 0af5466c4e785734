// A DPO step (policy forward, reference forward with the adapters disabled, sequence log-probs, the
// DPO loss, backward) and a reward-model Bradley–Terry step allocate nothing after the first call
// with given shapes (support/no_malloc.hpp; std::vector / std::string reviewed by eye: resize /
// assign to the same size, strings only on throw).
#include "support/no_malloc.hpp"

#include <peft/loss/bradley_terry.hpp>
#include <peft/loss/preference.hpp>
#include <peft/models/llama.hpp>
#include <peft/models/reward_model.hpp>
#include <peft/train/preference.hpp>

#include <string>
#include <vector>

#include "support/test_utils.hpp"

using namespace peft;

namespace {
LlamaConfig pref_nm_config() {
  LlamaConfig c;
  c.vocab_size = 13;
  c.hidden_size = 8;
  c.intermediate_size = 12;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  return c;
}
}  // namespace

TEST_CASE("no-malloc: DPO step and reward-model step on llama with LoRA", "[llama][dpo][reward][no_malloc]") {
  Rng rng(8);
  LlamaForCausalLM<float> model(pref_nm_config(), rng);
  model.freeze_all();
  for (auto& layer : model.model.layers) {
    layer.self_attn.q_proj.add_adapter("policy", LoraConfig{2, 4.0});
    layer.self_attn.v_proj.add_adapter("policy", LoraConfig{2, 4.0});
  }
  PreferenceBatch batch;
  batch.layout = SequenceLayout(4, 5, {5, 4, 5, 3});
  batch.ids = {1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2, 10, 11, 12, 6, 7, 3, 0, 0};
  batch.labels = {-100, -100, 3, 4, 5, -100, -100, 8, 9, -100, -100, -100, 10, 11, 12, -100, -100, 3, -100, -100};
  for (const bool ipo : {false, true}) {
    INFO("ipo " << ipo);
    DPOTrainOptions o;
    o.loss = DPOOptions{0.3, ipo ? PreferenceLoss::kIPO : PreferenceLoss::kSigmoid, ipo ? 0.0 : 0.1};
    o.average_log_probs = ipo;
    DPOObjective<float, LlamaForCausalLM<float>> dpo(model, o);
    DPOStats s;
    const long n = peft::test::no_malloc::allocations_after_warmup([&] { s = dpo.step(batch); });
    CHECK(n == 0);
    CHECK(std::isfinite(s.loss));
    // The KL estimators on the per-token log-probs of that step.
    Matrix<float> est, dest;
    const long k = peft::test::no_malloc::allocations_after_warmup([&] {
      kl_estimate<float>(dpo.policy_token_log_probs(), dpo.reference_token_log_probs(), KLEstimator::kK3, est, &dest);
    });
    CHECK(k == 0);
  }

  {  // The reference with only the policy adapter switched off (an SFT adapter stays on).
    for (auto& layer : model.model.layers) {
      layer.self_attn.q_proj.add_adapter("sft", LoraConfig{2, 4.0});
      layer.self_attn.q_proj.set_active({"sft", "policy"});
      layer.self_attn.q_proj.method("sft").set_trainable(false);
    }
    DPOTrainOptions o;
    o.reference_disabled = {"policy"};
    DPOObjective<float, LlamaForCausalLM<float>> dpo(model, o);
    DPOStats s;
    CHECK(peft::test::no_malloc::allocations_after_warmup([&] { s = dpo.step(batch); }) == 0);
    CHECK(std::isfinite(s.loss));
  }

  LlamaRewardModel<float> rm(pref_nm_config(), std::move(model.model), rng);
  typename LlamaRewardModel<float>::Cache cache;
  Matrix<float> r, dc, dr, dreward(4, 1);
  float loss = 0;
  const long n = peft::test::no_malloc::allocations_after_warmup([&] {
    rm.forward(batch.ids, batch.layout, r, cache);
    loss = bradley_terry<float>(r.topRows(2), r.bottomRows(2), &dc, &dr);
    dreward.topRows(2) = dc;
    dreward.bottomRows(2) = dr;
    rm.backward(cache, dreward);
  });
  CHECK(n == 0);
  CHECK(std::isfinite(loss));
  // Positive control: the guard sees the model's own code.
  CHECK(peft::test::no_malloc::count_allocations([&] { rm.forward(batch.ids, SequenceLayout(1, 20), r, cache); }) > 0);
}
