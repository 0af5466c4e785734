#!/usr/bin/python3
"""PyTorch peer for benchmarks/bench_lora.cpp.

Runs each (rows, in, out, r) case in PyTorch and, interleaved with it, the same case of our
Google Benchmark binary, with the same thread count, and prints both times and their ratio.
Interleaving keeps both sides under the same machine load (the machines are shared and noisy).

usage: lora_peer.py BENCH_BINARY [--threads N] [--repeats K] [--min-time S]
"""
import argparse
import json
import math
import subprocess
import time

import torch

CASES = [(64, 256, 256, 8), (512, 1024, 1024, 16), (512, 4096, 4096, 16)]
OPS = ["LinearForward", "LinearBackward", "LinearTrainStep", "LoraForward", "LoraMergedForward", "LoraBackward",
       "LoraTrainStep"]


class LoraLinear(torch.nn.Module):
    """The standard PEFT formulation: frozen base + s · B(A(x))."""

    def __init__(self, d_in, d_out, r, alpha):
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out)
        self.base.requires_grad_(False)
        self.lora_A = torch.nn.Linear(d_in, r, bias=False)
        self.lora_B = torch.nn.Linear(r, d_out, bias=False)
        torch.nn.init.normal_(self.lora_B.weight, std=0.02)
        self.scaling = alpha / r
        self.merged = False

    def forward(self, x):
        y = self.base(x)
        if not self.merged:
            y = y + self.lora_B(self.lora_A(x)) * self.scaling
        return y

    def merge(self):
        with torch.no_grad():
            self.base.weight += self.scaling * self.lora_B.weight @ self.lora_A.weight
        self.merged = True


def time_torch(fn, min_time):
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def torch_case(op, rows, d_in, d_out, r, min_time):
    torch.manual_seed(0)
    layer = LoraLinear(d_in, d_out, r, 2.0 * r)
    x = torch.rand(rows, d_in) * 2 - 1
    if op == "LinearForward":
        base = layer.base
        with torch.no_grad():
            return time_torch(lambda: base(x), min_time)
    if op == "LoraForward":
        with torch.no_grad():
            return time_torch(lambda: layer(x), min_time)
    if op == "LoraMergedForward":
        layer.merge()
        with torch.no_grad():
            return time_torch(lambda: layer(x), min_time)
    dy = torch.rand(rows, d_out) * 2 - 1
    if op in ("LinearBackward", "LinearTrainStep"):
        base = layer.base
        base.requires_grad_(True)
        if op == "LinearBackward":
            xg = x.clone().requires_grad_(True)
            total = time_torch(lambda: base(xg).backward(dy), min_time)
            with torch.enable_grad():
                f = time_torch(lambda: base(xg), min_time)
            return max(total - f, 1e-9)
        opt = torch.optim.AdamW(base.parameters(), lr=1e-3, weight_decay=0.01)

        def full_step():
            opt.zero_grad(set_to_none=False)
            base(x).backward(dy)
            opt.step()
        return time_torch(full_step, min_time)
    if op == "LoraBackward":
        xg = x.clone().requires_grad_(True)  # a middle layer: the input gradient is needed

        def step():
            y = layer(xg)
            y.backward(dy)
        # forward is included here; subtract a separately timed forward to isolate backward
        fwd = lambda: layer(xg)
        total = time_torch(step, min_time)
        with torch.enable_grad():
            f = time_torch(fwd, min_time)
        return max(total - f, 1e-9)
    if op == "LoraTrainStep":
        opt = torch.optim.AdamW([layer.lora_A.weight, layer.lora_B.weight], lr=1e-3, weight_decay=0.01)

        def step():
            opt.zero_grad(set_to_none=False)
            y = layer(x)
            y.backward(dy)
            opt.step()
        return time_torch(step, min_time)
    raise ValueError(op)


def ours_case(binary, op, rows, d_in, d_out, r, min_time, threads):
    name = f"BM_{op}/rows:{rows}/in:{d_in}/out:{d_out}/r:{r}"
    out = subprocess.run(
        [binary, f"--benchmark_filter=^{name}(/real_time)?$", f"--benchmark_min_time={min_time}",
         "--benchmark_format=json"],
        check=True, capture_output=True, text=True,
        env={"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"})
    data = json.loads(out.stdout)
    runs = [b for b in data["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    if not runs:
        raise RuntimeError(f"benchmark {name} not found in {binary}")
    b = runs[0]
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
    return b["real_time"] * scale


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, median of {args.repeats} interleaved repeats")
    print(f"{'case (rows,in,out,r)':24} {'op':18} {'ours ms':>9} {'torch ms':>9} {'torch/ours':>10}")
    results = {}
    for rows, d_in, d_out, r in CASES:
        for op in OPS:
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(ours_case(args.binary, op, rows, d_in, d_out, r, args.min_time, args.threads))
                theirs.append(torch_case(op, rows, d_in, d_out, r, args.min_time))
            o, t = sorted(ours)[len(ours) // 2], sorted(theirs)[len(theirs) // 2]
            results[(rows, d_in, d_out, r, op)] = (o, t)
            print(f"{str((rows, d_in, d_out, r)):24} {op:18} {o * 1e3:9.3f} {t * 1e3:9.3f} {t / o:10.2f}")
    print("\nOverheads relative to the base Linear forward (same side, same case):")
    heads = ("LoRA fwd", "merged fwd", "LoRA step", "full-FT step")
    print(f"{'case':24} " + " ".join(f"{h + ' ours':>15} {'torch':>7}" for h in heads))
    for rows, d_in, d_out, r in CASES:
        base_o, base_t = results[(rows, d_in, d_out, r, "LinearForward")]
        cells = []
        for op in ("LoraForward", "LoraMergedForward", "LoraTrainStep", "LinearTrainStep"):
            o, t = results[(rows, d_in, d_out, r, op)]
            cells.append(f"{o / base_o:15.2f} {t / base_t:7.2f}")
        print(f"{str((rows, d_in, d_out, r)):24} " + " ".join(cells))


if __name__ == "__main__":
    main()
