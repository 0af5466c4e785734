#pragma once
// Proximal Policy Optimization of a causal LM with adapters against a scalar reward with a KL
// penalty: the RLHF recipe of Ziegler et al. (2019, "Fine-Tuning Language Models from Human
// Preferences") and Ouyang et al. (2022, "Training language models to follow instructions with
// human feedback", InstructGPT), as Hugging Face TRL's PPOTrainer computes it, on PPO (Schulman
// et al., 2017, "Proximal Policy Optimization Algorithms") with GAE (Schulman et al., 2016,
// "High-Dimensional Continuous Control Using Generalized Advantage Estimation").
//
// The policy π is models/llama.hpp's LlamaForCausalLM with its (LoRA, ...) adapters active; the
// reference π_ref is the same model with every AdaptedLinear host's adapters disabled (one more
// forward, no second copy of the weights), or, with PPOOptions::reference_disabled = {"policy"},
// only the named adapter(s) switched off (AdaptedLinear::disable_adapter): an SFT adapter kept
// active and frozen beside the policy adapter is then part of the reference, as in
// train/preference.hpp. Prompt and prefix tuning are refused (they are not switched off for the
// reference).
//
// Value head (TRL's AutoModelForCausalLMWithValueHead: ValueHead = Linear(d, 1) with bias, on the
// last hidden state): V(s_t) = h_t · w + b, h_t the final (normed) hidden state of position t. It
// SHARES the policy backbone, as TRL's classic model does: the value loss reaches the adapters
// through the hidden states (LlamaForCausalLM::backward's dhidden); the head has its own
// parameters ("v_head.summary.weight" / ".bias" in trainable_parameters()).
//
// A rollout holds B sequences, each prompt (P_b tokens) then response (R_b ≥ 1 tokens), right-padded
// to S. Per-token quantities live on the row that PREDICTS the token (the causal shift of
// loss/preference.hpp's sequence_log_probs): row (b, t), P_b − 1 ≤ t ≤ P_b + R_b − 2, scores token
// t + 1; every other row (prompt, padding) is masked and holds 0. With logits z (divided by the
// sampling temperature τ, as TRL's PPO does) and y the sampled token:
//   log π(y_t) = log softmax(z_t / τ)[y_{t+1}]      (policy, adapters on; old: at rollout time)
//   log π_ref(y_t) likewise with the adapters off;  V_t from the value head
//   kl_t  = KL estimator (loss/preference.hpp: k1 = log π − log π_ref (TRL's default), k2, k3)
//   r_t   = −β kl_t, plus the sequence's score s_b on its last response token
//   δ_t   = r_t + γ V_{t+1} − V_t  (V after the last token: 0);  A_t = δ_t + γλ A_{t+1}   (GAE)
//   R_t   = A_t + V_t  (returns, from the un-whitened advantages)
//   Â_t   = (A_t − mean A) / sqrt(var A + 1e-8)  over the rollout's response tokens (unbiased
//           variance, TRL's masked_whiten; off with whiten_advantages = false)
// Loss of a minibatch, means over its N response tokens (TRL's masked_mean), ρ = exp(log π − log π_old):
//   L_pg  = mean max(−Â ρ, −Â clip(ρ, 1 − ε, 1 + ε))
//   L_vf  = ½ mean max((V − R)², (clip(V, V_old − c, V_old + c) − R)²)
//   H     = mean entropy of softmax(z / τ)
//   L     = L_pg + vf_coef · L_vf − entropy_coef · H
// Gradients by hand (torch's conventions at the kinks: max splits ties in half, clamp passes its
// bounds): ∂L_pg/∂log π = −Â ρ / N where the unclipped term is the max, else 0;
// ∂L_vf/∂V = (V − R) / N where the unclipped term is the max, else 0; ∂H/∂z = −p (log p + H);
// ∂log π/∂z = onehot(y) − p; every ∂/∂z divided by τ. Then the value head's backward gives ∂L/∂h,
// and LlamaForCausalLM::backward(cache, dlogits, &dhidden) the adapters' gradients.
//
// Several epochs over shuffled minibatches (mini_batch_size must divide B) with the caller's
// optimizer (optional global gradient clipping), then the KL coefficient: fixed, or Ziegler et al.'s
// adaptive controller (TRL's AdaptiveKLController), with KL the rollout's mean per-sequence Σ_t kl_t:
//   β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · B / horizon)
// Reported per update (PPOStats): mean score, KL, non-score reward, entropy, clip fractions,
// approx-KL ½ mean (log π − log π_old)², policy and value losses, explained variance
// 1 − Var(R − V_old) / Var(R) over the response tokens.
//
// Use:
//   ValueHead<T> v_head(model.config().hidden_size, rng);
//   PPOTrainer<T> ppo(model, v_head, options);
//   AdamW<T> opt(ppo.trainable_parameters(), AdamWOptions{...});
//   PPORollout<T> r;
//   PPOStats s = ppo.step(prompts, score_fn, opt, rng, r);   // = generate, score, evaluate, update
// or the parts: generate(prompts, rng, r); score(r, fn) or reward_model_scores(rm, r) (or fill
// r.scores); evaluate(r) (old log-probs, values, reference, then compute_advantages); update(r, opt,
// rng). minibatch_loss(r, sequences, backward) is one minibatch's loss and gradients.
//
// Sampling uses generation.hpp's sampler (seeded peft::Rng; do_sample, temperature, top-k, top-p
// from options.generation). The log-probs are of softmax(z / τ) whatever top-k / top-p cut from the
// sampling distribution (as TRL). After the first update with given shapes (rollouts padded to the
// longest prompt + max_new_tokens keep S fixed) an update allocates nothing: every buffer is a
// member reused (so does evaluate, but for the train/eval mode switches of a model in train mode,
// which build module names). Generation allocates (once per rollout).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <numeric>
#include <string>
#include <utility>
#include <vector>

