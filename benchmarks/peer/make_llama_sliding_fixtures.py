#!/usr/bin/env python3
"""Reference fixtures for sliding-window attention (Mistral's sliding_window, Qwen2's use_sliding_window +
layer_types) in the Llama causal LM (include/peft/models/llama.hpp), made by the real transformers and peft
packages (no Hugging Face hub download: the models are built from a config with a fixed seed; the weights are
replaced as make_llama_fixtures.py does).

Writes into tests/data/llama/ (see the README.md there):

  mistral_sw/   tiny MistralForCausalLM, sliding_window 3 (every layer slides), GQA 4 / 2 heads, head_dim 8,
                untied lm_head, float32, save_pretrained
  qwen2_sw/     tiny Qwen2ForCausalLM, use_sliding_window, sliding_window 3, layer_types
                ["sliding_attention", "full_attention"] (only layer 0 slides), q/k/v biases, tied embeddings
  <m>_lora/     PEFT LoRA (r 4, alpha 8, q_proj + v_proj, lora_B = 0.3 N(0, 1)), PeftModel.save_pretrained
  <m>_expected.safetensors (all F64)
      input_ids, attention_mask, labels [2, 9]   right padding (lengths 9, 6; pad id 0; labels -100 on the
                                                 first 2 tokens and the padding)
      logits_f32 [2, 9, V], loss_f32             float32 model
      logits_f64, loss_f64                       make_llama_fixtures.py's float64 reference
      lora_logits_f64, lora_loss_f64, grad.<PEFT key>   the LoRA adapter active, gradients after one backward
      left_ids, left_mask [2, 9]                 left padding (lengths 9, 5)
      left_logits_f32, left_logits_f64          with position_ids = cumsum(mask) - 1 (generate's rule)
      greedy_prompt [1, 4], greedy_ids [1, 10]   float32 generate(do_sample=False, max_new_tokens=6)
      gen_ids, gen_mask [2, 4] (left-padded prompts, lengths 4, 2), gen_greedy [2, 10]: batched greedy
  mistral_sw_expected.safetensors also holds
      prefix_table [2, 2 layers * 2 * kv_heads * head_dim]   a flat PREFIX_TUNING table (2 virtual tokens,
                                                 N(0, 1), float64) and prefix_logits_f64 [2, 9, V]: PEFT's forward
                                                 with it on the right-padded batch (float64 reference)

Usage: ~/.cache/peft-peer/bin/python benchmarks/peer/make_llama_sliding_fixtures.py tests/data/llama
"""
import argparse
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_llama_fixtures as base  # noqa: E402  (also patches softmax to keep float64)
from peft import LoraConfig, PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

S = 9
WINDOW = 3
GEN_NEW = 6


def source():
    return base.source().replace("make_llama_fixtures.py", "make_llama_sliding_fixtures.py")


def right_batch(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, S), generator=g)
    mask = torch.ones(2, S, dtype=torch.long)
    mask[1, 6:] = 0
    ids[1, 6:] = 0
    labels = ids.clone()
    labels[:, :2] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def left_batch(lengths, width, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), width), generator=g)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, width - n:] = 1
        ids[b, :width - n] = 0
    return ids, mask


def positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def f64(cls, config, model32):
    m = cls(config).eval()
    m.load_state_dict(model32.state_dict())
    m = m.double()
    base.float64_throughout(m)
    return m


def rel_valid(a, b, mask):
    valid = mask.bool()
    return ((a - b)[valid].abs().max() / b[valid].abs().max()).item()


