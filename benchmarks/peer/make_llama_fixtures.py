#!/usr/bin/env python3
"""Reference fixtures for the Llama-family causal LMs (include/peft/models/llama.hpp), made by the real
transformers and peft packages (no Hugging Face hub download: the models are built from a config with a
fixed seed).

Writes tests/data/llama/ (see the README.md there):

  llama/                 tiny LlamaForCausalLM (GQA 4 heads / 2 kv heads, head_dim 16 != hidden / heads,
                         llama3 rope scaling with all three frequency bands, untied lm_head), float32,
                         save_pretrained (config.json + model.safetensors)
  qwen2/                 tiny Qwen2ForCausalLM (q/k/v biases, tied embeddings), float32, saved sharded
                         (model.safetensors.index.json + 2+ shards)
  <name>_lora/           the PEFT LoRA adapter (r=4, alpha=8, q_proj + v_proj, lora_B non-zero) as
                         PeftModel.save_pretrained writes it
  <name>_expected.safetensors  (F64 unless said)
      input_ids [B, S] (as F64), attention_mask [B, S], labels [B, S] (-100: prompt and padding)
      logits_f32 [B, S, V]   model in float32, padding positions included (compare valid rows only)
      logits_f64 [B, S, V]   the same model cast to float64
      loss_f32, loss_f64 [1] model(..., labels=labels).loss (ForCausalLMLoss: shifted, mean over kept)
      lora_logits_f64, lora_loss_f64     with the LoRA adapter active (float64)
      grad.<peft key> (float64)          gradient of lora_loss_f64 for every lora_A / lora_B
      greedy_prompt [1, P], greedy_ids [1, P + N]          model.generate(do_sample=False), float32
      lora_greedy_ids [1, P + N]                         the same with the adapter active

Usage: ~/.cache/peft-peer/bin/python benchmarks/peer/make_llama_fixtures.py tests/data/llama
"""
import argparse
import math
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

import peft
import safetensors
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

B, S = 2, 7
LENGTHS = [7, 5]
PROMPT = 2  # labels of the first PROMPT tokens of each sequence are -100
GEN_NEW = 6


def source():
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
            f"safetensors {safetensors.__version__}; benchmarks/peer/make_llama_fixtures.py")


def randomize(model, seed):
    """Replace the tiny init (std 0.02) with larger values so that every term matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)


def batch(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    mask = torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(LENGTHS):
        mask[b, :n] = 1
        ids[b, n:] = 0  # pad id 0
    labels = ids.clone()
    labels[:, :PROMPT] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def inv_freq_f64(config):
    """HF's inverse frequencies (default / llama3, modeling_rope_utils.py) in float64."""
    rp = config.rope_parameters
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    inv = 1.0 / (rp["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    if rp.get("rope_type", "default") == "llama3":
        factor, lo, hi = rp["factor"], rp["low_freq_factor"], rp["high_freq_factor"]
        old = rp["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wl = 2 * math.pi / inv
        scaled = torch.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wl < hi_wl) * ~(wl > lo_wl)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def rotary_in_f64(model, config):
    """HF computes cos / sin in float32 even for a float64 model (LlamaRotaryEmbedding.forward). The float64
    reference computes them in float64 (same formulas), so that a float64 re-implementation matches it to
    rounding; it differs from HF's float64 model by float32 rounding of the angles only (checked below)."""
    rot = model.model.rotary_emb
    if isinstance(rot.inv_freq, torch.Tensor) and rot.inv_freq.dtype == torch.float64 and hasattr(rot, "_f64"):
        return
    inv = inv_freq_f64(config)
    assert torch.allclose(inv.float(), rot.inv_freq.float(), rtol=1e-6, atol=0), (inv, rot.inv_freq)
    rot.inv_freq = inv

    def forward(x, position_ids):
        freqs = position_ids[..., None].double() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rot.forward = forward
    rot._f64 = True


def for_causal_lm_loss_f64(logits, labels):
    """transformers' ForCausalLMLoss (loss_utils.py) without its logits.float(): shifted labels, -100 ignored,
    mean over the kept targets, in the logits' dtype."""
    labels = torch.nn.functional.pad(labels, (0, 1), value=-100)
    shift = labels[..., 1:].contiguous().view(-1)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift, ignore_index=-100)


def float64_throughout(model):
    """HF's float64 model still rounds to float32 in three places: RMSNorm (hidden_states.to(float32)), the
    eager attention softmax (dtype=torch.float32) and the rotary angles. Patch those to compute in float64 (the
    loss: for_causal_lm_loss_f64), so that the reference is float64 to rounding."""
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            def fwd(x, m=m):
                return m.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + m.variance_epsilon))
            m.forward = fwd
    rotary_in_f64(model, model.config)


