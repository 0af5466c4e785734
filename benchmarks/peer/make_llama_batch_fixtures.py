#!/usr/bin/env python3
"""Reference fixtures for left padding, batched / mixed-adapter generation and prompt / prefix tuning on the
Llama causal LM (include/peft/models/llama.hpp, models/generation.hpp, models/llama_prompt.hpp), made by the real
transformers and peft packages on the tiny model that make_llama_fixtures.py wrote (tests/data/llama/llama).

Writes into tests/data/llama/ (see the README.md there):

  llama_prompt/   PEFT PROMPT_TUNING adapter (4 virtual tokens, N(0, 1) table), PeftModel.save_pretrained
  llama_prefix/   PEFT PREFIX_TUNING adapter (3 virtual tokens, prefix_projection, encoder_hidden_size 12),
                  trained one SGD step so that the MLP's bias terms are not zero; saved as PEFT saves it (the
                  projected [3, 2 layers * 2 * kv_heads * head_dim] table)
  llama_batch_expected.safetensors (all F64)
      left_ids, left_mask [3, 7]     a LEFT-padded batch (lengths 7, 4, 5; pad id 0)
      left_logits_f32 [3, 7, 64]     float32 model, position_ids = cumsum(mask) - 1 (HF generate's rule)
      left_logits_f64                the float64 reference of make_llama_fixtures.py, same inputs
      gen_ids, gen_mask [3, 4]       left-padded prompts (lengths 4, 2, 3)
      gen_greedy [3, 4 + 6]          model.generate(do_sample=False, max_new_tokens=6, pad 0, eos 2), float32
      gen_mixed [3, 4 + 6]           with llama_lora loaded: generate(..., adapter_names=["default", "__base__",
                                     "default"]) (PEFT's mixed-batch inference)
      right_ids, right_mask [2, 7]   a right-padded batch (lengths 7, 5) for the prompt methods
      prompt_logits_f64 [2, 4 + 7, 64]   PEFT forward with llama_prompt (float64 reference)
      prefix_logits_f64 [2, 7, 64]       PEFT forward with the trained prefix (float64 reference, training mode
                                         of the PeftModel: through the MLP, dropout 0)
      prefix_loss_f64 [1], prefix_grad.<name>   loss (labels = ids, padding -100) and the gradients of every
                                         prefix-encoder parameter (embedding.weight, transform.{0,2}.{weight,bias})
                                         after one more backward; prefix_param.<name>: the parameters
      prefix_reload_logits_f64           PeftModel.from_pretrained(llama_prefix) (PEFT keeps the loaded float64
                                         table in a float32 Embedding: these differ from prefix_logits_f64 by
                                         that rounding)

  llama_bnb/      save_pretrained of llama/ loaded with BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute
                  float32) on the CPU backend; bnb_left_logits_f32: the float32 model on the weights its saved
                  QuantStates define, on the left-padded batch (bitsandbytes' CPU forward and dequantize_4bit do not
                  handle in_features < blocksize; see the comment in section 4)

Usage: ~/.cache/peft-peer/bin/python benchmarks/peer/make_llama_batch_fixtures.py tests/data/llama
"""
import argparse
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_llama_fixtures as base  # noqa: E402  (also patches softmax to keep float64)
from peft import (PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model)  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402


def left_batch(lengths, S, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lengths), S), generator=g)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, S - n:] = 1
        ids[b, :S - n] = 0
    return ids, mask


def positions(mask):
    return (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)


def f64_model(model32, config):
    m = LlamaForCausalLM(config).eval()
    m.load_state_dict(model32.state_dict())
    m = m.double()
    base.float64_throughout(m)
    return m


