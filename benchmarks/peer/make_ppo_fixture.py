#!/usr/bin/env python3
"""Reference for one PPO minibatch update of a causal LM with LoRA and a value head
(include/peft/train/ppo.hpp), by torch autograd through transformers' LlamaForCausalLM with PEFT's LoRA.

Writes tests/data/ppo/ppo_expected.safetensors (all F64; see tests/data/ppo/README.md). The model is the
tiny Llama of tests/data/llama/llama with the PEFT adapter tests/data/llama/llama_lora (r 4, alpha 8,
q_proj + v_proj), in float64 throughout (make_llama_fixtures.float64_throughout), and a value head
torch.nn.Linear(32, 1) (TRL's ValueHead) on the last hidden state (after the final norm), sharing the
backbone as TRL's AutoModelForCausalLMWithValueHead does.

A FIXED rollout of 4 sequences (random prompt + response ids, right-padded to 9, pad id 0):
  policy_log_probs, values    the current policy's log softmax(z / T)[next token] and V on each row that
                              predicts a response token (row t scores token t + 1; 0 elsewhere)
  ref_log_probs               the same with the adapter disabled (PeftModel.disable_adapter())
  old_log_probs, old_values   the rollout-time quantities: the current ones plus fixed noise, so that ratios
                              differ from 1 and both clips occur
  scores                      one score per sequence
Then TRL's PPOTrainer arithmetic (compute_rewards with a KL estimator, compute_advantages: GAE and
masked_whiten, returns = advantages + values; loss(): clipped policy loss, clipped value loss, masked
means) with an entropy bonus, for the minibatch of sequences [3, 1]; the loss's gradient for every
lora_A / lora_B and the value head. TRL itself is not installed in the peer environment: its formulas are
written out below (trl/trainer/ppo_trainer.py, classic version, and trl/core.py's masked_whiten).

Usage: ~/.cache/peft-peer/bin/python benchmarks/peer/make_ppo_fixture.py
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_llama_fixtures as base  # noqa: E402  (also patches softmax to keep float64)
import peft  # noqa: E402
import safetensors  # noqa: E402
import transformers  # noqa: E402
from peft import PeftModel  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

PROMPTS = [3, 4, 2, 3]
RESPONSES = [5, 3, 6, 4]
S = 9
MINIBATCH = [3, 1]
HP = dict(temperature=0.8, gamma=0.95, lam=0.9, kl_coef=0.05, cliprange=0.2, cliprange_value=0.2, vf_coef=0.5,
          entropy_coef=0.01)
KL_ESTIMATOR = 3  # Schulman's k3: (e^r - 1) - r, r = log pi_ref - log pi


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


def masked_whiten(x, mask):
    """trl.core.masked_whiten (shift_mean=True, unbiased variance)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    var = var * n / (n - 1)
    return (x - mean) * torch.rsqrt(var + 1e-8)


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
    torch.use_deterministic_algorithms(True)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    data = os.path.join(root, "tests", "data")
    m32 = LlamaForCausalLM.from_pretrained(os.path.join(data, "llama", "llama"), dtype=torch.float32,
                                           attn_implementation="eager").eval()
    m64 = LlamaForCausalLM(m32.config).eval()
    m64.load_state_dict(m32.state_dict())
    m64 = m64.double()
    base.float64_throughout(m64)
    pm = PeftModel.from_pretrained(m64, os.path.join(data, "llama", "llama_lora"), is_trainable=True).double().eval()
    hidden = m32.config.hidden_size
    vocab = m32.config.vocab_size

    g = torch.Generator().manual_seed(1515)
    v_head = torch.nn.Linear(hidden, 1, dtype=torch.float64)
    with torch.no_grad():
        v_head.weight.copy_(0.3 * torch.randn(v_head.weight.shape, generator=g, dtype=torch.float64))
        v_head.bias.copy_(0.1 * torch.randn(v_head.bias.shape, generator=g, dtype=torch.float64))

    B = len(PROMPTS)
    ids = torch.zeros(B, S, dtype=torch.long)
    attn = torch.zeros(B, S, dtype=torch.long)
    action = torch.zeros(B, S, dtype=torch.float64)  # rows that predict a response token
    for b, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        ids[b, :p + r] = torch.randint(1, vocab, (p + r,), generator=g)
        attn[b, :p + r] = 1
        action[b, p - 1:p + r - 1] = 1
    T = HP["temperature"]

    def run(rows, adapters=True):
        """Per-row log-prob of the next token under softmax(z / T), entropy, value: [len(rows), S] each."""
        inner = pm.base_model.model  # LlamaForCausalLM with the LoRA layers injected
        x, m = ids[rows], attn[rows]
        if adapters:
            h = inner.model(input_ids=x, attention_mask=m).last_hidden_state  # after the final norm
            z = inner.lm_head(h) / T
        else:
            with pm.disable_adapter():
                h = inner.model(input_ids=x, attention_mask=m).last_hidden_state
                z = inner.lm_head(h) / T
        logp_all = torch.log_softmax(z, dim=-1)
        nxt = torch.cat([x[:, 1:], torch.zeros(len(rows), 1, dtype=torch.long)], dim=1)
        logp = torch.gather(logp_all, 2, nxt.unsqueeze(2)).squeeze(2)
        entropy = torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)  # TRL's entropy_from_logits
        values = v_head(h).squeeze(-1)
        mask = action[rows]
        return logp * mask, entropy, values * mask

    all_rows = list(range(B))
    with torch.no_grad():
        lp, _, vals = run(all_rows)
        ref_lp, _, _ = run(all_rows, adapters=False)
        old_lp = (lp + 0.25 * torch.randn(B, S, generator=g, dtype=torch.float64)) * action
        old_v = (vals + 0.6 * torch.randn(B, S, generator=g, dtype=torch.float64)) * action
        scores = torch.randn(B, generator=g, dtype=torch.float64)

        # compute_rewards: r_t = -beta * kl_t, + score on the last response token
        r = ref_lp - old_lp
        kl = (-r if KL_ESTIMATOR == 1 else (0.5 * r * r if KL_ESTIMATOR == 2 else torch.expm1(r) - r)) * action
        rewards = -HP["kl_coef"] * kl
        for b, (p, n) in enumerate(zip(PROMPTS, RESPONSES)):
            rewards[b, p + n - 2] += scores[b]
        # compute_advantages (GAE over the masked rows; masked values and rewards are 0)
        values = old_v * action
        rewards = rewards * action
        lastgaelam = torch.zeros(B, dtype=torch.float64)
        adv_rev = []
        for t in reversed(range(S)):
            nextvalues = values[:, t + 1] if t < S - 1 else torch.zeros(B, dtype=torch.float64)
            delta = rewards[:, t] + HP["gamma"] * nextvalues - values[:, t]
            lastgaelam = delta + HP["gamma"] * HP["lam"] * lastgaelam
            adv_rev.append(lastgaelam)
        advantages = torch.stack(adv_rev[::-1]).transpose(0, 1)
        # a prompt row's GAE carries the response's: TRL's arrays hold the response only, so mask here
        advantages = advantages * action
        returns = (advantages + values) * action
        white = masked_whiten(advantages, action) * action

    # loss() on the minibatch
    rows = MINIBATCH
    lp_new, ent, vpred = run(rows)
    mask = action[rows]
    A, R, olp, ov = white[rows], returns[rows], old_lp[rows], old_v[rows]
    vclip = torch.clamp(vpred, ov - HP["cliprange_value"], ov + HP["cliprange_value"])
    vf1 = (vpred - R) ** 2
    vf2 = (vclip - R) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf1, vf2), mask)
    vf_clipfrac = masked_mean(torch.gt(vf2, vf1).double(), mask)
    ratio = torch.exp(lp_new - olp)
    pg1 = -A * ratio
    pg2 = -A * torch.clamp(ratio, 1.0 - HP["cliprange"], 1.0 + HP["cliprange"])
    pg_loss = masked_mean(torch.max(pg1, pg2), mask)
    pg_clipfrac = masked_mean(torch.gt(pg2, pg1).double(), mask)
    entropy = masked_mean(ent, mask)
    approx_kl = 0.5 * masked_mean((lp_new - olp) ** 2, mask)
    loss = pg_loss + HP["vf_coef"] * vf_loss - HP["entropy_coef"] * entropy
    loss.backward()
    print("loss", loss.item(), "pg", pg_loss.item(), "vf", vf_loss.item(), "entropy", entropy.item(),
          "clipfrac", pg_clipfrac.item(), "vf_clipfrac", vf_clipfrac.item(), "approx_kl", approx_kl.item())
    assert 0 < pg_clipfrac.item() < 1 and 0 < vf_clipfrac.item() < 1, "both clips must occur, and not everywhere"

    f = lambda x: x.detach().double().contiguous()  # noqa: E731
    out = {"input_ids": ids.double(), "attention_mask": attn.double(),
           "prompt_lengths": torch.tensor(PROMPTS, dtype=torch.float64),
           "policy_log_probs": lp, "values": vals, "ref_log_probs": ref_lp, "old_log_probs": old_lp,
           "old_values": old_v, "scores": scores, "kl": kl, "rewards": rewards, "advantages": white,
           "returns": returns, "minibatch": torch.tensor(MINIBATCH, dtype=torch.float64),
           "loss": loss, "policy_loss": pg_loss, "value_loss": vf_loss, "entropy": entropy, "approx_kl": approx_kl,
           "clip_fraction": pg_clipfrac, "value_clip_fraction": vf_clipfrac,
           "v_head.summary.weight": v_head.weight, "v_head.summary.bias": v_head.bias.reshape(1, 1),
           "grad.v_head.summary.weight": v_head.weight.grad, "grad.v_head.summary.bias": v_head.bias.grad.reshape(1, 1),
           "kl_estimator": torch.tensor([float(KL_ESTIMATOR)])}
    for k, v in HP.items():
        out["hp." + k] = torch.tensor([v], dtype=torch.float64)
    n = 0
    for name, p in pm.named_parameters():
        if p.requires_grad:
            out["grad." + name.replace(".default", "")] = p.grad
            n += 1
    assert n == 8, n
    out = {k: f(v).reshape(v.shape if v.dim() > 0 else (1,)) for k, v in out.items()}
    source = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
              f"safetensors {safetensors.__version__}; benchmarks/peer/make_ppo_fixture.py")
    os.makedirs(os.path.join(data, "ppo"), exist_ok=True)
    path = os.path.join(data, "ppo", "ppo_expected.safetensors")
    save_file(out, path, metadata={"source": source})
    print("wrote", path, "|", source)


if __name__ == "__main__":
    sys.exit(main())