_softmax = torch.nn.functional.softmax


def softmax_keep_f64(input, dim=None, _stacklevel=3, dtype=None):
    if input.dtype == torch.float64 and dtype == torch.float32:
        dtype = None
    return _softmax(input, dim=dim, _stacklevel=_stacklevel, dtype=dtype)


torch.nn.functional.softmax = softmax_keep_f64  # float64 inputs stay float64; float32 runs are unchanged


def make(name, cls, config, out_dir, seed, shard):
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize(model, seed + 1)
    if config.tie_word_embeddings:
        model.tie_weights()
    mdir = os.path.join(out_dir, name)
    shutil.rmtree(mdir, ignore_errors=True)
    if shard:
        model.save_pretrained(mdir, max_shard_size="40KB")
    else:
        model.save_pretrained(mdir)

    ids, mask, labels = batch(config.vocab_size, seed + 2)
    exp = {"input_ids": ids.double(), "attention_mask": mask.double(), "labels": labels.double()}
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, labels=labels)
        exp["logits_f32"] = o.logits.double()
        exp["loss_f32"] = o.loss.double().reshape(1)
        m64 = cls(config).eval()
        m64.load_state_dict(model.state_dict())
        m64 = m64.double()
        float64_throughout(m64)
        o = m64(input_ids=ids, attention_mask=mask)
        exp["logits_f64"] = o.logits
        exp["loss_f64"] = for_causal_lm_loss_f64(o.logits, labels).reshape(1)
        valid = mask.bool()
        diff = ((exp["logits_f32"] - o.logits)[valid].abs().max() / o.logits[valid].abs().max()).item()
        assert diff < 1e-5, diff
        print(name, "float32 model vs float64 reference: max rel diff over valid rows", diff)

    prompt = ids[:1, :4]
    with torch.no_grad():
        exp["greedy_prompt"] = prompt.double()
        exp["greedy_ids"] = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GEN_NEW,
                                           do_sample=False, pad_token_id=0).double()

    # LoRA (float64 model so that the gradients compare at double precision).
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pm = get_peft_model(m64, lcfg)
    g = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    o = pm(input_ids=ids, attention_mask=mask)
    loss = for_causal_lm_loss_f64(o.logits, labels)
    loss.backward()
    exp["lora_logits_f64"] = o.logits.detach()
    exp["lora_loss_f64"] = loss.detach().reshape(1)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            key = n.replace(".default", "")
            exp["grad." + key] = p.grad.detach().clone()
    adir = os.path.join(out_dir, name + "_lora")
    shutil.rmtree(adir, ignore_errors=True)
    pm.save_pretrained(adir)
    os.remove(os.path.join(adir, "README.md"))  # PEFT's model-card template, not needed
    # greedy with the adapter: PEFT's saved directory loaded onto a float32 copy of the base model
    base32 = cls(config).eval()
    base32.load_state_dict(model.state_dict())
    if config.tie_word_embeddings:
        base32.tie_weights()
    pm32 = PeftModel.from_pretrained(base32, adir).eval()
    with torch.no_grad():
        exp["lora_greedy_ids"] = pm32.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                               max_new_tokens=GEN_NEW, do_sample=False, pad_token_id=0).double()
        # the adapter must change something, or the test would not test it
        assert not torch.equal(pm32(input_ids=prompt).logits, model(input_ids=prompt).logits)
    exp = {k: v.contiguous().double() for k, v in exp.items()}
    save_file(exp, os.path.join(out_dir, name + "_expected.safetensors"), metadata={"source": source()})
    print(name, "loss", exp["loss_f64"].item(), "lora loss", exp["lora_loss_f64"].item())
    print(name, "greedy", exp["greedy_ids"].long().tolist(), "lora greedy", exp["lora_greedy_ids"].long().tolist())


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":  # PEFT keeps target_modules in a set: fix its order
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    llama = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, vocab_size=64, rms_norm_eps=1e-5,
                        max_position_embeddings=256, tie_word_embeddings=False,
                        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                        rope_theta=10000.0, attn_implementation="eager")
    qwen = Qwen2Config(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, vocab_size=64, rms_norm_eps=1e-6, max_position_embeddings=128,
                       tie_word_embeddings=True, rope_theta=1000.0, attn_implementation="eager")
    make("llama", LlamaForCausalLM, llama, a.out_dir, 1234, shard=False)
    make("qwen2", Qwen2ForCausalLM, qwen, a.out_dir, 4321, shard=True)
    print(source())


if __name__ == "__main__":
    sys.exit(main())