#include "peft/core/check.hpp"
#include "peft/core/error.hpp"
#include "peft/core/module.hpp"
#include "peft/core/parameters.hpp"
#include "peft/core/rng.hpp"
#include "peft/core/sequence.hpp"
#include "peft/core/types.hpp"
#include "peft/layers/adapted_linear.hpp"
#include "peft/layers/linear.hpp"
#include "peft/loss/preference.hpp"
#include "peft/models/generation.hpp"
#include "peft/models/llama.hpp"
#include "peft/models/reward_model.hpp"
#include "peft/optim/clip.hpp"
#include "peft/optim/optimizer.hpp"
#include "peft/train/reference_switch.hpp"

namespace peft {

/// TRL's ValueHead: V = h wᵀ + b on every row of the final hidden states [rows, d] → [rows, 1].
template <class T>
class ValueHead : public Module<T> {
 public:
  struct Cache {
    typename Linear<T>::Cache summary;
  };

  ValueHead() = default;
  /// torch.nn.Linear(hidden_size, 1)'s init (TRL's default), trainable.
  ValueHead(Index hidden_size, Rng& rng) : Module<T>("v_head"), summary(hidden_size, 1, rng, true) {}

  Linear<T> summary;  ///< [1, d] and a bias [1]

  Index hidden_size() const { return summary.in_features(); }
  void forward(const ConstMatrixRef<T>& hidden, Matrix<T>& values, Cache& cache) {
    summary.forward(hidden, values, cache.summary);  // V = h wᵀ + b   [rows, 1]
  }
  /// dvalues [rows, 1] → dw, db (+=); dhidden = dV w [rows, d] unless null.
  void backward(const Cache& cache, const ConstMatrixRef<T>& dvalues, Matrix<T>* dhidden) {
    summary.backward(cache.summary, dvalues, dhidden);
  }

 protected:
  void visit_children(const typename Module<T>::ChildVisitor& fn) override { fn("summary", summary); }
};

/// Defaults are TRL's classic PPOConfig, except mini_batch_size (TRL: 128 of a batch of 128; 1 divides
/// every batch) and max_new_tokens (16).
struct PPOOptions {
  GenerationConfig generation = sampling();  ///< rollouts: do_sample, temperature (also τ of the log-probs), ...
  Index ppo_epochs = 4;                      ///< passes over the rollout per update
  Index mini_batch_size = 1;                 ///< sequences per minibatch; must divide the rollout's B
  double gamma = 1.0;                        ///< discount γ ∈ [0, 1]
  double lam = 0.95;                         ///< GAE λ ∈ [0, 1]
  double cliprange = 0.2;                    ///< ε > 0 of the policy ratio
  double cliprange_value = 0.2;              ///< c > 0 of the value clip
  double vf_coef = 0.1;                      ///< value-loss coefficient ≥ 0
  double entropy_coef = 0.0;                 ///< entropy bonus ≥ 0 (0: off)
  KLEstimator kl_estimator = KLEstimator::kK1;
  double init_kl_coef = 0.2;  ///< β at the start (fixed β when adaptive_kl is false), ≥ 0
  bool adaptive_kl = true;    ///< Ziegler et al.'s controller
  double target_kl = 6.0;     ///< its target per-sequence KL (> 0)
  double kl_horizon = 10000;  ///< its horizon (> 0)
  bool whiten_advantages = true;
  double max_grad_norm = 0.0;  ///< global 2-norm clip of every trainable gradient; 0: off
  /// The adapters switched off for the reference forward (e.g. {"policy"}, with an SFT adapter
  /// active and frozen beside it); empty: every adapter (the base model).
  std::vector<std::string> reference_disabled = {};

