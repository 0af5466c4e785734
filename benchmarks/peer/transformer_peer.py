#!/usr/bin/python3
"""PyTorch peer for benchmarks/bench_transformer.cpp.

Builds the same transformer classifier in PyTorch (4 pre-norm blocks, d=256, 4 heads, FFN 1024
GELU, seq 64, batch 32, 16-feature patch input, learned positions, final LayerNorm, mean pooling,
10 classes) with the same six methods, and times zero_grad + forward + backward (dlogits fixed),
interleaved with our Google Benchmark binary at the same thread count. Prints both times, the
ratio torch/ours and the trainable-parameter share of each side (which must agree).

Methods (classifier trainable in every PEFT case):
  full     every parameter trainable
  lora     LoRA r=8, alpha=16 on q_proj, v_proj (frozen base + s·B(A x))
  adapter  Houlsby adapters after attention and after the FFN, bottleneck 16
  ia3      (IA)^3 vectors on keys, values and the FFN inner activation
  prefix   16 prefix keys/values per layer, prepended to K and V
  prompt   16 soft-prompt embeddings prepended to the input (after positions; not pooled)

usage: transformer_peer.py BENCH_BINARY [--threads N] [--repeats K] [--min-time S]
"""
import argparse
import json
import math
import subprocess
import time

import torch
import torch.nn.functional as F

B, S, P, D, H, FF, L, C = 32, 64, 16, 256, 4, 1024, 4, 10
METHODS = ["full", "lora", "adapter", "ia3", "prefix", "prompt"]


