#!/usr/bin/python3
"""Reads an adapter directory written by peft-cpp the way Hugging Face PEFT's
PeftModel.from_pretrained would (the safetensors file parsed by hand, since the `safetensors`
package is not installed here), checks PEFT's conventions, and optionally checks a merge:

  /usr/bin/python3 benchmarks/peer/check_peft_adapter.py ADAPTER_DIR [BASE.safetensors MERGED.safetensors]

Checks: adapter_config.json has PEFT's field names and types; every key is
base_model.model.<path>.lora_A.weight / .lora_B.weight (/ .lora_magnitude_vector with use_dora);
shapes A [r, in], B [out, r] with r = rank_pattern / r; with BASE and MERGED given, the merged
weights equal W + s B A (s from lora_alpha / alpha_pattern, rsLoRA) computed in float64 by torch.
Exits 1 with a message on the first violation.
"""
import json
import math
import os
import re
import struct
import sys

import numpy as np
import torch

NP = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32, "U8": np.uint8}


def load_file(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    start = 8 + n
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        buf = raw[start + b:start + e]
        if v["dtype"] == "BF16":
            t = torch.from_numpy(np.frombuffer(buf, dtype=np.int16).copy()).view(torch.bfloat16).float()
        else:
            t = torch.from_numpy(np.frombuffer(buf, dtype=NP[v["dtype"]]).copy())
        out[k] = t.reshape(v["shape"]).double()
    return out


def pattern(p, path, default):
    for k, v in p.items():
        if re.match(rf"(.*\.)?({k})$", path):
            return v
    return default


def fail(msg):
    print("FAIL:", msg)
    sys.exit(1)


def main(d, base=None, merged=None):
    cfg = json.load(open(os.path.join(d, "adapter_config.json")))
    for key, typ in {"peft_type": str, "r": int, "lora_alpha": (int, float), "use_rslora": bool, "use_dora": bool,
                     "fan_in_fan_out": bool, "rank_pattern": dict, "alpha_pattern": dict}.items():
        if not isinstance(cfg.get(key), typ):
            fail(f"adapter_config.json: {key} = {cfg.get(key)!r}")
    tensors = load_file(os.path.join(d, "adapter_model.safetensors"))
    mods = {}
    for k, t in tensors.items():
        m = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector)", k)
        if not m:
            fail(f"unexpected key {k}")
        mods.setdefault(m.group(1), {})[m.group(2)] = t
    for path, m in mods.items():
        r = pattern(cfg["rank_pattern"], path, cfg["r"])
        a, b = m["lora_A.weight"], m["lora_B.weight"]
        if a.shape[0] != r or b.shape[1] != r:
            fail(f"{path}: A {tuple(a.shape)} B {tuple(b.shape)} but r = {r}")
        if cfg["use_dora"] != ("lora_magnitude_vector" in m):
            fail(f"{path}: DoRA magnitude presence does not match use_dora")
    print(f"ok: {len(mods)} modules, PEFT layout")
    if base:
        w0, w1 = load_file(base), load_file(merged)
        for path, m in mods.items():
            r = pattern(cfg["rank_pattern"], path, cfg["r"])
            alpha = pattern(cfg["alpha_pattern"], path, cfg["lora_alpha"])
            s = alpha / math.sqrt(r) if cfg["use_rslora"] else alpha / r
            want = w0[path + ".weight"] + s * (m["lora_B.weight"] @ m["lora_A.weight"])
            err = (w1[path + ".weight"] - want).abs().max().item()
            if err > 1e-4 * max(1.0, want.abs().max().item()):
                fail(f"{path}: merged differs from W + s B A by {err}")
        print(f"ok: merged weights equal W + s B A for {len(mods)} modules")


if __name__ == "__main__":
    main(*sys.argv[1:])