  /// TRL's PPO generation settings: sample from the full distribution (τ 1, no top-k / top-p).
  static GenerationConfig sampling() {
    GenerationConfig g;
    g.do_sample = true;
    g.max_new_tokens = 16;
    return g;
  }
};

/// What a PPO update measured (rollout figures, then means over its minibatches).
struct PPOStats {
  double score = 0.0;             ///< mean sequence score s_b (the task reward)
  double kl = 0.0;                ///< mean over sequences of Σ_t kl_t (the estimator)
  double non_score_reward = 0.0;  ///< mean over sequences of Σ_t −β kl_t
  double reward = 0.0;            ///< score + non_score_reward
  double kl_coef = 0.0;           ///< β the rewards were computed with
  double response_length = 0.0;   ///< mean R_b
  double explained_variance = 0.0;
  double loss = 0.0;  ///< L (minibatch mean, as the rest below)
  double policy_loss = 0.0;
  double value_loss = 0.0;
  double entropy = 0.0;
  double approx_kl = 0.0;            ///< ½ mean (log π − log π_old)²
  double clip_fraction = 0.0;        ///< share of tokens whose clipped policy term is the max
  double value_clip_fraction = 0.0;  ///< likewise for the value loss
  Index minibatches = 0;
};

/// One minibatch's loss terms (PPOTrainer::minibatch_loss).
struct PPOLossStats {
  double loss = 0.0, policy_loss = 0.0, value_loss = 0.0, entropy = 0.0, approx_kl = 0.0, clip_fraction = 0.0,
         value_clip_fraction = 0.0;
  Index tokens = 0;  ///< N: response tokens in the minibatch
};

/// A batch of prompts with sampled responses and what PPO computes on them (see the file comment
/// for the row convention: per-token matrices are [B·S, 1], row b·S + t for token t + 1).
template <class T>
struct PPORollout {
  std::vector<Index> ids;             ///< [B·S] prompt then response, right-padded with the pad id
  SequenceLayout layout;              ///< [B, S], lengths P_b + R_b
  std::vector<Index> prompt_lengths;  ///< P_b ≥ 1
  Matrix<T> scores;                   ///< [B, 1] the sequence scores (score() or the caller)
  Matrix<T> log_probs;                ///< old log π (evaluate)
  Matrix<T> ref_log_probs;            ///< log π_ref (evaluate)
  Matrix<T> values;                   ///< old V (evaluate)
  Matrix<T> kl;                       ///< kl_t (compute_advantages, as the three below)
  Matrix<T> rewards;                  ///< r_t
  Matrix<T> advantages;               ///< Â_t (whitened unless switched off)
  Matrix<T> returns;                  ///< R_t
  PPOStats stats;                     ///< the rollout's figures (compute_advantages)

  Index sequences() const { return layout.batch; }
  Index prompt_length(Index b) const { return prompt_lengths[static_cast<std::size_t>(b)]; }
  Index response_length(Index b) const { return layout.length(b) - prompt_length(b); }
  /// Row (b, t) predicts a response token.
  bool action(Index b, Index t) const { return t >= prompt_length(b) - 1 && t + 1 < layout.length(b); }
  std::vector<Index> prompt(Index b) const {
    const auto it = ids.begin() + static_cast<std::ptrdiff_t>(b * layout.seq);
    return std::vector<Index>(it, it + prompt_length(b));
  }
  std::vector<Index> response(Index b) const {
    const auto it = ids.begin() + static_cast<std::ptrdiff_t>(b * layout.seq + prompt_length(b));
    return std::vector<Index>(it, it + response_length(b));
  }
};

/// Scores every sequence of a rollout with a reward model (LlamaRewardModel: the head read at the
/// last non-padding token, i.e. the last response token) into r.scores [B, 1].
template <class T>
void reward_model_scores(LlamaRewardModel<T>& reward_model, PPORollout<T>& r) {
  typename LlamaRewardModel<T>::Cache cache;
  const bool was_training = reward_model.training();
  reward_model.eval();
  reward_model.forward(r.ids, r.layout, r.scores, cache);
  if (was_training) reward_model.train();
}

namespace detail {
inline void check_ppo_options(const PPOOptions& o) {
  const char* who = "PPOTrainer";
  check_generation_config(o.generation, who);
  auto fail = [&](const std::string& what, double v) {
    throw ConfigError(std::string(who) + ": " + what + ", got " + check::num(v));
  };
  if (o.generation.max_new_tokens < 1)
    fail("generation.max_new_tokens must be >= 1", double(o.generation.max_new_tokens));
  if (o.generation.do_sample && !(o.generation.temperature > 0.0))
    fail("temperature must be > 0", o.generation.temperature);
  if (o.ppo_epochs < 1) fail("ppo_epochs must be >= 1", double(o.ppo_epochs));
  if (o.mini_batch_size < 1) fail("mini_batch_size must be >= 1", double(o.mini_batch_size));
  if (!(o.gamma >= 0.0 && o.gamma <= 1.0)) fail("gamma must be in [0, 1]", o.gamma);
  if (!(o.lam >= 0.0 && o.lam <= 1.0)) fail("lam must be in [0, 1]", o.lam);
  if (!(o.cliprange > 0.0 && std::isfinite(o.cliprange))) fail("cliprange must be finite and > 0", o.cliprange);
  if (!(o.cliprange_value > 0.0 && std::isfinite(o.cliprange_value)))
    fail("cliprange_value must be finite and > 0", o.cliprange_value);
  if (!(o.vf_coef >= 0.0 && std::isfinite(o.vf_coef))) fail("vf_coef must be finite and >= 0", o.vf_coef);
  if (!(o.entropy_coef >= 0.0 && std::isfinite(o.entropy_coef)))
    fail("entropy_coef must be finite and >= 0", o.entropy_coef);
  if (!(o.init_kl_coef >= 0.0 && std::isfinite(o.init_kl_coef)))
    fail("init_kl_coef must be finite and >= 0", o.init_kl_coef);
  if (o.adaptive_kl && !(o.target_kl > 0.0 && std::isfinite(o.target_kl)))
    fail("target_kl must be finite and > 0", o.target_kl);
  if (o.adaptive_kl && !(o.kl_horizon > 0.0 && std::isfinite(o.kl_horizon)))
    fail("kl_horizon must be finite and > 0", o.kl_horizon);
  if (!(o.max_grad_norm >= 0.0 && std::isfinite(o.max_grad_norm)))
    fail("max_grad_norm must be finite and >= 0", o.max_grad_norm);
}

/// The sampling temperature τ the log-probs divide by (1 when greedy).
inline double ppo_temperature(const PPOOptions& o) { return o.generation.do_sample ? o.generation.temperature : 1.0; }
}  // namespace detail

/// Ziegler et al.'s KL coefficient update: β ← β (1 + clip(KL / target − 1, ±0.2) · n / horizon).
inline double adaptive_kl_update(double beta, double kl, double target, double horizon, Index n_steps) {
  const double err = std::clamp(kl / target - 1.0, -0.2, 0.2);
  return beta * (1.0 + err * static_cast<double>(n_steps) / horizon);
}

/// PPO on a LlamaForCausalLM whose adapters are the policy, with a value head on its backbone.
/// Holds both by reference; one instance per model.
template <class T>
class PPOTrainer {
 public:
  using Model = LlamaForCausalLM<T>;
  /// A sequence's score from its prompt and response ids.
  using ScoreFn = std::function<double(const std::vector<Index>& prompt, const std::vector<Index>& response)>;

