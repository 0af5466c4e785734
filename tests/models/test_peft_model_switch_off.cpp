// Per-adapter disable (PeftModel::disable_adapters(names), AdaptedLinear::disable_adapter): an SFT
// adapter stays active and frozen while the policy adapter is switched off, and the forward is then
// bit for bit that of a model holding only the SFT adapter (dense and NF4 base); DPO's reference
// with reference_disabled = {"policy"} is that model.
#include <string>
#include <vector>

#include <peft/io/llama_checkpoint.hpp>
#include <peft/models/llama.hpp>
#include <peft/models/peft_model.hpp>
#include <peft/train/preference.hpp>

#include "models/llama_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;

namespace {

const io::Json& switch_off_lora() {
  static const io::Json cfg = {
      {"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"q_proj", "v_proj", "down_proj"}}};
  return cfg;
}

template <class T>
void switch_off_randomize_b(Module<T>& m, const std::string& adapter, Rng& rng) {
  m.visit_parameters([&](const std::string& n, Parameter<T>& p) {
    if (n.find("lora_B." + adapter + ".") != std::string::npos)
      p.value = peft::test::random_matrix<T>(p.value.rows(), p.value.cols(), rng, 0.5);
  });
}

/// ids of two sequences (S = 5, the second padded) and their layout.
struct SwitchOffInput {
  std::vector<Index> ids = {1, 2, 3, 4, 5, 6, 7, 8, 0, 0};
  SequenceLayout layout = SequenceLayout(2, 5, {5, 3});
};

template <class T>
Matrix<T> switch_off_logits(LlamaForCausalLM<T>& m) {
  const SwitchOffInput in;
  typename LlamaForCausalLM<T>::Cache cache;
  Matrix<T> logits;
  m.forward(in.ids, in.layout, logits, cache);
  return logits;
}

}  // namespace

TEMPLATE_TEST_CASE("PeftModel::disable_adapters(names): SFT active, policy off = the SFT-only model, bitwise",
                   "[peft_model][llama][dpo]", float, double) {
  using T = TestType;
  for (const bool nf4 : {false, true}) {
    INFO("nf4 base " << nf4);
    Rng rng(31);
    LlamaConfig cfg = peft::test::tiny_llama_base();
    cfg.hidden_size = 16;  // NF4 blocks of 64 values
    cfg.intermediate_size = 32;
    LlamaForCausalLM<T> model(cfg, rng);
    if (nf4) io::quantize_llama_nf4(model);
    PeftModel<T> pm(model);
    pm.add_adapter("sft", switch_off_lora());
    switch_off_randomize_b<T>(model, "sft", rng);
    LlamaForCausalLM<T> sft_only = model;  // the SFT model: base + the SFT adapter, nothing else
    const Matrix<T> sft_logits = switch_off_logits(sft_only);

    pm.add_adapter("policy", switch_off_lora());
    switch_off_randomize_b<T>(model, "policy", rng);
    pm.set_adapter({"sft", "policy"});
    for (auto& [path, host] : io::adapted_linears<T>(model))  // the SFT adapter frozen, the policy trains
      if (host->has_adapter("sft")) host->method("sft").set_trainable(false);
    const ParameterCount trainable_before = pm.parameter_count();
    const Matrix<T> both = switch_off_logits(model);
    REQUIRE((both - sft_logits).cwiseAbs().maxCoeff() > T(1e-3));  // the policy adapter does act
    {
      auto ref = pm.disable_adapter("policy");
      CHECK(switch_off_logits(model) == sft_logits);  // bit for bit
      CHECK(pm.active_adapters() == std::vector<std::string>{"sft", "policy"});
      CHECK(pm.parameter_count().trainable == trainable_before.trainable);
      {  // nested with the full switch: the base model, then back to the SFT model
        auto off = pm.disable_adapters();
        CHECK((switch_off_logits(model) - sft_logits).cwiseAbs().maxCoeff() > T(1e-3));
      }
      CHECK(switch_off_logits(model) == sft_logits);
      { auto again = pm.disable_adapters(std::vector<std::string>{"policy"}); }  // inner guard keeps it off
      CHECK(switch_off_logits(model) == sft_logits);
    }
    CHECK(switch_off_logits(model) == both);
    try {  // an exception leaving the scope switches it back on
      auto ref = pm.disable_adapter("policy");
      throw std::runtime_error("step failed");
    } catch (const std::runtime_error&) {
    }
    CHECK(switch_off_logits(model) == both);

    // A forward made before the switch keeps its backward: the same gradients as without the
    // reference forward in between.
    const SwitchOffInput in;
    typename LlamaForCausalLM<T>::Cache cache;
    Matrix<T> logits;
    const Matrix<T> dlogits = peft::test::random_matrix<T>(in.layout.batch * in.layout.seq, cfg.vocab_size, rng);
    const auto grads = [&](bool reference_between) {
      model.zero_grad();
      model.forward(in.ids, in.layout, logits, cache);
      if (reference_between) {
        auto ref = pm.disable_adapter("policy");
        (void)switch_off_logits(model);
      }
      model.backward(cache, dlogits);
      std::vector<Matrix<T>> g;
      model.visit_parameters([&](const std::string& n, Parameter<T>& p) {
        if (p.trainable()) {
          CHECK(n.find(".policy.") != std::string::npos);
          g.push_back(p.grad);
        }
      });
      return g;
    };
    const std::vector<Matrix<T>> g0 = grads(false), g1 = grads(true);
    REQUIRE(g0.size() == g1.size());
    REQUIRE_FALSE(g0.empty());
    for (std::size_t i = 0; i < g0.size(); ++i) CHECK(g0[i] == g1[i]);

    PEFT_REQUIRE_THROWS_WITH((void)pm.disable_adapter("zz"), ConfigError, "no adapter \"zz\"");
    if (!nf4) {
      pm.merge({"sft"});
      PEFT_REQUIRE_THROWS_WITH((void)pm.disable_adapter("sft"), ConfigError,
                               "cannot disable adapter \"sft\" while it is merged");
      pm.unmerge();
      auto ref = pm.disable_adapter("policy");
      PEFT_REQUIRE_THROWS_WITH(pm.merge({"policy"}), ConfigError, "adapter \"policy\" is disabled");
    }
  }
}

TEST_CASE("DPO reference_disabled {\"policy\"}: the reference is the SFT model kept as an active adapter",
          "[llama][dpo]") {
  Rng rng(33);
  LlamaForCausalLM<double> model(peft::test::tiny_llama_base(), rng);
  model.freeze_all();
  io::apply_method<double>(model, switch_off_lora(), "sft", rng);
  switch_off_randomize_b<double>(model, "sft", rng);
  LlamaForCausalLM<double> sft_only = model;
  io::apply_method<double>(model, switch_off_lora(), "policy", rng);
  switch_off_randomize_b<double>(model, "policy", rng);
  for (auto* h : adapter_hosts<double>(model)) {
    if (!h->has_adapter("sft")) continue;
    h->set_active({"sft", "policy"});
    h->method("sft").set_trainable(false);
  }
  PreferenceBatch batch;
  batch.layout = SequenceLayout(2, 5, {5, 4});
  batch.ids = {1, 2, 3, 4, 5, 1, 2, 9, 10, 0};
  batch.labels = {-100, -100, 3, 4, 5, -100, -100, 9, 10, -100};

  Matrix<double> sft_lp, ref_lp, logits;
  SequenceLogProbWorkspace<double> ws;
  typename LlamaForCausalLM<double>::Cache cache;
  sft_only.forward(batch.ids, batch.layout, logits, cache);
  sequence_log_probs<double>(logits, batch.labels, batch.layout, sft_lp, ws);

  DPOTrainOptions o;
  o.reference_disabled = {"policy"};
  DPOObjective<double, LlamaForCausalLM<double>> dpo(model, o);
  dpo.reference_log_probs(batch, ref_lp);
  CHECK(ref_lp == sft_lp);
  const DPOStats s = dpo.step(batch, true);
  CHECK((dpo.policy_log_probs() - sft_lp).cwiseAbs().maxCoeff() > 1e-3);  // the policy is not the reference
  CHECK(std::isfinite(s.loss));
  for (auto* h : adapter_hosts<double>(model)) {  // restored: both on, SFT frozen
    if (!h->has_adapter("policy")) continue;
    CHECK_FALSE(h->adapter_disabled("policy"));
    CHECK_FALSE(h->adapters_disabled());
  }
  // The default reference is the base model (every adapter off): different from the SFT model.
  DPOObjective<double, LlamaForCausalLM<double>> dpo_base(model, DPOTrainOptions{});
  Matrix<double> base_lp;
  dpo_base.reference_log_probs(batch, base_lp);
  CHECK((base_lp - sft_lp).cwiseAbs().maxCoeff() > 1e-3);

  DPOTrainOptions bad;
  bad.reference_disabled = {"nope"};
  PEFT_REQUIRE_THROWS_WITH((DPOObjective<double, LlamaForCausalLM<double>>(model, bad)), ConfigError,
                           "reference_disabled names adapter \"nope\"");
  PEFT_REQUIRE_THROWS_WITH(dpo.set_options(bad), ConfigError, "no layer of model");
  dpo.reference_log_probs(batch, ref_lp);  // a refused set_options keeps the previous reference
  CHECK(ref_lp == sft_lp);
}
