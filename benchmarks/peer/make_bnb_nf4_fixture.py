"""Writes tests/quant/data/bnb_nf4_fixture.safetensors with the REAL bitsandbytes on CPU.

Each module is a bitsandbytes.nn.Linear4bit (quant_type="nf4", blocksize 64) quantized by moving it to
the CPU device; the file is its state_dict() written with safetensors.torch.save_file, i.e. exactly the
entries transformers' save_pretrained writes for a 4-bit model (Linear4bit._save_to_state_dict with
QuantState.as_dict(packed=True)): `<p>.weight`, `<p>.weight.absmax`, `<p>.weight.quant_map`,
`<p>.weight.nested_absmax`, `<p>.weight.nested_quant_map`, `<p>.weight.quant_state.bitsandbytes__nf4`.
The float weights are stored as `reference.<p>.weight` so a test can re-quantize them.

It also stores `torch_cpu_sum`: torch.sum of a deterministic float32 vector of 100003 values
(x_i = ((i · 2654435761 mod 2^32) mod 2^20 + 2^16) / 2^27, exact in float32) computed with 1, 2, 3, 4
and 8 intra-op threads, to pin torch's CPU cascade summation (the double-quantization offset is mean(absmax)).

Run inside the peer venv (benchmarks/peer/requirements.txt, see benchmarks/peer/README.md):
    ~/.cache/peft-peer/bin/python benchmarks/peer/make_bnb_nf4_fixture.py
"""
import os
import platform
import sys

import bitsandbytes as bnb
import safetensors.torch
import torch

N_SUM = 100003
SUM_THREADS = (1, 2, 3, 4, 8)


def linear4bit(w, bias, nested):
    out_f, in_f = w.shape
    lin = bnb.nn.Linear4bit(in_f, out_f, bias=bias is not None, compress_statistics=nested, quant_type="nf4",
                            compute_dtype=torch.float32)
    lin.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, compress_statistics=nested, quant_type="nf4",
                                   blocksize=64)
    if bias is not None:
        lin.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    return lin.to("cpu")  # quantizes on the CPU backend


def weights():
    g = torch.Generator().manual_seed(1234)
    q = torch.randn(96, 201, generator=g) * 0.02  # 19296 values: 302 blocks, the last one 32 long
    flat = q.view(-1)
    flat[640:704] = 0.0  # block 10 all zero
    flat[19264:] = 0.0  # ragged last block all zero
    v = torch.randn(11, 33, generator=g) * 0.05  # 363 values: odd count, ragged last block of 43
    k = torch.randn(7, 9, generator=g) * 0.1  # 63 values: one block, so the centered absmax is all zero
    o = (torch.randn(40, 64, generator=g) * 0.03).to(torch.bfloat16)  # bf16 weights: quant_state dtype bfloat16
    return {
        "model.layers.0.self_attn.q_proj": (q, torch.randn(96, generator=g) * 0.1, True),
        "model.layers.0.self_attn.v_proj": (v, None, False),
        "model.layers.0.self_attn.k_proj": (k, None, True),
        "model.layers.0.self_attn.o_proj": (o, None, True),
    }


def torch_sums():
    x = torch.tensor([((i * 2654435761) % 2**32 % 2**20 + 2**16) / 2**27 for i in range(N_SUM)], dtype=torch.float32)
    before = torch.get_num_threads()
    sums = []
    for t in SUM_THREADS:
        torch.set_num_threads(t)
        sums.append(x.sum().item())
    torch.set_num_threads(before)
    return torch.tensor(sums, dtype=torch.float32)


def main():
    out = {}
    for prefix, (w, bias, nested) in weights().items():
        for name, t in linear4bit(w, bias, nested).state_dict().items():
            out[prefix + "." + name] = t.detach().contiguous()
        out["reference." + prefix + ".weight"] = w.contiguous()
    out["torch_cpu_sum"] = torch_sums()
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.normpath(os.path.join(here, "..", "..", "tests", "quant", "data", "bnb_nf4_fixture.safetensors"))
    safetensors.torch.save_file(out, path, metadata={"format": "pt"})
    print("wrote", path)
    print("python", sys.version.split()[0], "torch", torch.__version__, "bitsandbytes", bnb.__version__,
          "cpu capability", torch.backends.cpu.get_cpu_capability(), "threads", torch.get_num_threads(),
          "machine", platform.machine())


if __name__ == "__main__":
    main()