  PPOTrainer(Model& policy, ValueHead<T>& value_head, const PPOOptions& options = {})
      : policy_(&policy), value_head_(&value_head), options_(options), kl_coef_(options.init_kl_coef) {
    detail::check_ppo_options(options);
    if (policy.prompt_encoder || policy.prefix_encoder)
      throw ConfigError("PPOTrainer: model \"" + policy.name() +
                        "\" has a prompt or prefix encoder; the reference switches off AdaptedLinear adapters only");
    policy.visit_modules([&](const std::string&, Module<T>& m) {
      if (auto* l = dynamic_cast<AdaptedLinear<T>*>(&m)) hosts_.push_back(l);
    });
    bool any = false;
    for (const auto* h : hosts_) any = any || h->num_adapters() > 0;
    if (!any)
      throw ConfigError("PPOTrainer: model \"" + policy.name() +
                        "\" has no adapter, so there is no policy to disable for the reference");
    check::input_features("ValueHead", value_head.name(), value_head.hidden_size(), policy.config().hidden_size);
    ref_switch_.reset(hosts_, options.reference_disabled, "PPOTrainer", policy_->name());
    params_ = peft::trainable_parameters<T>(policy);
    for (auto& np : peft::trainable_parameters<T>(value_head)) params_.push_back({"v_head." + np.name, np.param});
  }

  const PPOOptions& options() const { return options_; }
  /// New options (the KL coefficient keeps its current value; set_kl_coef to change it).
  void set_options(const PPOOptions& o) {
    detail::check_ppo_options(o);
    ref_switch_.reset(hosts_, o.reference_disabled, "PPOTrainer", policy_->name());
    options_ = o;
  }
  double kl_coef() const { return kl_coef_; }
  void set_kl_coef(double beta) {
    if (!(beta >= 0.0 && std::isfinite(beta)))
      throw ConfigError("PPOTrainer: kl_coef must be finite and >= 0, got " + check::num(beta));
    kl_coef_ = beta;
  }

  /// The policy's trainable parameters then the value head's ("v_head." + name), as at construction:
  /// what the optimizer takes.
  const std::vector<NamedParameter<T>>& trainable_parameters() const { return params_; }

  /// Samples a response for every prompt (adapters active, options.generation, `rng`) into `out`:
  /// ids right-padded to the longest prompt + max_new_tokens, scores and per-token matrices cleared.
  void generate(const std::vector<std::vector<Index>>& prompts, Rng& rng, PPORollout<T>& out) {
    const std::vector<std::vector<Index>> seqs = generate_batch(*policy_, prompts, options_.generation, rng);
    const Index B = static_cast<Index>(prompts.size());
    Index longest = 0;
    for (const auto& p : prompts) longest = std::max<Index>(longest, static_cast<Index>(p.size()));
    const Index S = longest + options_.generation.max_new_tokens;
    out.ids.assign(static_cast<std::size_t>(B * S), options_.generation.pad_token_id);
    out.prompt_lengths.resize(static_cast<std::size_t>(B));
    std::vector<Index> lengths(static_cast<std::size_t>(B));
    for (Index b = 0; b < B; ++b) {
      const auto& s = seqs[static_cast<std::size_t>(b)];
      out.prompt_lengths[static_cast<std::size_t>(b)] = static_cast<Index>(prompts[static_cast<std::size_t>(b)].size());
      lengths[static_cast<std::size_t>(b)] = static_cast<Index>(s.size());
      std::copy(s.begin(), s.end(), out.ids.begin() + static_cast<std::ptrdiff_t>(b * S));
    }
    out.layout = SequenceLayout(B, S, std::move(lengths));
    out.scores.setZero(B, 1);
    for (Matrix<T>* m :
         {&out.log_probs, &out.ref_log_probs, &out.values, &out.kl, &out.rewards, &out.advantages, &out.returns})
      m->resize(0, 0);
    out.stats = PPOStats{};
  }

  /// r.scores[b] = fn(prompt b, response b).
  void score(PPORollout<T>& r, const ScoreFn& fn) const {
    check_rollout(r, "score", false);
    r.scores.resize(r.sequences(), 1);
    for (Index b = 0; b < r.sequences(); ++b) r.scores(b, 0) = static_cast<T>(fn(r.prompt(b), r.response(b)));
  }