class LoraLinear(torch.nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.base = torch.nn.Linear(d_in, d_out)
        self.r = 0

    def add_lora(self, r, alpha):
        self.r = r
        self.lora_A = torch.nn.Parameter(torch.empty(r, self.base.in_features))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_B = torch.nn.Parameter(torch.randn(self.base.out_features, r) * 0.02)
        self.scaling = alpha / r

    def forward(self, x):
        y = self.base(x)
        if self.r:
            y = y + (x @ self.lora_A.t()) @ self.lora_B.t() * self.scaling
        return y


class Adapter(torch.nn.Module):
    def __init__(self, d, b):
        super().__init__()
        self.down = torch.nn.Linear(d, b)
        self.up = torch.nn.Linear(b, d)
        torch.nn.init.normal_(self.up.weight, std=0.02)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(F.relu(self.down(x)))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = torch.nn.LayerNorm(D)
        self.norm2 = torch.nn.LayerNorm(D)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (LoraLinear(D, D) for _ in range(4))
        self.fc1 = LoraLinear(D, FF)
        self.fc2 = LoraLinear(FF, D)
        self.adapter_attn = self.adapter_ffn = None
        self.ia3_k = self.ia3_v = self.ia3_ff = None

    def attention(self, x, prefix):
        q = self.q_proj(x).view(B, -1, H, D // H).transpose(1, 2)  # [B, H, S', dh]
        k = self.k_proj(x)
        v = self.v_proj(x)
        if self.ia3_k is not None:
            k = k * self.ia3_k
            v = v * self.ia3_v
        k = k.view(B, -1, H, D // H).transpose(1, 2)
        v = v.view(B, -1, H, D // H).transpose(1, 2)
        if prefix is not None:
            pk, pv = prefix  # [l, D]
            pk = pk.view(1, -1, H, D // H).transpose(1, 2).expand(B, -1, -1, -1)
            pv = pv.view(1, -1, H, D // H).transpose(1, 2).expand(B, -1, -1, -1)
            k = torch.cat([pk, k], dim=2)
            v = torch.cat([pv, v], dim=2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)
        c = (a @ v).transpose(1, 2).reshape(B, -1, D)
        return self.out_proj(c)

    def forward(self, x, prefix=None):
        a = self.attention(self.norm1(x), prefix)
        if self.adapter_attn is not None:
            a = self.adapter_attn(a)
        h = x + a
        z = F.gelu(self.fc1(self.norm2(h)))
        if self.ia3_ff is not None:
            z = z * self.ia3_ff
        f = self.fc2(z)
        if self.adapter_ffn is not None:
            f = self.adapter_ffn(f)
        return h + f


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = LoraLinear(P, D)
        self.embed_positions = torch.nn.Parameter(torch.randn(S, D) * 0.02)
        self.layers = torch.nn.ModuleList(Block() for _ in range(L))
        self.norm = torch.nn.LayerNorm(D)
        self.classifier = torch.nn.Linear(D, C)
        self.prompt = None
        self.prefix = None

    def forward(self, x):
        h = self.patch_embed(x) + self.embed_positions
        n = 0
        if self.prompt is not None:
            n = self.prompt.shape[0]
            h = torch.cat([self.prompt.unsqueeze(0).expand(B, -1, -1), h], dim=1)
        for i, blk in enumerate(self.layers):
            prefix = None
            if self.prefix is not None:
                prefix = (self.prefix[:, 2 * i * D:(2 * i + 1) * D], self.prefix[:, (2 * i + 1) * D:(2 * i + 2) * D])
            h = blk(h, prefix)
        h = self.norm(h)
        return self.classifier(h[:, n:].mean(dim=1))


def build(method):
    torch.manual_seed(0)
    m = Model()
    if method == "full":
        return m
    m.requires_grad_(False)
    if method == "lora":
        for blk in m.layers:
            blk.q_proj.add_lora(8, 16)
            blk.v_proj.add_lora(8, 16)
    elif method == "adapter":
        for blk in m.layers:
            blk.adapter_attn = Adapter(D, D // 16)
            blk.adapter_ffn = Adapter(D, D // 16)
    elif method == "ia3":
        for blk in m.layers:
            blk.ia3_k = torch.nn.Parameter(torch.ones(D))
            blk.ia3_v = torch.nn.Parameter(torch.ones(D))
            blk.ia3_ff = torch.nn.Parameter(torch.ones(FF))
    elif method == "prefix":
        m.prefix = torch.nn.Parameter(torch.randn(16, L * 2 * D))
    elif method == "prompt":
        m.prompt = torch.nn.Parameter(torch.randn(16, D))
    m.classifier.requires_grad_(True)
    return m


def time_torch(fn, min_time):
    fn()  # warm-up
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


def torch_case(method, min_time):
    m = build(method)
    x = torch.rand(B, S, P) * 2 - 1
    g = torch.rand(B, C) * 2 - 1
    params = [p for p in m.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        m(x).backward(g)

    trainable = sum(p.numel() for p in params)
    total = sum(p.numel() for p in m.parameters())
    return time_torch(step, min_time), 100.0 * trainable / total


def ours_case(binary, index, min_time, threads):
    name = f"BM_TransformerStep/method:{index}/real_time"
    out = subprocess.run(
        [binary, f"--benchmark_filter=^{name}$", f"--benchmark_min_time={min_time}", "--benchmark_format=json"],
        check=True, capture_output=True, text=True,
        env={"OMP_NUM_THREADS": str(threads), "PATH": "/usr/bin:/bin"})
    runs = [b for b in json.loads(out.stdout)["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    if not runs:
        raise RuntimeError(f"benchmark {name} not found in {binary}")
    b = runs[0]
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
    return b["real_time"] * scale, b["trainable_%"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {args.threads}, median of {args.repeats} interleaved repeats; "
          f"one step = zero_grad + forward + backward, batch {B} x seq {S}, d {D}, {L} blocks")
    print(f"{'method':8} {'ours ms':>9} {'torch ms':>9} {'torch/ours':>10} {'ours seq/s':>10} "
          f"{'train% ours':>11} {'torch':>7} {'vs full ours':>12} {'torch':>7}")
    rows = []
    for i, method in enumerate(METHODS):
        ours, theirs = [], []
        for _ in range(args.repeats):
            o, pct_o = ours_case(args.binary, i, args.min_time, args.threads)
            t, pct_t = torch_case(method, args.min_time)
            ours.append(o)
            theirs.append(t)
        o, t = sorted(ours)[len(ours) // 2], sorted(theirs)[len(theirs) // 2]
        rows.append((method, o, t, pct_o, pct_t))
        full_o, full_t = rows[0][1], rows[0][2]  # "full" runs first
        print(f"{method:8} {o * 1e3:9.2f} {t * 1e3:9.2f} {t / o:10.2f} {B / o:10.1f} {pct_o:11.3f} {pct_t:7.3f} "
              f"{o / full_o:12.2f} {t / full_t:7.2f}", flush=True)


if __name__ == "__main__":
    main()