def main():
    if os.environ.get("PYTHONHASHSEED") != "0":
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, PYTHONHASHSEED="0"))
    ap = argparse.ArgumentParser()
    ap.add_argument("out_dir")
    a = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    mdir = os.path.join(a.out_dir, "llama")
    model = LlamaForCausalLM.from_pretrained(mdir, dtype=torch.float32, attn_implementation="eager").eval()
    config = model.config
    V = config.vocab_size
    exp = {}

    # 1. Left padding, full forward.
    ids, mask = left_batch([7, 4, 5], 7, V, 77)
    exp["left_ids"], exp["left_mask"] = ids, mask
    with torch.no_grad():
        exp["left_logits_f32"] = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits
        m64 = f64_model(model, config)
        exp["left_logits_f64"] = m64(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits

    # 2. Batched greedy generation with left padding; mixed adapters per row.
    gids, gmask = left_batch([4, 2, 3], 4, V, 78)
    exp["gen_ids"], exp["gen_mask"] = gids, gmask
    with torch.no_grad():
        exp["gen_greedy"] = model.generate(gids, attention_mask=gmask, max_new_tokens=6, do_sample=False,
                                           pad_token_id=0, eos_token_id=2)
        base32 = LlamaForCausalLM.from_pretrained(mdir, dtype=torch.float32, attn_implementation="eager").eval()
        pm = PeftModel.from_pretrained(base32, os.path.join(a.out_dir, "llama_lora")).eval()
        exp["gen_mixed"] = pm.generate(input_ids=gids, attention_mask=gmask, max_new_tokens=6, do_sample=False,
                                       pad_token_id=0, eos_token_id=2, adapter_names=["default", "__base__", "default"])
        alone = [pm.generate(input_ids=gids[b:b + 1, 4 - n:], max_new_tokens=6, do_sample=False, pad_token_id=0,
                             eos_token_id=2).tolist() for b, n in [(0, 4), (2, 3)]]
        print("mixed", exp["gen_mixed"].tolist(), "lora alone", alone)

    # 3. Prompt and prefix tuning (float64 reference).
    rids, rmask = left_batch([7, 7], 7, V, 79)
    rmask[1, 5:] = 0
    rids[1, 5:] = 0
    exp["right_ids"], exp["right_mask"] = rids, rmask
    labels = rids.clone()
    labels[rmask == 0] = -100

    torch.manual_seed(5)
    pcfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    pp = get_peft_model(f64_model(model, config), pcfg)
    pp.eval()
    with torch.no_grad():
        exp["prompt_logits_f64"] = pp(input_ids=rids, attention_mask=rmask).logits
    pdir = os.path.join(a.out_dir, "llama_prompt")
    shutil.rmtree(pdir, ignore_errors=True)
    pp.save_pretrained(pdir)
    os.remove(os.path.join(pdir, "README.md"))

    torch.manual_seed(6)
    xcfg = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=True,
                              encoder_hidden_size=12)
    xp = get_peft_model(f64_model(model, config), xcfg)
    xp.prompt_encoder.double()  # PEFT makes the prefix encoder in float32 whatever the base; float64 throughout
    xp.train()  # dropout is 0 in this model; train() keeps the MLP path (inference_mode is False)
    opt = torch.optim.SGD([p for p in xp.parameters() if p.requires_grad], lr=0.5)
    loss = base.for_causal_lm_loss_f64(xp(input_ids=rids, attention_mask=rmask).logits, labels)
    loss.backward()
    opt.step()
    opt.zero_grad()
    o = xp(input_ids=rids, attention_mask=rmask)
    loss = base.for_causal_lm_loss_f64(o.logits, labels)
    loss.backward()
    exp["prefix_logits_f64"] = o.logits.detach()
    exp["prefix_loss_f64"] = loss.detach().reshape(1)
    for n, p in xp.named_parameters():
        if p.requires_grad:
            exp["prefix_grad." + n.replace("prompt_encoder.default.", "")] = p.grad.detach().clone()
    for n, p in xp.named_parameters():
        if p.requires_grad:
            exp["prefix_param." + n.replace("prompt_encoder.default.", "")] = p.detach().clone()
    xdir = os.path.join(a.out_dir, "llama_prefix")
    shutil.rmtree(xdir, ignore_errors=True)
    xp.save_pretrained(xdir)
    os.remove(os.path.join(xdir, "README.md"))
    # PEFT's own reload (inference_mode: the flat table, which PEFT keeps in a float32 Embedding) gives the same
    # logits to float32 rounding of the table.
    with torch.no_grad():
        again = PeftModel.from_pretrained(f64_model(model, config), xdir).eval()
        exp["prefix_reload_logits_f64"] = again(input_ids=rids, attention_mask=rmask).logits
        diff = (exp["prefix_reload_logits_f64"] - exp["prefix_logits_f64"]).abs().max().item()
        print("prefix reload diff", diff)
        assert diff < 1e-6

    # 4. A bitsandbytes 4-bit (nf4, double quantization) checkpoint of the same model, and its logits.
    from transformers import BitsAndBytesConfig
    bcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.float32)
    bm = LlamaForCausalLM.from_pretrained(mdir, quantization_config=bcfg, dtype=torch.float32, device_map="cpu",
                                          attn_implementation="eager").eval()
    bdir = os.path.join(a.out_dir, "llama_bnb")
    shutil.rmtree(bdir, ignore_errors=True)
    bm.save_pretrained(bdir)
    # bitsandbytes' CPU backend cannot run this model: its forward refuses in_features < blocksize (32 < 64 here),
    # and its CPU dequantize_4bit returns wrong values for such tensors (relative error 0.25 to the float weights on
    # q_proj, against 0.09 for the QuantState's definition below). So the reference is the float32 model on the
    # weights the saved QuantState defines: code[nibble] · absmax, absmax = nested_code[u8] · nested_absmax + offset
    # (bitsandbytes' dequantize_blockwise / dequantize_4bit formulas), checked against the float weights.
    import bitsandbytes as bnb
    dq = LlamaForCausalLM.from_pretrained(mdir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        n4 = 0
        for name, mod in bm.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                qs, s2 = mod.weight.quant_state, mod.weight.quant_state.state2
                blocks = qs.absmax.numel()
                am = s2.code[qs.absmax.long()] * s2.absmax.repeat_interleave(s2.blocksize)[:blocks] + qs.offset
                data = mod.weight.data.flatten()
                nib = torch.stack([data >> 4, data & 15], 1).flatten().long()
                w = (qs.code[nib].reshape(blocks, -1) * am[:, None]).reshape(qs.shape)
                ref = dq.get_submodule(name).weight
                assert ((w - ref).norm() / ref.norm()).item() < 0.15
                ref.copy_(w)
                n4 += 1
        assert n4 == 14, n4
        exp["bnb_left_logits_f32"] = dq(input_ids=ids, attention_mask=mask, position_ids=positions(mask)).logits

    exp = {k: v.contiguous().double() for k, v in exp.items()}
    save_file(exp, os.path.join(a.out_dir, "llama_batch_expected.safetensors"), metadata={"source": base.source()})
    print("greedy", exp["gen_greedy"].long().tolist())
    print(base.source())


if __name__ == "__main__":
    sys.exit(main())
