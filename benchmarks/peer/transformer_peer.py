#!/usr/bin/python3
"""PyTorch peer for benchmarks/bench_transformer.cpp.

Builds the same transformer classifier in PyTorch (4 pre-norm blocks, d=256, 4 heads, FFN 1024
GELU, seq 64, batch 32, 16-feature patch input, learned positions, final LayerNorm, mean pooling,
10 classes) with the same six methods, and times one training step (zero_grad + forward + backward
with dlogits fixed + AdamW) interleaved with our Google Benchmark binary at each thread count,
against every installed peer (Debian's torch and the pinned venv's). See peer_harness.py for what
makes it honest (fresh processes, thread variables before torch is imported, warm-up, CPU/wall).
Per method: ours and each peer (median step), ratio peer/ours, GF/s and % of the core's FMA peak
(FLOPs: 2*m*n*k over every matrix product of the step, counted by our binary from the shapes; the
same products for both sides), first step / steady step, allocations (ours) and page faults per
step, and CPU/wall of each side.

Methods (classifier trainable in every PEFT case):
  full     every parameter trainable
  lora     LoRA r=8, alpha=16 on q_proj, v_proj (frozen base + s·B(A x))
  adapter  Houlsby adapters after attention and after the FFN, bottleneck 16
  ia3      (IA)^3 vectors on keys, values and the FFN inner activation
  prefix   16 prefix keys/values per layer, prepended to K and V
  prompt   16 soft-prompt embeddings prepended to the input (after positions; not pooled)

usage: transformer_peer.py BENCH_BINARY [--threads 1 2] [--repeats K] [--min-time S] [--min-warmup S]
                          [--peer NAME=PYTHON ...] [--methods full lora ...]
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_harness as harness  # noqa: E402

if __name__ == "__main__" and "--worker" in sys.argv:
    harness.set_threads_before_torch(sys.argv)  # before torch is imported
if "--worker" in sys.argv or "--info" in sys.argv:
    import torch
    import torch.nn.functional as F
else:  # the driver never imports torch
    torch = None

B, S, P, D, H, FF, L, C = 32, 64, 16, 256, 4, 1024, 4, 10
METHODS = ["full", "lora", "adapter", "ia3", "prefix", "prompt"]


class LoraLinear(torch.nn.Module if torch else object):
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


class Adapter(torch.nn.Module if torch else object):
    def __init__(self, d, b):
        super().__init__()
        self.down = torch.nn.Linear(d, b)
        self.up = torch.nn.Linear(b, d)
        torch.nn.init.normal_(self.up.weight, std=0.02)
        torch.nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(F.relu(self.down(x)))


class Block(torch.nn.Module if torch else object):
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


class Model(torch.nn.Module if torch else object):
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


def worker(method, threads, min_time, min_warmup):
    harness.init_torch(threads)
    m = build(method)
    x = torch.rand(B, S, P) * 2 - 1
    g = torch.rand(B, C) * 2 - 1
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    def step():
        opt.zero_grad(set_to_none=True)
        m(x).backward(g)
        opt.step()

    r = harness.measure(step, min_warmup, min_time)
    r["trainable_%"] = 100.0 * sum(p.numel() for p in params) / sum(p.numel() for p in m.parameters())
    r["torch_threads"] = torch.get_num_threads()
    print(json.dumps(r))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=1.0)
    ap.add_argument("--min-warmup", type=float, default=1.0)
    ap.add_argument("--peer", action="append", default=[], help="NAME=PYTHON (default: every installed torch)")
    ap.add_argument("--methods", nargs="+", default=METHODS)
    ap.add_argument("--worker", metavar="METHOD")
    ap.add_argument("--info", action="store_true")
    args = ap.parse_args()
    if args.info:
        print(json.dumps(harness.info_json()))
        return
    if args.worker:
        worker(args.worker, args.threads[0], args.min_time, args.min_warmup)
        return
    script = os.path.abspath(__file__)
    peers = harness.parse_peers(args.peer)
    peak, isa = harness.fma_peak(args.binary)
    harness.print_versions(peers, script, args.binary,
                     f"FMA peak (one core, {isa}, BM_FmaPeak): {peak:.1f} GF/s. One step = zero_grad + forward + "
                     f"backward + AdamW, batch {B} x seq {S}, d {D}, {L} blocks, float32. Medians of "
                     f"{args.repeats} interleaved rounds; FLOPs per step counted by our binary (step_flops); warm-up {args.min_warmup} s, timed >= {args.min_time} s.")
    res = {}  # (threads, method, side) -> list of dicts
    for rnd in range(args.repeats):
        for t in args.threads:
            for i, method in enumerate(METHODS):
                if method not in args.methods:
                    continue
                o = harness.run_ours(args.binary, f"^BM_TransformerStep/method:{i}/", t, args.min_time, args.min_warmup)
                res.setdefault((t, method, "ours"), []).append(o)
                for name, py in peers:
                    r = harness.run_worker(py, script, [method, "--min-time", str(args.min_time), "--min-warmup",
                                                  str(args.min_warmup)], t)
                    res.setdefault((t, method, name), []).append(r)
        print(f"round {rnd + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    med = harness.median
    for t in args.threads:
        print(f"\n== {t} thread{'s' if t > 1 else ''} ==")
        print(f"{'method':8} {'side':7} {'wall ms':>8} {'peer/ours':>9} {'cpu ms':>8} {'(ratio)':>7} {'GF/s':>6} "
              f"{'%peak':>6} {'GF/s cpu':>8} {'%pk cpu':>7} {'cpu/wall':>8} {'first/st':>8} {'(cpu)':>6} "
              f"{'allocs/st':>9} {'faults/st':>9} {'train%':>7}")
        for method in METHODS:
            if (t, method, "ours") not in res:
                continue
            ours = res[(t, method, "ours")]
            flops = ours[0]["GFLOP/step"] * 1e9
            o_ms, o_cpu = med([b["step_s"] for b in ours]), med([b["cpu_s"] for b in ours])
            print(f"{method:8} {'ours':7} {o_ms * 1e3:8.1f} {'':>9} {o_cpu * 1e3:8.1f} {'':>7} {flops / o_ms * 1e-9:6.1f} "
                  f"{100 * flops / o_ms * 1e-9 / peak:6.1f} {flops / o_cpu * 1e-9:8.1f} "
                  f"{100 * flops / o_cpu * 1e-9 / peak:7.1f} {med([b['cpu_wall'] for b in ours]):8.2f} "
                  f"{med([b['first/steady'] for b in ours]):8.2f} {med([b['first/steady_cpu'] for b in ours]):6.2f} "
                  f"{med([b['allocs/step'] for b in ours]):9.1f} {med([b['faults/step'] for b in ours]):9.1f} "
                  f"{ours[0]['trainable_%']:7.3f}")
            for name, _ in peers:
                rs = res[(t, method, name)]
                p_ms, p_cpu = med([r["step_s"] for r in rs]), med([r["cpu_s"] for r in rs])
                print(f"{'':8} {name:7} {p_ms * 1e3:8.1f} {p_ms / o_ms:9.2f} {p_cpu * 1e3:8.1f} {p_cpu / o_cpu:7.2f} "
                      f"{flops / p_ms * 1e-9:6.1f} {100 * flops / p_ms * 1e-9 / peak:6.1f} {flops / p_cpu * 1e-9:8.1f} "
                      f"{100 * flops / p_cpu * 1e-9 / peak:7.1f} {med([r['cpu_wall'] for r in rs]):8.2f} "
                      f"{med([r['first_s'] / r['step_s'] for r in rs]):8.2f} "
                      f"{med([r['first_cpu_s'] / r['cpu_s'] for r in rs]):6.2f} {'-':>9} "
                      f"{med([r['faults'] for r in rs]):9.1f} {rs[0]['trainable_%']:7.3f}")
    print("\nstep ms: wall time per step; cpu ms: process CPU time per step (all threads; on a loaded machine the "
          "steadier figure), (ratio): peer/ours on CPU time. GF/s and %peak: FLOPs over wall time, against one core's FMA peak; "
          "GF/s cpu, %pk cpu: over CPU time (per-core efficiency, what survives a loaded machine). "
          "peer/ours > 1: ours is faster. first/st: the first step of a fresh model (no warm-up call) over a "
          "steady one. allocs/st: heap allocations per steady step (ours: malloc interposed; the peer's are not "
          "counted). cpu/wall: process CPU over wall time in the timed loop (1.0 = one busy thread).")


if __name__ == "__main__":
    main()
