#!/usr/bin/python3
"""Writes a large safetensors "model" tensor by tensor (the header first, so memory stays at one
tensor) plus a rank-16 PEFT LoRA adapter on the attention projections, for benchmarks/run_io.sh.

Usage: /usr/bin/python3 benchmarks/peer/make_big_model.py OUT_DIR [LAYERS] [DTYPE]
  default 8 layers of a 2048-wide decoder in F32: q,k,v,o [2048, 2048] and up/down [5504, 2048],
  [2048, 5504] = 1.19 GB; the largest tensor is 45 MB.
"""
import json
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from make_io_fixtures import DTYPES, save_file, tensor_bytes  # noqa: E402


def main(out, layers=8, dtype="F32"):
    tdt = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[dtype]
    d, f = 2048, 5504
    shapes = []
    for l in range(layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes.append((f"model.layers.{l}.self_attn.{p}.weight", (d, d)))
        shapes.append((f"model.layers.{l}.mlp.up_proj.weight", (f, d)))
        shapes.append((f"model.layers.{l}.mlp.down_proj.weight", (d, f)))
        shapes.append((f"model.layers.{l}.input_layernorm.weight", (d,)))
    item = torch.tensor([], dtype=tdt).element_size()
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
        n = item
        for s in shape:
            n *= s
        header[name] = {"dtype": DTYPES[tdt], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    os.makedirs(out, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    with open(os.path.join(out, "base.safetensors"), "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for name, shape in shapes:
            fh.write(tensor_bytes((torch.randn(*shape, generator=g) * 0.02).to(tdt)))
    r = 16
    tensors = {}
    for l in range(layers):
        for p in ("q_proj", "k_proj", "v_proj", "o_proj"):
            key = f"base_model.model.model.layers.{l}.self_attn.{p}"
            tensors[key + ".lora_A.weight"] = torch.randn(r, d, generator=g) * 0.01
            tensors[key + ".lora_B.weight"] = torch.randn(d, r, generator=g) * 0.01
    ad = os.path.join(out, "adapter")
    os.makedirs(ad, exist_ok=True)
    save_file(tensors, os.path.join(ad, "adapter_model.safetensors"), {"format": "pt"})
    with open(os.path.join(ad, "adapter_config.json"), "w") as fh:
        json.dump({"peft_type": "LORA", "r": r, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
                   "task_type": "CAUSAL_LM", "bias": "none", "use_rslora": False, "use_dora": False}, fh, indent=2)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 8, sys.argv[3] if len(sys.argv) > 3 else "F32")