  /// The rollout-time quantities: old log-probs and values (policy, dropout off), reference
  /// log-probs (adapters disabled, restored after, also on an exception), then compute_advantages.
  void evaluate(PPORollout<T>& r) {
    check_rollout(r, "evaluate", false);
    const Index n = r.layout.rows();
    // Dropout off for the rollout-time quantities (a mode switch walks the module tree by name, so
    // only when needed).
    const bool was_training = policy_->training(), head_training = value_head_->training();
    if (was_training) policy_->eval();
    if (head_training) value_head_->eval();
    try {
      policy_->forward(r.ids, r.layout, eval_logits_, eval_cache_);
      value_head_->forward(eval_cache_.hidden, r.values, eval_vcache_);
      token_log_probs(r, eval_logits_, r.log_probs);
      {
        typename detail::ReferenceSwitch<T>::Scope guard(ref_switch_);
        policy_->forward(r.ids, r.layout, eval_logits_, ref_cache_);  // own cache: the hosts keep no LoRA terms
      }
      token_log_probs(r, eval_logits_, r.ref_log_probs);
    } catch (...) {
      if (was_training) policy_->train();
      if (head_training) value_head_->train();
      throw;
    }
    if (was_training) policy_->train();
    if (head_training) value_head_->train();
    for (Index i = 0; i < n; ++i)
      if (!action_row(r, i)) r.values(i, 0) = T(0);
    compute_advantages(r);
  }

  /// From r.scores, r.log_probs, r.ref_log_probs and r.values (each [B·S, 1], masked rows ignored)
  /// and the current β: r.kl, r.rewards, r.advantages, r.returns and r.stats's rollout figures.
  void compute_advantages(PPORollout<T>& r) const {
    check_rollout(r, "compute_advantages", true);
    const Index B = r.sequences(), S = r.layout.seq, n = r.layout.rows();
    kl_estimate<T>(r.log_probs, r.ref_log_probs, options_.kl_estimator, r.kl);
    for (Matrix<T>* m : {&r.rewards, &r.advantages, &r.returns})
      if (m->rows() != n || m->cols() != 1) m->resize(n, 1);
    r.rewards.setZero();
    r.advantages.setZero();
    r.returns.setZero();
    const double beta = kl_coef_, gamma = options_.gamma, lam = options_.lam;
    PPOStats st;
    st.kl_coef = beta;
    double count = 0.0, sum_a = 0.0;
    for (Index b = 0; b < B; ++b) {
      const Index t0 = r.prompt_length(b) - 1, t1 = r.layout.length(b) - 2;  // action rows t0 .. t1
      double kl_sum = 0.0;
      for (Index t = t0; t <= t1; ++t) {
        const Index i = b * S + t;
        const double kl = static_cast<double>(r.kl(i, 0));
        kl_sum += kl;
        r.rewards(i, 0) = static_cast<T>(-beta * kl);  // r_t = −β kl_t
      }
      r.rewards(b * S + t1, 0) += r.scores(b, 0);  // + s_b on the last response token
      st.score += static_cast<double>(r.scores(b, 0));
      st.kl += kl_sum;
      st.non_score_reward += -beta * kl_sum;
      st.response_length += static_cast<double>(t1 - t0 + 1);
      double next_value = 0.0, last = 0.0;
      for (Index t = t1; t >= t0; --t) {  // GAE, backwards
        const Index i = b * S + t;
        const double v = static_cast<double>(r.values(i, 0));
        const double delta = static_cast<double>(r.rewards(i, 0)) + gamma * next_value - v;  // δ_t
        last = delta + gamma * lam * last;                                                   // A_t
        r.advantages(i, 0) = static_cast<T>(last);
        r.returns(i, 0) = static_cast<T>(last + v);  // R_t = A_t + V_t
        next_value = v;
        sum_a += last;
        count += 1.0;
      }
    }
    // Explained variance of the old values (population variances over the response tokens).
    double mr = 0.0, me = 0.0;
    for_actions(r, [&](Index i) {
      mr += static_cast<double>(r.returns(i, 0));
      me += static_cast<double>(r.returns(i, 0) - r.values(i, 0));
    });
    mr /= count;
    me /= count;
    double vr = 0.0, ve = 0.0;
    for_actions(r, [&](Index i) {
      const double ret = static_cast<double>(r.returns(i, 0)), err = ret - static_cast<double>(r.values(i, 0));
      vr += (ret - mr) * (ret - mr);
      ve += (err - me) * (err - me);
    });
    st.explained_variance = vr > 0.0 ? 1.0 - ve / vr : std::numeric_limits<double>::quiet_NaN();
    if (options_.whiten_advantages) {  // Â = (A − mean) / sqrt(var + 1e-8), unbiased var (TRL's masked_whiten)
      const double mean = sum_a / count;
      double var = 0.0;
      for_actions(r, [&](Index i) {
        const double d = static_cast<double>(r.advantages(i, 0)) - mean;
        var += d * d;
      });
      var = count > 1.0 ? var / (count - 1.0) : 0.0;
      const double inv = 1.0 / std::sqrt(var + 1e-8);
      for_actions(r, [&](Index i) {
        r.advantages(i, 0) = static_cast<T>((static_cast<double>(r.advantages(i, 0)) - mean) * inv);
      });
    }
    const double inv_b = 1.0 / static_cast<double>(B);
    st.score *= inv_b;
    st.kl *= inv_b;
    st.non_score_reward *= inv_b;
    st.reward = st.score + st.non_score_reward;
    st.response_length *= inv_b;
    r.stats = st;
  }

