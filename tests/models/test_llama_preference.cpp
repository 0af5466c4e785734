// DPO on the Llama causal LM (train/preference.hpp): the reference is the same model with the policy
// adapter disabled; the LoRA gradient of every DPO variant against finite differences in double; a
// few AdamW steps raise the chosen-vs-rejected margin.
#include <cmath>
#include <string>
#include <vector>

#include <peft/io/methods.hpp>
#include <peft/loss/preference.hpp>
#include <peft/models/llama.hpp>
#include <peft/optim/adam.hpp>
#include <peft/train/gradient_check.hpp>
#include <peft/train/preference.hpp>

#include "models/llama_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::Tolerances;

namespace {

LlamaConfig dpo_llama_config() { return peft::test::tiny_llama_base(); }

/// A random base (entries of a useful size, unlike HF's 0.02 init), every base weight frozen.
LlamaForCausalLM<double> dpo_llama(Rng& rng) {
  LlamaForCausalLM<double> m(dpo_llama_config(), rng);
  m.visit_parameters([&](const std::string& n, Parameter<double>& p) {
    for (Index i = 0; i < p.value.size(); ++i)
      p.value.data()[i] =
          n.find("norm") != std::string::npos ? 1.0 + 0.2 * rng.normal(0.0, 1.0) : 0.4 * rng.normal(0.0, 1.0);
  });
  m.freeze_all();
  return m;
}

/// Two pairs sharing a prompt each (labels -100 on the prompt), chosen first; padded to S = 6.
PreferenceBatch dpo_pairs() {
  PreferenceBatch b;
  const Index S = 6;
  const std::vector<std::vector<Index>> seqs = {{1, 2, 3, 4, 5, 6}, {7, 8, 9, 10, 2}, {1, 2, 6, 6}, {7, 8, 3, 3, 3, 1}};
  const std::vector<Index> prompt = {2, 2, 2, 2};
  std::vector<Index> lengths;
  for (std::size_t s = 0; s < seqs.size(); ++s) {
    lengths.push_back(static_cast<Index>(seqs[s].size()));
    for (Index t = 0; t < S; ++t) {
      const bool valid = t < static_cast<Index>(seqs[s].size());
      b.ids.push_back(valid ? seqs[s][static_cast<std::size_t>(t)] : 0);
      b.labels.push_back(valid && t >= prompt[s] ? static_cast<std::int64_t>(seqs[s][static_cast<std::size_t>(t)])
                                                 : -100);
    }
  }
  b.layout = SequenceLayout(4, S, lengths);
  return b;
}

const io::Json& dpo_lora_config() {
  static const io::Json cfg = {
      {"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"q_proj", "v_proj", "down_proj"}}};
  return cfg;
}

}  // namespace

TEST_CASE("llama DPO: the reference is the adapter-free model; LoRA gradients match finite differences",
          "[llama][dpo]") {
  Rng rng(15);
  LlamaForCausalLM<double> model = dpo_llama(rng);
  const PreferenceBatch batch = dpo_pairs();
  // The base model's sequence log-probs, before any adapter exists.
  typename LlamaForCausalLM<double>::Cache cache;
  Matrix<double> logits, base_lp;
  SequenceLogProbWorkspace<double> ws;
  model.forward(batch.ids, batch.layout, logits, cache);
  sequence_log_probs<double>(logits, batch.labels, batch.layout, base_lp, ws);

  io::apply_method<double>(model, dpo_lora_config(), "policy", rng);
  DPOObjective<double, LlamaForCausalLM<double>> dpo(model, DPOTrainOptions{});
  // lora_B starts at zero: policy = reference, so the loss is log 2 and the margin 0.
  DPOStats s = dpo.step(batch, false);
  CHECK(s.loss == Approx(std::log(2.0)).epsilon(1e-14));
  CHECK(std::abs(s.margin) < 1e-14);

  model.visit_parameters([&](const std::string& n, Parameter<double>& p) {
    if (n.find("lora_B") != std::string::npos)
      p.value = peft::test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.5);
  });
  Matrix<double> ref_lp;
  dpo.reference_log_probs(batch, ref_lp);
  CHECK((ref_lp - base_lp).cwiseAbs().maxCoeff() == 0.0);  // the same weights, the same arithmetic
  for (auto* h : adapter_hosts<double>(model)) CHECK_FALSE(h->adapters_disabled());  // restored
  dpo.step(batch, false);
  CHECK((dpo.policy_log_probs() - base_lp).cwiseAbs().maxCoeff() > 1e-3);  // the adapter does act

  const DPOTrainOptions variants[] = {
      {DPOOptions{0.5, PreferenceLoss::kSigmoid, 0.0}, false, -100},
      {DPOOptions{0.8, PreferenceLoss::kSigmoid, 0.25}, false, -100},
      {DPOOptions{0.5, PreferenceLoss::kIPO, 0.0}, true, -100},
  };
  for (const DPOTrainOptions& opt : variants) {
    INFO("loss " << static_cast<int>(opt.loss.loss) << ", smoothing " << opt.loss.label_smoothing);
    dpo.set_options(opt);
    model.zero_grad();
    dpo.step(batch, true);
    int n = 0;
    model.visit_parameters([&](const std::string& name, Parameter<double>& p) {
      if (!p.trainable()) {
        CHECK(name.find("lora_") == std::string::npos);
        return;
      }
      INFO(name);
      const Matrix<double> num = numerical_gradient(p.value, [&]() { return dpo.step(batch, false).loss; });
      CHECK(relative_error(p.grad, num) < Tolerances<double>::grad);
      CHECK(p.grad.norm() > 0.0);
      ++n;
    });
    CHECK(n == 12);  // A and B of 3 targets in 2 layers
  }
  PreferenceBatch odd = batch;
  odd.layout = SequenceLayout(3, 8);
  PEFT_REQUIRE_THROWS_WITH(dpo.step(odd), ShapeError, "even number");
}

TEST_CASE("llama DPO: a few AdamW steps on the LoRA adapter raise the chosen-vs-rejected margin", "[llama][dpo]") {
  Rng rng(16);
  LlamaForCausalLM<double> model = dpo_llama(rng);
  io::apply_method<double>(model, dpo_lora_config(), "policy", rng);
  const PreferenceBatch batch = dpo_pairs();
  DPOObjective<double, LlamaForCausalLM<double>> dpo(model, DPOTrainOptions{DPOOptions{0.5}});
  Matrix<double> ref_lp;
  dpo.reference_log_probs(batch, ref_lp);  // constant while only the adapter trains
  AdamW<double> opt(model, AdamWOptions{2e-2, 0.9, 0.999, 1e-8, 0.0});
  const DPOStats first = dpo.step(batch, ref_lp, false);
  DPOStats last;
  for (int step = 0; step < 15; ++step) {
    opt.zero_grad();
    last = dpo.step(batch, ref_lp, true);
    opt.step();
  }
  const DPOStats after = dpo.step(batch, false);  // reference recomputed: still the frozen base
  CHECK(after.loss == Approx(dpo.step(batch, ref_lp, false).loss).epsilon(1e-14));
  INFO("margin " << first.margin << " -> " << after.margin << ", loss " << first.loss << " -> " << after.loss);
  CHECK(first.margin == 0.0);
  CHECK(after.margin > 1.0);
  CHECK(after.loss < 0.5 * first.loss);
  CHECK(after.accuracy == 1.0);
  CHECK(after.reward_chosen > 0.0);  // the chosen answers gained probability relative to the reference
  CHECK(last.loss > after.loss);     // still descending at the end
}

TEST_CASE("llama DPO: starting from an SFT adapter folded into the base, the reference is the SFT model",
          "[llama][dpo]") {
  Rng rng(17);
  LlamaForCausalLM<double> model = dpo_llama(rng);
  const PreferenceBatch batch = dpo_pairs();
  io::apply_method<double>(model, dpo_lora_config(), "sft", rng);
  model.visit_parameters([&](const std::string& n, Parameter<double>& p) {
    if (n.find("lora_B") != std::string::npos)
      p.value = peft::test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.5);
  });
  typename LlamaForCausalLM<double>::Cache cache;
  Matrix<double> logits, sft_lp, base_lp, ref_lp;
  SequenceLogProbWorkspace<double> ws;
  model.forward(batch.ids, batch.layout, logits, cache);
  sequence_log_probs<double>(logits, batch.labels, batch.layout, sft_lp, ws);
  for (auto* h : adapter_hosts<double>(model)) h->disable_adapters(true);
  model.forward(batch.ids, batch.layout, logits, cache);
  sequence_log_probs<double>(logits, batch.labels, batch.layout, base_lp, ws);
  REQUIRE((sft_lp - base_lp).cwiseAbs().maxCoeff() > 1e-3);  // the SFT adapter does act
  for (auto* h : adapter_hosts<double>(model)) {
    h->disable_adapters(false);
    h->merge_and_unload();  // PEFT's merge_and_unload: W = W0 + the SFT update, no adapter left
  }
  io::apply_method<double>(model, dpo_lora_config(), "policy", rng);
  model.visit_parameters([&](const std::string& n, Parameter<double>& p) {
    if (n.find("lora_B") != std::string::npos)
      p.value = peft::test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.5);
  });
  DPOObjective<double, LlamaForCausalLM<double>> dpo(model, DPOTrainOptions{});
  dpo.reference_log_probs(batch, ref_lp);
  CHECK((ref_lp - sft_lp).cwiseAbs().maxCoeff() < 1e-12 * (1.0 + sft_lp.cwiseAbs().maxCoeff()));
  const DPOStats s = dpo.step(batch, false);
  CHECK((dpo.policy_log_probs() - sft_lp).cwiseAbs().maxCoeff() > 1e-3);  // the policy moved off the SFT model
  CHECK(std::isfinite(s.loss));
}
