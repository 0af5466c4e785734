"""Writes tests/quant/data/bnb_nf4_fixture.safetensors: NF4 weights in the layout transformers saves
for a bitsandbytes 4-bit model, produced by an independent Python re-implementation of bitsandbytes'
quantize_4bit (nearest NF4 code of w * (1/absmax) per block of 64, element 2i in the high nibble)
and of compress_statistics (mean offset, 8-bit dynamic map in blocks of 256, map built with
bitsandbytes' create_dynamic_map code on torch). Also stores the float weights as `reference.<name>`.

Run with the PyTorch interpreter: /usr/bin/python3 benchmarks/peer/make_bnb_nf4_fixture.py
(no bitsandbytes or safetensors package needed: the safetensors container is written by hand).
"""
import json
import os
import struct

import torch

NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
                    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
                    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
                    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], dtype=torch.float32)


def create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8):
    # bitsandbytes.functional.create_dynamic_map, same arithmetic on torch float32.
    data = []
    non_sign_bits = total_bits - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data.append(0)
    data.append(1.0)
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def nearest(code, x):
    # argmin |x - code| takes the first (lower) index on a tie.
    return torch.argmin((x.reshape(-1, 1) - code.reshape(1, -1)).abs(), dim=1)


def blockwise_absmax(x, bs):
    n = x.numel()
    blocks = (n + bs - 1) // bs
    pad = torch.zeros(blocks * bs, dtype=torch.float32)
    pad[:n] = x
    return pad.reshape(blocks, bs).abs().max(dim=1).values


def quantize_nf4(w, blocksize=64, nested=True):
    x = w.reshape(-1).to(torch.float32)
    n = x.numel()
    absmax = blockwise_absmax(x, blocksize)
    inv = (1.0 / absmax).repeat_interleave(blocksize)[:n]
    codes = nearest(NF4, x * inv).to(torch.uint8)
    if n % 2:
        codes = torch.cat([codes, nearest(NF4, torch.zeros(1))])
    packed = (codes[0::2] * 16 + codes[1::2]).to(torch.uint8).reshape(-1, 1)
    tensors = {"": packed}
    state = {"quant_type": "nf4", "blocksize": blocksize, "dtype": "float32", "shape": list(w.shape)}
    if nested:
        offset = absmax.mean()
        centered = absmax - offset
        amax2 = blockwise_absmax(centered, 256)
        inv2 = (1.0 / amax2).repeat_interleave(256)[:centered.numel()]
        dmap = create_dynamic_map()
        qabs = nearest(dmap, centered * inv2).to(torch.uint8)
        tensors[".absmax"] = qabs
        tensors[".quant_map"] = NF4.clone()
        tensors[".nested_absmax"] = amax2
        tensors[".nested_quant_map"] = dmap
        state.update({"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": offset.item()})
    else:
        tensors[".absmax"] = absmax
        tensors[".quant_map"] = NF4.clone()
    blob = json.dumps(state).encode("utf-8")
    tensors[".quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
    return tensors


def save_safetensors(path, tensors):
    names = list(tensors)
    header, offset, chunks = {}, 0, []
    for name in names:
        t = tensors[name].contiguous()
        raw = t.numpy().tobytes()
        dtype = {torch.uint8: "U8", torch.float32: "F32"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        chunks.append(raw)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for c in chunks:
            f.write(c)


def main():
    torch.manual_seed(1234)
    weights = {
        "model.layers.0.q_proj": (torch.randn(96, 200) * 0.02, True),   # 300 blocks: two nested blocks
        "model.layers.0.v_proj": (torch.randn(10, 33) * 0.05, False),   # ragged last block, odd count
    }
    out = {}
    for prefix, (w, nested) in weights.items():
        for suffix, t in quantize_nf4(w, nested=nested).items():
            out[prefix + ".weight" + suffix] = t
        out["reference." + prefix + ".weight"] = w.to(torch.float32)
    out["model.layers.0.q_proj.bias"] = torch.randn(96) * 0.1
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "..", "..", "tests", "quant", "data", "bnb_nf4_fixture.safetensors")
    save_safetensors(os.path.normpath(path), out)
    print("wrote", os.path.normpath(path))


if __name__ == "__main__":
    main()
