// PPO on the Llama causal LM with adapters (train/ppo.hpp): one minibatch against transformers +
// PEFT (tests/data/ppo, benchmarks/peer/make_ppo_fixture.py), every gradient against finite
// differences in double, the KL controller, the refusals, and a few PPO iterations that raise a toy
// reward.
#include <cmath>
#include <string>
#include <vector>

#include <peft/io/llama_checkpoint.hpp>
#include <peft/io/methods.hpp>
#include <peft/io/safetensors.hpp>
#include <peft/models/llama.hpp>
#include <peft/optim/adam.hpp>
#include <peft/train/gradient_check.hpp>
#include <peft/train/ppo.hpp>

#include "models/llama_test_utils.hpp"
#include "support/test_utils.hpp"

using namespace peft;
using peft::test::llama_data;
using peft::test::Tolerances;

namespace {

/// A [B, S] (or [n]) fixture tensor as a column [B·S, 1].
Matrix<double> ppo_column(const io::SafeTensorsFile& st, const std::string& name) {
  const Matrix<double> m = st.load<double>(name);
  return Eigen::Map<const Matrix<double>>(m.data(), m.size(), 1);
}

/// The tiny synthetic Llama of the DPO tests (random base of a useful size, frozen) with LoRA on
/// q, v and down_proj (lora_B non-zero), and a value head.
LlamaForCausalLM<double> ppo_tiny_llama(Rng& rng) {
  LlamaForCausalLM<double> m(peft::test::tiny_llama_base(), rng);
  m.visit_parameters([&](const std::string& n, Parameter<double>& p) {
    for (Index i = 0; i < p.value.size(); ++i)
      p.value.data()[i] =
          n.find("norm") != std::string::npos ? 1.0 + 0.2 * rng.normal(0.0, 1.0) : 0.4 * rng.normal(0.0, 1.0);
  });
  m.freeze_all();
  const io::Json cfg = {
      {"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"q_proj", "v_proj", "down_proj"}}};
  io::apply_method<double>(m, cfg, "policy", rng);
  return m;
}

/// A hand-made rollout of 3 sequences (prompts 2, 3, 1; responses 3, 2, 4), right-padded to S = 6.
PPORollout<double> ppo_tiny_rollout() {
  PPORollout<double> r;
  const std::vector<std::vector<Index>> seqs = {{1, 2, 3, 4, 5}, {6, 7, 8, 9, 10}, {2, 4, 6, 8, 10}};
  r.prompt_lengths = {2, 3, 1};
  const Index S = 6;
  std::vector<Index> lengths;
  for (const auto& s : seqs) {
    lengths.push_back(static_cast<Index>(s.size()));
    for (Index t = 0; t < S; ++t)
      r.ids.push_back(t < static_cast<Index>(s.size()) ? s[static_cast<std::size_t>(t)] : 0);
  }
  r.layout = SequenceLayout(3, S, lengths);
  r.scores.resize(3, 1);
  r.scores << 1.0, -0.5, 0.25;
  return r;
}

}  // namespace

TEMPLATE_TEST_CASE("ppo: one minibatch reproduces TRL's PPO on transformers + PEFT (fixture)", "[ppo][llama]", float,
                   double) {
  using T = TestType;
  const bool f32 = std::is_same<T, float>::value;
  const io::SafeTensorsFile st(llama_data("../ppo/ppo_expected.safetensors"));
  LlamaForCausalLM<T> model = io::load_llama<T>(llama_data("llama"));
  io::load_method_adapter(model, io::read_method_adapter<T>(llama_data("llama_lora")), "default");
  Rng rng(1);
  ValueHead<T> v_head(model.config().hidden_size, rng);
  v_head.summary.weight.value = st.load<double>("v_head.summary.weight").cast<T>();
  v_head.summary.bias.value = st.load<double>("v_head.summary.bias").cast<T>();
  auto hp = [&](const std::string& k) { return st.load<double>("hp." + k)(0, 0); };

  PPOOptions o;
  o.generation.temperature = hp("temperature");
  o.gamma = hp("gamma");
  o.lam = hp("lam");
  o.init_kl_coef = hp("kl_coef");
  o.adaptive_kl = false;
  o.kl_estimator = KLEstimator::kK3;
  REQUIRE(st.load<double>("kl_estimator")(0, 0) == 3.0);
  o.cliprange = hp("cliprange");
  o.cliprange_value = hp("cliprange_value");
  o.vf_coef = hp("vf_coef");
  o.entropy_coef = hp("entropy_coef");
  PPOTrainer<T> ppo(model, v_head, o);
  CHECK(ppo.trainable_parameters().size() == 10);  // 8 LoRA tensors + the value head's weight and bias
  CHECK(ppo.trainable_parameters().back().name == "v_head.summary.bias");

  PPORollout<T> r;
  const Matrix<double> ids = st.load<double>("input_ids"), mask = st.load<double>("attention_mask");
  const Matrix<double> plen = st.load<double>("prompt_lengths");
  const Index B = ids.rows(), S = ids.cols();
  std::vector<Index> lengths;
  for (Index b = 0; b < B; ++b) {
    lengths.push_back(static_cast<Index>(mask.row(b).sum()));
    r.prompt_lengths.push_back(static_cast<Index>(plen(0, b)));
    for (Index t = 0; t < S; ++t) r.ids.push_back(static_cast<Index>(ids(b, t)));
  }
  r.layout = SequenceLayout(B, S, lengths);
  r.scores = ppo_column(st, "scores").cast<T>();

  // evaluate: the policy's log-probs and values, the reference with the adapter disabled.
  const double tol = f32 ? 2e-5 : 1e-10;
  ppo.evaluate(r);
  const double e_lp = peft::test::rel_diff(r.log_probs, ppo_column(st, "policy_log_probs").cast<T>());
  const double e_ref = peft::test::rel_diff(r.ref_log_probs, ppo_column(st, "ref_log_probs").cast<T>());
  const double e_v = peft::test::rel_diff(r.values, ppo_column(st, "values").cast<T>());
  CHECK(e_lp < tol);
  CHECK(e_ref < tol);
  CHECK(e_v < tol);
  CHECK(peft::test::rel_diff(r.ref_log_probs, r.log_probs) > 1e-3);  // the adapter does act
  for (auto& [path, host] : io::adapted_linears<T>(model)) CHECK_FALSE(host->adapters_disabled());  // restored

  // The fixed rollout-time quantities, then TRL's rewards, GAE, whitening and returns.
  r.log_probs = ppo_column(st, "old_log_probs").cast<T>();
  r.values = ppo_column(st, "old_values").cast<T>();
  r.ref_log_probs = ppo_column(st, "ref_log_probs").cast<T>();
  ppo.compute_advantages(r);
  for (const char* name : {"kl", "rewards", "advantages", "returns"}) {
    INFO(name);
    const Matrix<T>& got = std::string(name) == "kl"           ? r.kl
                           : std::string(name) == "rewards"    ? r.rewards
                           : std::string(name) == "advantages" ? r.advantages
                                                               : r.returns;
    CHECK(peft::test::rel_diff(got, ppo_column(st, name).cast<T>()) < (f32 ? 1e-5 : 1e-12));
  }
  CHECK(r.stats.kl_coef == Approx(hp("kl_coef")));
  CHECK(r.stats.score == Approx(ppo_column(st, "scores").mean()).epsilon(1e-6));

  // One minibatch: loss, statistics and every gradient.
  const Matrix<double> mb = st.load<double>("minibatch");
  const std::vector<Index> seqs = {static_cast<Index>(mb(0, 0)), static_cast<Index>(mb(0, 1))};
  model.zero_grad();
  v_head.zero_grad();
  const PPOLossStats s = ppo.minibatch_loss(r, seqs, true);
  const double e_loss = std::abs(s.loss - st.load<double>("loss")(0, 0)) / std::abs(st.load<double>("loss")(0, 0));
  CHECK(e_loss < tol);
  CHECK(s.policy_loss == Approx(st.load<double>("policy_loss")(0, 0)).epsilon(tol));
  CHECK(s.value_loss == Approx(st.load<double>("value_loss")(0, 0)).epsilon(tol));
  CHECK(s.entropy == Approx(st.load<double>("entropy")(0, 0)).epsilon(tol));
  CHECK(s.approx_kl == Approx(st.load<double>("approx_kl")(0, 0)).epsilon(f32 ? 1e-4 : 1e-10));
  CHECK(s.clip_fraction == st.load<double>("clip_fraction")(0, 0));
  CHECK(s.value_clip_fraction == st.load<double>("value_clip_fraction")(0, 0));
  CHECK(s.clip_fraction > 0.0);
  CHECK(s.value_clip_fraction > 0.0);
  double worst = 0.0;
  int checked = 0;
  for (const NamedParameter<T>& np : ppo.trainable_parameters()) {
    std::string key = np.name;
    if (key.rfind("v_head.", 0) != 0) key = "base_model.model." + key.replace(key.find(".default"), 8, "");
    INFO(key);
    const double e = peft::test::rel_diff(np.param->grad, st.load<double>("grad." + key).cast<T>());
    worst = std::max(worst, e);
    CHECK(e < (f32 ? 1e-5 : 1e-10));
    ++checked;
  }
  CHECK(checked == 10);
  WARN((f32 ? "float" : "double") << ": log-prob rel err " << e_lp << ", ref " << e_ref << ", values " << e_v
                                  << ", loss " << e_loss << ", worst gradient " << worst);
}

TEST_CASE("ppo: the manual backward matches finite differences in double", "[ppo][llama]") {
  Rng rng(15);
  LlamaForCausalLM<double> model = ppo_tiny_llama(rng);
  model.visit_parameters([&](const std::string& n, Parameter<double>& p) {
    if (n.find("lora_B") != std::string::npos)
      p.value = peft::test::random_matrix<double>(p.value.rows(), p.value.cols(), rng, 0.5);
  });
  ValueHead<double> v_head(model.config().hidden_size, rng);
  for (const bool clipped : {false, true}) {
    INFO("tight clips " << clipped);
    PPOOptions o;
    o.generation.temperature = 0.7;
    o.entropy_coef = 0.05;
    o.vf_coef = 0.3;
    o.cliprange = clipped ? 0.05 : 10.0;
    o.cliprange_value = clipped ? 0.05 : 10.0;
    o.kl_estimator = KLEstimator::kK2;
    o.gamma = 0.9;
    o.lam = 0.8;
    PPOTrainer<double> ppo(model, v_head, o);
    PPORollout<double> r = ppo_tiny_rollout();
    ppo.evaluate(r);
    // Rollout-time quantities off the current ones, so that ratios are not 1.
    for (Index i = 0; i < r.log_probs.rows(); ++i)
      if (r.log_probs(i, 0) != 0.0) {
        r.log_probs(i, 0) += 0.3 * rng.normal(0.0, 1.0);
        r.values(i, 0) += 0.5 * rng.normal(0.0, 1.0);
      }
    ppo.compute_advantages(r);
    const std::vector<Index> seqs = {2, 0};
    model.zero_grad();
    v_head.zero_grad();
    const PPOLossStats s = ppo.minibatch_loss(r, seqs, true);
    CHECK(s.tokens == 7);
    if (clipped) {
      CHECK(s.clip_fraction > 0.0);
      CHECK(s.value_clip_fraction > 0.0);
    } else {
      CHECK(s.clip_fraction == 0.0);
    }
    CHECK(ppo.minibatch_loss(r, seqs, false).loss == Approx(s.loss).epsilon(1e-14));
    int n = 0;
    for (const NamedParameter<double>& np : ppo.trainable_parameters()) {
      INFO(np.name);
      Parameter<double>& p = *np.param;
      const Matrix<double> num = numerical_gradient(p.value, [&]() { return ppo.minibatch_loss(r, seqs, false).loss; });
      CHECK(relative_error(p.grad, num) < Tolerances<double>::grad);
      CHECK(p.grad.norm() > 0.0);
      ++n;
    }
    CHECK(n == 14);  // A and B of 3 targets in 2 layers, the value head's weight and bias
  }
}

TEST_CASE("ppo: GAE, the reference, the KL controller and the refusals", "[ppo][llama]") {
  Rng rng(16);
  LlamaForCausalLM<double> model = ppo_tiny_llama(rng);
  ValueHead<double> v_head(model.config().hidden_size, rng);
  PPOOptions o;
  o.whiten_advantages = false;
  o.gamma = 0.9;
  o.lam = 0.5;
  o.init_kl_coef = 0.1;
  PPOTrainer<double> ppo(model, v_head, o);
  PPORollout<double> r = ppo_tiny_rollout();
  ppo.evaluate(r);
  // lora_B = 0: the policy is the reference, so every KL term is 0.
  CHECK(r.kl.cwiseAbs().maxCoeff() == 0.0);
  CHECK((r.log_probs - r.ref_log_probs).cwiseAbs().maxCoeff() == 0.0);
  // GAE by hand on sequence 0 (prompt 2, response 3: action rows 1, 2, 3), with made-up rewards.
  r.log_probs.setZero();
  r.ref_log_probs.setZero();
  r.log_probs(1, 0) = -1.0;  // k1 = log π − log π_ref = −1 → r = +0.1
  r.ref_log_probs(1, 0) = 0.0;
  r.values.setZero();
  r.values(1, 0) = 0.5;
  r.values(2, 0) = -0.25;
  r.values(3, 0) = 1.0;
  ppo.compute_advantages(r);
  const double rw1 = 0.1, rw3 = 1.0, g = 0.9, gl = 0.45;  // score of sequence 0 on its last token
  const double d3 = rw3 - 1.0, d2 = 0.0 + g * 1.0 + 0.25, d1 = rw1 + g * (-0.25) - 0.5;
  const double a3 = d3, a2 = d2 + gl * a3, a1 = d1 + gl * a2;
  CHECK(r.advantages(3, 0) == Approx(a3));
  CHECK(r.advantages(2, 0) == Approx(a2));
  CHECK(r.advantages(1, 0) == Approx(a1));
  CHECK(r.returns(1, 0) == Approx(a1 + 0.5));
  CHECK(r.advantages(0, 0) == 0.0);  // prompt row
  CHECK(r.advantages(4, 0) == 0.0);  // the last token predicts nothing
  CHECK(r.stats.kl == Approx(-1.0 / 3.0));
  CHECK(r.stats.score == Approx(0.25));
  // Ziegler et al.'s controller: clipped proportional error, scaled by n / horizon.
  CHECK(adaptive_kl_update(0.2, 12.0, 6.0, 10000, 256) == Approx(0.2 * (1 + 0.2 * 256 / 10000.0)));
  CHECK(adaptive_kl_update(0.2, 5.4, 6.0, 10000, 100) == Approx(0.2 * (1 - 0.1 * 100 / 10000.0)));

  PEFT_REQUIRE_THROWS_WITH(ppo.minibatch_loss(r, {0, 3}), ShapeError, "sequence index 3");
  PPORollout<double> bad = ppo_tiny_rollout();
  bad.prompt_lengths[1] = 5;
  PEFT_REQUIRE_THROWS_WITH(ppo.evaluate(bad), ShapeError, "response of >= 1");
  PPORollout<double> fresh = ppo_tiny_rollout();
  PEFT_REQUIRE_THROWS_WITH(ppo.compute_advantages(fresh), ShapeError, "log_probs");
  PPOOptions o2 = o;
  o2.mini_batch_size = 2;
  ppo.set_options(o2);
  AdamW<double> opt(ppo.trainable_parameters(), AdamWOptions{});
  PEFT_REQUIRE_THROWS_WITH(ppo.update(r, opt, rng), ConfigError, "does not divide");
  o2.cliprange = 0.0;
  PEFT_REQUIRE_THROWS_WITH(ppo.set_options(o2), ConfigError, "cliprange");
  o2 = o;
  o2.lam = 1.5;
  PEFT_REQUIRE_THROWS_WITH(ppo.set_options(o2), ConfigError, "lam");
  LlamaForCausalLM<double> plain(peft::test::tiny_llama_base(), rng);
  PEFT_REQUIRE_THROWS_WITH(PPOTrainer<double>(plain, v_head), ConfigError, "no adapter");
  ValueHead<double> wrong(5, rng);
  PEFT_REQUIRE_THROWS_WITH(PPOTrainer<double>(model, wrong), ShapeError, "features");

  // reward_model_scores: a reward model's head on each sequence's last response token (padding ignored).
  LlamaRewardModel<double> rm(model.config(), model.model, rng);
  reward_model_scores(rm, r);
  typename LlamaRewardModel<double>::Cache rm_cache;
  Matrix<double> alone;
  for (Index b = 0; b < r.sequences(); ++b) {
    const Index L = r.layout.length(b);
    const std::vector<Index> ids(r.ids.begin() + b * r.layout.seq, r.ids.begin() + b * r.layout.seq + L);
    rm.forward(ids, SequenceLayout(1, L), alone, rm_cache);
    CHECK(r.scores(b, 0) == Approx(alone(0, 0)).epsilon(1e-12));
  }
}

TEST_CASE("ppo: a few iterations on a toy reward raise it", "[ppo][llama]") {
  Rng rng(21);
  LlamaForCausalLM<double> model = ppo_tiny_llama(rng);
  ValueHead<double> v_head(model.config().hidden_size, rng);
  PPOOptions o;
  o.generation.max_new_tokens = 5;
  o.ppo_epochs = 2;
  o.mini_batch_size = 4;
  o.init_kl_coef = 0.02;
  o.target_kl = 1.0;
  o.kl_horizon = 100;
  PPOTrainer<double> ppo(model, v_head, o);
  AdamW<double> opt(ppo.trainable_parameters(), AdamWOptions{0.05, 0.9, 0.999, 1e-8, 0.0});
  const Index target = 3;  // reward: the fraction of response tokens equal to 3
  const PPOTrainer<double>::ScoreFn fraction = [&](const std::vector<Index>&, const std::vector<Index>& resp) {
    double k = 0;
    for (Index id : resp) k += id == target ? 1.0 : 0.0;
    return k / static_cast<double>(resp.size());
  };
  std::vector<std::vector<Index>> prompts;
  for (Index b = 0; b < 8; ++b) prompts.push_back({1 + b % 10, 1 + (3 * b + 2) % 10});
  PPORollout<double> r;
  std::vector<double> scores;
  PPOStats s;
  for (int it = 0; it < 20; ++it) {
    s = ppo.step(prompts, fraction, opt, rng, r);
    scores.push_back(s.score);
    CHECK(std::isfinite(s.loss));
  }
  const double first = (scores[0] + scores[1] + scores[2]) / 3, last = (scores[17] + scores[18] + scores[19]) / 3;
  INFO("mean score " << first << " -> " << last << " (" << ::Catch::Detail::stringify(scores) << "); kl " << s.kl
                     << ", beta " << s.kl_coef << ", entropy " << s.entropy << ", explained variance "
                     << s.explained_variance);
  CHECK(last > first + 0.3);
  CHECK(s.kl > 0.0);                 // the policy left the reference
  CHECK(ppo.kl_coef() != 0.02);      // the controller moved β
  CHECK(s.minibatches == 4);         // 2 epochs × 8 / 4
  CHECK(r.response_length(0) == 5);  // no eos: every response has max_new_tokens
  CHECK(r.sequences() == 8);
}

TEST_CASE("ppo: reference_disabled switches off only the policy adapter (SFT adapter kept)", "[ppo][llama]") {
  Rng rng(23);
  LlamaForCausalLM<double> model = ppo_tiny_llama(rng);  // base + "policy"
  const io::Json sft_cfg = {{"peft_type", "LORA"}, {"r", 2}, {"lora_alpha", 4}, {"target_modules", {"q_proj", "v_proj"}}};
  io::apply_method<double>(model, sft_cfg, "sft", rng);
  for (auto& [path, host] : io::adapted_linears<double>(model)) {
    std::vector<std::string> names;
    if (host->has_adapter("policy")) names.push_back("policy");
    if (host->has_adapter("sft")) names.push_back("sft");
    if (!names.empty()) host->set_active(names);
  }
  model.visit_parameters([&](const std::string& n, Parameter<double>& p) {  // B ≠ 0: both adapters act
    if (n.find("lora_B") != std::string::npos)
      for (Index i = 0; i < p.value.size(); ++i) p.value.data()[i] = 0.3 * rng.normal(0.0, 1.0);
  });
  ValueHead<double> v_head(model.config().hidden_size, rng);
  PPOOptions o;
  o.reference_disabled = {"policy"};
  PPOTrainer<double> ppo(model, v_head, o);
  PPORollout<double> r = ppo_tiny_rollout();
  ppo.evaluate(r);
  CHECK((r.log_probs - r.ref_log_probs).cwiseAbs().maxCoeff() > 1e-6);  // the policy differs from π_ref
  Index hosts_with_policy = 0;
  for (auto& [path, host] : io::adapted_linears<double>(model))
    if (host->has_adapter("policy")) {
      ++hosts_with_policy;
      CHECK_FALSE(host->adapter_disabled("policy"));  // restored after the reference forward
      CHECK_FALSE(host->adapters_disabled());
    }
  CHECK(hosts_with_policy == 6);  // q, v, down of 2 layers
  // π_ref is exactly the model with "sft" alone: switch "policy" off by hand and compare.
  for (auto& [path, host] : io::adapted_linears<double>(model))
    if (host->has_adapter("policy")) host->disable_adapter("policy");
  PPORollout<double> sft_only = ppo_tiny_rollout();
  ppo.evaluate(sft_only);
  CHECK((sft_only.log_probs - r.ref_log_probs).cwiseAbs().maxCoeff() == 0.0);
  CHECK((sft_only.ref_log_probs - r.ref_log_probs).cwiseAbs().maxCoeff() == 0.0);
  for (auto& [path, host] : io::adapted_linears<double>(model))
    if (host->has_adapter("policy")) {
      CHECK(host->adapter_disabled("policy"));  // a flag set before evaluate is kept
      host->disable_adapter("policy", false);
    }
  // The default (every adapter off) is the base model, not the SFT model.
  PPOOptions all = o;
  all.reference_disabled = {};
  ppo.set_options(all);
  PPORollout<double> base = ppo_tiny_rollout();
  ppo.evaluate(base);
  CHECK((base.log_probs - r.log_probs).cwiseAbs().maxCoeff() == 0.0);
  CHECK((base.ref_log_probs - r.ref_log_probs).cwiseAbs().maxCoeff() > 1e-6);
  all.reference_disabled = {"nope"};
  PEFT_REQUIRE_THROWS_WITH(ppo.set_options(all), ConfigError, "\"nope\"");
  CHECK(ppo.options().reference_disabled.empty());  // a refused set_options changes nothing
}