  /// The PPO loss of the rollout's sequences `sequences` (indices into r) under the current policy
  /// and value head; with `backward`, accumulates (+=) the gradients of every trainable parameter of
  /// both (zero them before).
  PPOLossStats minibatch_loss(const PPORollout<T>& r, const std::vector<Index>& sequences, bool backward = true) {
    check_rollout(r, "minibatch_loss", true);
    check_advantages(r);
    const Index m = static_cast<Index>(sequences.size()), S = r.layout.seq, n = m * S;
    if (m == 0) throw ShapeError("PPOTrainer::minibatch_loss: no sequences");
    // Gather the minibatch (sizes fixed for a fixed m and S: no allocation after the first call).
    mb_ids_.resize(static_cast<std::size_t>(n));
    mb_target_.resize(static_cast<std::size_t>(n));
    mb_layout_.batch = m;
    mb_layout_.seq = S;
    mb_layout_.left_padded = false;
    mb_layout_.lengths.resize(static_cast<std::size_t>(m));
    for (Matrix<T>* x : {&mb_old_lp_, &mb_old_v_, &mb_adv_, &mb_ret_})
      if (x->rows() != n || x->cols() != 1) x->resize(n, 1);
    for (Index j = 0; j < m; ++j) {
      const Index b = sequences[static_cast<std::size_t>(j)];
      if (b < 0 || b >= r.sequences())
        throw ShapeError("PPOTrainer::minibatch_loss: sequence index " + std::to_string(b) + " outside the rollout's " +
                         std::to_string(r.sequences()) + " sequences");
      mb_layout_.lengths[static_cast<std::size_t>(j)] = r.layout.length(b);
      for (Index t = 0; t < S; ++t) {
        const std::size_t dst = static_cast<std::size_t>(j * S + t), src = static_cast<std::size_t>(b * S + t);
        mb_ids_[dst] = r.ids[src];
        mb_target_[dst] = r.action(b, t) ? r.ids[src + 1] : Index(-1);
      }
      mb_old_lp_.middleRows(j * S, S) = r.log_probs.middleRows(b * S, S);
      mb_old_v_.middleRows(j * S, S) = r.values.middleRows(b * S, S);
      mb_adv_.middleRows(j * S, S) = r.advantages.middleRows(b * S, S);
      mb_ret_.middleRows(j * S, S) = r.returns.middleRows(b * S, S);
    }
    policy_->forward(mb_ids_, mb_layout_, logits_, cache_);
    value_head_->forward(cache_.hidden, values_, vcache_);
    const Index V = logits_.cols();
    Index N = 0;
    for (Index i = 0; i < n; ++i) N += mb_target_[static_cast<std::size_t>(i)] >= 0 ? 1 : 0;
    const double inv_n = 1.0 / static_cast<double>(N), inv_tau = 1.0 / detail::ppo_temperature(options_);
    const double eps = options_.cliprange, c = options_.cliprange_value, vf = options_.vf_coef,
                 ent = options_.entropy_coef;
    if (backward) {
      if (dlogits_.rows() != n || dlogits_.cols() != V) dlogits_.resize(n, V);
      if (dvalues_.rows() != n || dvalues_.cols() != 1) dvalues_.resize(n, 1);
      dvalues_.setZero();
    }
    if (z_.size() != V) z_.resize(V);
    PPOLossStats st;
    st.tokens = N;
    // max(a, b)'s derivative as torch's maximum: the larger side, half each on a tie.
    auto max_grad = [](double a, double b, double da, double db) {
      return a > b ? da : (a < b ? db : 0.5 * (da + db));
    };
    for (Index i = 0; i < n; ++i) {
      const Index y = mb_target_[static_cast<std::size_t>(i)];
      if (y < 0) {
        if (backward) dlogits_.row(i).setZero();
        continue;
      }
      if (y >= V)
        throw ShapeError("PPOTrainer::minibatch_loss: token id " + std::to_string(y) + " outside the vocabulary of " +
                         std::to_string(V));
      // log p = z/τ − lse, H = lse − Σ p z/τ  (z/τ in z_)
      z_ = logits_.row(i).template cast<double>() * inv_tau;
      const double mx = z_.maxCoeff();
      const double lse = mx + std::log((z_.array() - mx).exp().sum());
      const double lp = z_(y) - lse;
      const double H = lse - ((z_.array() - lse).exp() * z_.array()).sum();
      // policy term
      const double A = static_cast<double>(mb_adv_(i, 0)), d_lp = lp - static_cast<double>(mb_old_lp_(i, 0));
      const double rho = std::exp(d_lp), rho_c = std::clamp(rho, 1.0 - eps, 1.0 + eps);
      const double pg1 = -A * rho, pg2 = -A * rho_c;
      st.policy_loss += std::max(pg1, pg2);
      st.clip_fraction += pg2 > pg1 ? 1.0 : 0.0;
      st.approx_kl += 0.5 * d_lp * d_lp;
      st.entropy += H;
      // value term
      const double v = static_cast<double>(values_(i, 0)), v_old = static_cast<double>(mb_old_v_(i, 0));
      const double R = static_cast<double>(mb_ret_(i, 0));
      const double vc = std::clamp(v, v_old - c, v_old + c);
      const double vf1 = (v - R) * (v - R), vf2 = (vc - R) * (vc - R);
      st.value_loss += 0.5 * std::max(vf1, vf2);
      st.value_clip_fraction += vf2 > vf1 ? 1.0 : 0.0;
      if (!backward) continue;
      // ∂L/∂log π = ∂max/∂ρ · ρ / N  (clamp passes its bounds)
      const bool rho_in = rho >= 1.0 - eps && rho <= 1.0 + eps;
      const double g_lp = max_grad(pg1, pg2, -A * rho, rho_in ? -A * rho : 0.0) * inv_n;
      const double g_h = -ent * inv_n;  // ∂L/∂H_i
      // ∂L/∂z = [g_lp (onehot(y) − p) − g_h p (log p + H)] / τ
      auto row = dlogits_.row(i);
      for (Index k = 0; k < V; ++k) {
        const double logp = z_(k) - lse, p = std::exp(logp);
        row(k) = static_cast<T>((-g_lp * p - g_h * p * (logp + H)) * inv_tau);
      }
      row(y) += static_cast<T>(g_lp * inv_tau);
      // ∂L/∂V = vf · ½ ∂max/∂V / N
      const bool v_in = v >= v_old - c && v <= v_old + c;
      dvalues_(i, 0) =
          static_cast<T>(vf * 0.5 * max_grad(vf1, vf2, 2.0 * (v - R), v_in ? 2.0 * (vc - R) : 0.0) * inv_n);
    }
    st.policy_loss *= inv_n;
    st.value_loss *= inv_n;
    st.entropy *= inv_n;
    st.approx_kl *= inv_n;
    st.clip_fraction *= inv_n;
    st.value_clip_fraction *= inv_n;
    st.loss = st.policy_loss + vf * st.value_loss - ent * st.entropy;
    if (backward) {
      value_head_->backward(vcache_, dvalues_, &dhidden_);  // ∂L/∂h = ∂L/∂V w   [n, d]
      policy_->backward(cache_, dlogits_, &dhidden_);
    }
    return st;
  }

