#!/usr/bin/python3
"""Writes the tiny fixtures in tests/data/ the way the Python side writes them.

The `safetensors` package is not installed here, so the format is written by hand exactly as its
reference implementation does: 8-byte little-endian header length, compact JSON header sorted by
(dtype alignment desc, name), padded with spaces to a multiple of 8, then the raw little-endian
tensors. Adapter directories follow Hugging Face PEFT's save_pretrained: keys
`base_model.model.<path>.lora_A.weight` / `.lora_B.weight` (adapter name stripped), DoRA magnitude
as `.lora_magnitude_vector`, and an adapter_config.json with PEFT's field names.

The merged expectations are computed with torch in float64 from the stored (float32) tensors:
    W' = W + s · B A,  s = alpha / r (rsLoRA: alpha / sqrt(r)), rank/alpha patterns per module
    DoRA: W' = m / ||W + s B A||_row * (W + s B A)

Usage: /usr/bin/python3 benchmarks/peer/make_io_fixtures.py tests/data
"""
import json
import math
import os
import struct
import sys

import torch

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8"}


def tensor_bytes(t):
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        # numpy has no bfloat16: reinterpret the 16-bit pattern.
        return t.view(torch.int16).numpy().tobytes()
    return t.numpy().tobytes()


def save_file(tensors, path, metadata=None):
    """safetensors.torch.save_file, by hand."""
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    blobs = []
    for name, t in items:
        b = tensor_bytes(t)
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for b in blobs:
            f.write(b)


def lora_config(**kw):
    cfg = {
        "alpha_pattern": {}, "auto_mapping": None, "base_model_name_or_path": "tiny-test-model", "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "layer_replication": None,
        "layers_pattern": None, "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 16,
        "lora_dropout": 0.05, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
        "peft_type": "LORA", "r": 4, "rank_pattern": {}, "revision": None, "target_modules": ["q", "v"],
        "task_type": "CAUSAL_LM", "use_dora": False, "use_rslora": False,
    }
    cfg.update(kw)
    return cfg


def scaling(cfg, path):
    def pattern(p, default):
        for k, v in p.items():
            if __import__("re").match(rf"(.*\.)?({k})$", path):
                return v
        return default
    r = pattern(cfg["rank_pattern"], cfg["r"])
    a = pattern(cfg["alpha_pattern"], cfg["lora_alpha"])
    return a / math.sqrt(r) if cfg["use_rslora"] else a / r


def write_adapter(root, name, cfg, base, ranks):
    dora = cfg["use_dora"]
    d = os.path.join(root, name)
    os.makedirs(d, exist_ok=True)
    g = torch.Generator().manual_seed(len(name))
    tensors, merged = {}, {k: v.double().clone() for k, v in base.items()}
    for path, r in ranks.items():
        w = base[path + ".weight"]
        out, inn = w.shape
        a = (torch.randn(r, inn, generator=g) * 0.5).float()
        b = (torch.randn(out, r, generator=g) * 0.5).float()
        key = "base_model.model." + path
        tensors[key + ".lora_A.weight"] = a
        tensors[key + ".lora_B.weight"] = b
        s = scaling(cfg, path)
        v = w.double() + s * (b.double() @ a.double())
        if dora:
            m = (v.norm(dim=1) * (1.0 + 0.1 * torch.randn(out, generator=g).double())).float()
            tensors[key + ".lora_magnitude_vector"] = m
            v = (m.double() / v.norm(dim=1)).unsqueeze(1) * v
        merged[path + ".weight"] = v
    save_file(tensors, os.path.join(d, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
    save_file({k: v.float() for k, v in merged.items()}, os.path.join(root, name + ".merged.safetensors"),
              {"format": "pt"})


def main(root):
    os.makedirs(root, exist_ok=True)
    w = torch.arange(6, dtype=torch.float64).reshape(2, 3) - 2.5
    save_file({"w": w.float(), "h": w.half(), "b": w.bfloat16(), "idx": torch.tensor([1, 5, 9], dtype=torch.int64)},
              os.path.join(root, "small.safetensors"), {"format": "pt"})

    g = torch.Generator().manual_seed(0)
    base = {}
    for layer in range(2):
        for proj, (o, i) in {"q": (6, 8), "k": (6, 8), "v": (6, 8)}.items():
            base[f"model.layers.{layer}.attn.{proj}.weight"] = torch.randn(o, i, generator=g).float()
        base[f"model.layers.{layer}.norm.weight"] = torch.ones(8)
    base["lm_head.weight"] = torch.randn(10, 8, generator=g).float()
    save_file(base, os.path.join(root, "tiny_base.safetensors"), {"format": "pt"})

    ranks = {f"model.layers.{l}.attn.{p}": 4 for l in range(2) for p in ("q", "v")}
    ranks["model.layers.1.attn.v"] = 2
    cfg = lora_config(rank_pattern={"layers.1.attn.v": 2}, alpha_pattern={"q": 8}, unknown_future_key=[1, 2])
    write_adapter(root, "tiny_lora", cfg, base, ranks)

    cfg = lora_config(use_dora=True, use_rslora=True, target_modules="model\\.layers\\.\\d+\\.attn\\.(q|v)")
    write_adapter(root, "tiny_dora", cfg, base, {k: 4 for k in ranks})

    d = os.path.join(root, "tiny_prompt")
    os.makedirs(d, exist_ok=True)
    save_file({"prompt_embeddings": torch.randn(5, 8, generator=g).float()},
              os.path.join(d, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5, "token_dim": 8,
                   "num_transformer_submodules": 1, "num_attention_heads": 2, "num_layers": 2,
                   "prompt_tuning_init": "RANDOM", "base_model_name_or_path": "tiny-test-model",
                   "inference_mode": True}, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tests/data")