def make(name, cls, config, out_dir, seed, prefix):
    torch.manual_seed(seed)
    model = cls(config).eval()
    base.randomize(model, seed + 1)
    if config.tie_word_embeddings:
        model.tie_weights()
    mdir = os.path.join(out_dir, name)
    shutil.rmtree(mdir, ignore_errors=True)
    model.save_pretrained(mdir)
    V = config.vocab_size
    exp = {}

    ids, mask, labels = right_batch(V, seed + 2)
    exp.update(input_ids=ids, attention_mask=mask, labels=labels)
    lids, lmask = left_batch([S, 5], S, V, seed + 3)
    exp.update(left_ids=lids, left_mask=lmask)
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask, labels=labels)
        exp["logits_f32"], exp["loss_f32"] = o.logits, o.loss.reshape(1)
        exp["left_logits_f32"] = model(input_ids=lids, attention_mask=lmask, position_ids=positions(lmask)).logits
        m64 = f64(cls, config, model)
        o = m64(input_ids=ids, attention_mask=mask)
        exp["logits_f64"] = o.logits
        exp["loss_f64"] = base.for_causal_lm_loss_f64(o.logits, labels).reshape(1)
        exp["left_logits_f64"] = m64(input_ids=lids, attention_mask=lmask, position_ids=positions(lmask)).logits
        d = rel_valid(exp["logits_f32"].double(), exp["logits_f64"], mask)
        assert d < 1e-5, d
        print(name, "float32 vs float64 reference, max rel diff over valid rows", d)
        # The window matters: plain causal attention gives other logits on the rows past the window.
        plain = {**config.to_dict(), "sliding_window": None}
        if "layer_types" in plain:  # Qwen2
            plain.update(use_sliding_window=False, layer_types=None)
        full = cls(config.__class__(**plain)).eval()
        full.load_state_dict(model.state_dict())
        if config.tie_word_embeddings:
            full.tie_weights()
        causal = full(input_ids=ids, attention_mask=mask).logits
        d = rel_valid(causal.double(), exp["logits_f64"], mask)
        print(name, "window vs plain causal attention: rel diff", d)
        assert d > 1e-2, d

        prompt = ids[:1, :4]
        exp["greedy_prompt"] = prompt
        exp["greedy_ids"] = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=GEN_NEW,
                                           do_sample=False, pad_token_id=0)
        gids, gmask = left_batch([4, 2], 4, V, seed + 4)
        exp.update(gen_ids=gids, gen_mask=gmask)
        exp["gen_greedy"] = model.generate(gids, attention_mask=gmask, max_new_tokens=GEN_NEW, do_sample=False,
                                           pad_token_id=0)

    # LoRA on the float64 reference, gradients after one backward.
    lcfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    pm = get_peft_model(f64(cls, config, model), lcfg)
    g = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    o = pm(input_ids=ids, attention_mask=mask)
    loss = base.for_causal_lm_loss_f64(o.logits, labels)
    loss.backward()
    exp["lora_logits_f64"] = o.logits.detach()
    exp["lora_loss_f64"] = loss.detach().reshape(1)
    for n, p in pm.named_parameters():
        if p.requires_grad:
            exp["grad." + n.replace(".default", "")] = p.grad.detach().clone()
    adir = os.path.join(out_dir, name + "_lora")
    shutil.rmtree(adir, ignore_errors=True)
    pm.save_pretrained(adir)
    os.remove(os.path.join(adir, "README.md"))

    if prefix:  # flat prefix (no projection) on the float64 reference: keys at positions 0 .. np - 1
        torch.manual_seed(seed + 6)
        xcfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
        xp = get_peft_model(f64(cls, config, model), xcfg)
        xp.prompt_encoder.double()
        xp.eval()
        with torch.no_grad():
            exp["prefix_table"] = xp.prompt_encoder["default"].embedding.weight.detach().clone()
            exp["prefix_logits_f64"] = xp(input_ids=ids, attention_mask=mask).logits

    exp = {k: v.contiguous().double() for k, v in exp.items()}
    save_file(exp, os.path.join(out_dir, name + "_expected.safetensors"), metadata={"source": source()})
    print(name, "loss", exp["loss_f64"].item(), "lora loss", exp["lora_loss_f64"].item())
    print(name, "greedy", exp["greedy_ids"].long().tolist(), "batch", exp["gen_greedy"].long().tolist())


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":  # PEFT keeps target_modules in a set: fix its order
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    a = ap.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    torch.use_deterministic_algorithms(True)
    mistral = MistralConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, vocab_size=48, rms_norm_eps=1e-5,
                            max_position_embeddings=64, tie_word_embeddings=False, rope_theta=1000.0,
                            sliding_window=WINDOW, attn_implementation="eager")
    qwen = Qwen2Config(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=1, vocab_size=48, rms_norm_eps=1e-6, max_position_embeddings=64,
                       tie_word_embeddings=True, rope_theta=1000.0, use_sliding_window=True, sliding_window=WINDOW,
                       layer_types=["sliding_attention", "full_attention"], attn_implementation="eager")
    assert mistral.sliding_window == WINDOW and qwen.sliding_window == WINDOW
    make("mistral_sw", MistralForCausalLM, mistral, a.out_dir, 2468, prefix=True)
    make("qwen2_sw", Qwen2ForCausalLM, qwen, a.out_dir, 8642, prefix=False)
    print(source())


if __name__ == "__main__":
    sys.exit(main())