  /// ppo_epochs passes over the rollout in shuffled minibatches (zero_grad, minibatch_loss,
  /// optional clipping, optimizer.step()), then the adaptive KL update. Needs evaluate (or
  /// compute_advantages) first. Returns r.stats with the minibatch means.
  PPOStats update(PPORollout<T>& r, Optimizer<T>& optimizer, Rng& rng) {
    check_rollout(r, "update", true);
    check_advantages(r);
    const Index B = r.sequences(), mb = options_.mini_batch_size;
    if (B % mb != 0)
      throw ConfigError("PPOTrainer::update: mini_batch_size " + std::to_string(mb) + " does not divide the " +
                        std::to_string(B) + " sequences of the rollout");
    perm_.resize(static_cast<std::size_t>(B));
    std::iota(perm_.begin(), perm_.end(), Index(0));
    mb_index_.resize(static_cast<std::size_t>(mb));
    PPOStats st = r.stats;
    double loss = 0, pg = 0, vl = 0, ent = 0, akl = 0, cf = 0, vcf = 0;
    for (Index e = 0; e < options_.ppo_epochs; ++e) {
      for (Index i = B - 1; i > 0; --i)  // Fisher–Yates
        std::swap(perm_[static_cast<std::size_t>(i)],
                  perm_[static_cast<std::size_t>(rng.uniform_int(static_cast<std::uint64_t>(i + 1)))]);
      for (Index k = 0; k < B / mb; ++k) {
        std::copy(perm_.begin() + static_cast<std::ptrdiff_t>(k * mb),
                  perm_.begin() + static_cast<std::ptrdiff_t>((k + 1) * mb), mb_index_.begin());
        optimizer.zero_grad();
        const PPOLossStats s = minibatch_loss(r, mb_index_, true);
        if (options_.max_grad_norm > 0.0) clip_grad_norm<T>(params_, options_.max_grad_norm);
        optimizer.step();
        loss += s.loss;
        pg += s.policy_loss;
        vl += s.value_loss;
        ent += s.entropy;
        akl += s.approx_kl;
        cf += s.clip_fraction;
        vcf += s.value_clip_fraction;
        ++st.minibatches;
      }
    }
    const double inv = 1.0 / static_cast<double>(st.minibatches);
    st.loss = loss * inv;
    st.policy_loss = pg * inv;
    st.value_loss = vl * inv;
    st.entropy = ent * inv;
    st.approx_kl = akl * inv;
    st.clip_fraction = cf * inv;
    st.value_clip_fraction = vcf * inv;
    if (options_.adaptive_kl)
      kl_coef_ = adaptive_kl_update(kl_coef_, r.stats.kl, options_.target_kl, options_.kl_horizon, B);
    return st;
  }

  /// One PPO iteration: generate, score with `fn`, evaluate, update (the rollout is left in `r`).
  PPOStats step(const std::vector<std::vector<Index>>& prompts, const ScoreFn& fn, Optimizer<T>& optimizer, Rng& rng,
                PPORollout<T>& r) {
    generate(prompts, rng, r);
    score(r, fn);
    evaluate(r);
    return update(r, optimizer, rng);
  }

 private:
  static bool action_row(const PPORollout<T>& r, Index i) { return r.action(i / r.layout.seq, i % r.layout.seq); }

  template <class F>
  static void for_actions(const PPORollout<T>& r, F&& f) {
    for (Index b = 0; b < r.sequences(); ++b)
      for (Index t = r.prompt_length(b) - 1; t + 1 < r.layout.length(b); ++t) f(b * r.layout.seq + t);
  }

  /// Per-token log-probs of the sampled tokens under softmax(z / τ) into out [B·S, 1] (0 when masked).
  void token_log_probs(const PPORollout<T>& r, const Matrix<T>& logits, Matrix<T>& out) const {
    const Index n = r.layout.rows(), V = logits.cols(), S = r.layout.seq;
    const double inv_tau = 1.0 / detail::ppo_temperature(options_);
    out.setZero(n, 1);
    for (Index i = 0; i < n; ++i) {
      if (!action_row(r, i)) continue;
      const Index y = r.ids[static_cast<std::size_t>(i + 1)];
      if (y < 0 || y >= V)
        throw ShapeError("PPOTrainer: token id " + std::to_string(y) + " at sequence " + std::to_string(i / S) +
                         " outside the vocabulary of " + std::to_string(V));
      const auto z = logits.row(i);
      const double mx = static_cast<double>(z.maxCoeff()) * inv_tau;
      double s = 0.0;
      for (Index k = 0; k < V; ++k) s += std::exp(static_cast<double>(z(k)) * inv_tau - mx);
      out(i, 0) = static_cast<T>(static_cast<double>(z(y)) * inv_tau - mx - std::log(s));
    }
  }

  void check_rollout(const PPORollout<T>& r, const char* who, bool evaluated) const {
    // Runs every step: the name is built only when a check fails.
    const auto w = [who] { return std::string("PPOTrainer::") + who; };
    if (!r.layout.ok(static_cast<Index>(r.ids.size()))) r.layout.validate(w(), static_cast<Index>(r.ids.size()));
    if (r.layout.left_padded && r.layout.padded()) throw ShapeError(w() + ": the rollout must be right-padded");
    const Index B = r.sequences(), n = r.layout.rows();
    if (static_cast<Index>(r.prompt_lengths.size()) != B)
      throw ShapeError(w() + ": " + std::to_string(r.prompt_lengths.size()) + " prompt lengths for " +
                       std::to_string(B) + " sequences");
    for (Index b = 0; b < B; ++b)
      if (r.prompt_length(b) < 1 || r.prompt_length(b) >= r.layout.length(b))
        throw ShapeError(w() + ": sequence " + std::to_string(b) + " has a prompt of " +
                         std::to_string(r.prompt_length(b)) + " tokens and length " +
                         std::to_string(r.layout.length(b)) +
                         " (expected a prompt of >= 1 tokens and a response of >= 1)");
    if (!evaluated) return;
    const auto column = [](const Matrix<T>& m, Index rows) { return m.rows() == rows && m.cols() == 1; };
    if (!column(r.scores, B) || !column(r.log_probs, n) || !column(r.ref_log_probs, n) || !column(r.values, n)) {
      const std::string name(who);
      check::shape("PPORollout", name, "scores", r.scores.rows(), r.scores.cols(), B, 1);
      check::shape("PPORollout", name, "log_probs", r.log_probs.rows(), r.log_probs.cols(), n, 1);
      check::shape("PPORollout", name, "ref_log_probs", r.ref_log_probs.rows(), r.ref_log_probs.cols(), n, 1);
      check::shape("PPORollout", name, "values", r.values.rows(), r.values.cols(), n, 1);
    }
    if (!r.scores.allFinite() || !r.values.allFinite())
      throw NumericError(w() + ": the rollout's scores or values are not finite");
  }

  void check_advantages(const PPORollout<T>& r) const {
    const Index n = r.layout.rows();
    if (r.advantages.rows() != n || r.returns.rows() != n || r.advantages.cols() != 1 || r.returns.cols() != 1)
      throw ConfigError("PPOTrainer: the rollout has no advantages of its " + std::to_string(n) +
                        " rows (run evaluate or compute_advantages first)");
  }

  Model* policy_;
  ValueHead<T>* value_head_;
  PPOOptions options_;
  double kl_coef_;
  std::vector<AdaptedLinear<T>*> hosts_;
  detail::ReferenceSwitch<T> ref_switch_;  ///< the reference: adapters switched off
  std::vector<NamedParameter<T>> params_;
  // evaluate
  typename Model::Cache eval_cache_, ref_cache_;
  typename ValueHead<T>::Cache eval_vcache_;
  Matrix<T> eval_logits_;
  // minibatch
  std::vector<Index> mb_ids_, mb_target_, perm_, mb_index_;
  SequenceLayout mb_layout_;
  typename Model::Cache cache_;
  typename ValueHead<T>::Cache vcache_;
  Matrix<T> logits_, values_, dlogits_, dvalues_, dhidden_, mb_old_lp_, mb_old_v_, mb_adv_, mb_ret_;
  Eigen::Matrix<double, 1, Eigen::Dynamic> z_;
};

}  // namespace peft
