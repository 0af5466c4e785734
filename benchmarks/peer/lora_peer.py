#!/usr/bin/python3
"""PyTorch peer for benchmarks/bench_lora.cpp.

Runs each (rows, in, out, r) case in PyTorch and, interleaved with it, the same case of our
Google Benchmark binary, at 1 and 2 threads, against every installed peer (Debian's torch and the
pinned venv's), and prints per op: both times and their ratio, GF/s and % of the core's FMA peak,
CPU/wall, first call / steady call, allocations (ours) and page faults per call. Interleaving keeps
all sides under the same machine load (the machines are shared and noisy). See peer_harness.py for
what makes it honest (fresh processes: one per side and case; thread variables set before torch is
imported; warm-up before timing; CPU/wall printed).

usage: lora_peer.py BENCH_BINARY [--threads 1 2] [--repeats K] [--min-time S] [--min-warmup S]
                    [--peer NAME=PYTHON ...]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_harness as harness  # noqa: E402

if __name__ == "__main__" and "--worker" in sys.argv:
    harness.set_threads_before_torch(sys.argv)  # before torch is imported
if "--worker" in sys.argv or "--info" in sys.argv:
    import torch
else:  # the driver never imports torch
    torch = None

CASES = [(64, 256, 256, 8), (512, 1024, 1024, 16), (512, 4096, 4096, 16)]
OPS = ["LinearForward", "LinearBackward", "LinearTrainStep", "LoraForward", "LoraMergedForward", "LoraBackward",
       "LoraTrainStep"]


class LoraLinear(torch.nn.Module if torch else object):
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


def time_torch(fn, min_time, min_warmup=0.3):
    return harness.measure(fn, min_warmup, min_time)


def minus(total, part):
    """A backward-only time: the forward + backward measurement less a forward measurement."""
    r = dict(total)
    r["step_s"] = max(total["step_s"] - part["step_s"], 1e-9)
    r["first_s"] = max(total["first_s"] - part["first_s"], 1e-9)
    return r


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
            return minus(total, f)
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
        return minus(total, f)
    if op == "LoraTrainStep":
        opt = torch.optim.AdamW([layer.lora_A.weight, layer.lora_B.weight], lr=1e-3, weight_decay=0.01)

        def step():
            opt.zero_grad(set_to_none=False)
            y = layer(x)
            y.backward(dy)
            opt.step()
        return time_torch(step, min_time)
    raise ValueError(op)


def worker(case, threads, min_time, min_warmup):
    harness.init_torch(threads)
    rows, d_in, d_out, r = case
    out = {}
    for op in OPS:
        out[op] = torch_case(op, rows, d_in, d_out, r, min_time)
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--min-warmup", type=float, default=0.3)
    ap.add_argument("--peer", action="append", default=[], help="NAME=PYTHON (default: every installed torch)")
    ap.add_argument("--worker", metavar="ROWS,IN,OUT,R")
    ap.add_argument("--info", action="store_true")
    args = ap.parse_args()
    if args.info:
        print(json.dumps(harness.info_json()))
        return
    if args.worker:
        worker(tuple(int(v) for v in args.worker.split(",")), args.threads[0], args.min_time, args.min_warmup)
        return
    script = os.path.abspath(__file__)
    peers = harness.parse_peers(args.peer)
    peak, isa = harness.fma_peak(args.binary)
    harness.print_versions(peers, script, args.binary,
                     f"FMA peak (one core, {isa}, BM_FmaPeak): {peak:.1f} GF/s. float32; medians of {args.repeats} "
                     f"interleaved rounds; warm-up {args.min_warmup} s, timed >= {args.min_time} s per op.")
    res = {}  # (threads, case, op, side) -> list
    for rnd in range(args.repeats):
        for t in args.threads:
            for case in CASES:
                rows, d_in, d_out, r = case
                out = harness.subprocess.run(
                    [args.binary, f"--benchmark_filter=/rows:{rows}/in:{d_in}/out:{d_out}/r:{r}/",
                     f"--benchmark_min_time={args.min_time}", f"--benchmark_min_warmup_time={args.min_warmup}",
                     "--benchmark_format=json"], check=True, capture_output=True, text=True, env=harness.thread_env(t))
                for b in json.loads(out.stdout)["benchmarks"]:
                    op = b["name"].split("/")[0][3:]
                    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
                    b["step_s"] = b["real_time"] * scale
                    res.setdefault((t, case, op, "ours"), []).append(b)
                for name, py in peers:
                    w = harness.run_worker(py, script, [",".join(map(str, case)), "--min-time", str(args.min_time),
                                                  "--min-warmup", str(args.min_warmup)], t)
                    for op, v in w.items():
                        res.setdefault((t, case, op, name), []).append(v)
        print(f"round {rnd + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    med = harness.median
    for t in args.threads:
        print(f"\n== {t} thread{'s' if t > 1 else ''} ==")
        print(f"{'case (rows,in,out,r)':22} {'op':18} {'side':7} {'ms':>8} {'peer/ours':>9} {'cpu ms':>8} {'(ratio)':>7} {'GF/s':>6} {'%peak':>6} "
              f"{'cpu/wall':>8} {'first/st':>8} {'allocs':>6} {'faults':>7}")
        for case in CASES:
            for op in OPS:
                ours = res[(t, case, op, "ours")]
                flops = ours[0]["GFLOP/step"] * 1e9
                o = med([b["step_s"] for b in ours])
                oc = med([b["cpu_time"] / b["real_time"] * b["step_s"] for b in ours])
                print(f"{str(case):22} {op:18} {'ours':7} {o * 1e3:8.3f} {'':>9} {oc * 1e3:8.3f} {'':>7} {flops / o * 1e-9:6.1f} "
                      f"{100 * flops / o * 1e-9 / peak:6.1f} {med([b['cpu/wall'] for b in ours]):8.2f} "
                      f"{med([b['first/steady'] for b in ours]):8.2f} {med([b['allocs/step'] for b in ours]):6.1f} "
                      f"{med([b['faults/step'] for b in ours]):7.1f}")
                for name, _ in peers:
                    rs = res[(t, case, op, name)]
                    p_ = med([v["step_s"] for v in rs])
                    pc = med([v["cpu_wall"] * v["step_s"] for v in rs])
                    print(f"{'':22} {'':18} {name:7} {p_ * 1e3:8.3f} {p_ / o:9.2f} {pc * 1e3:8.3f} {pc / oc:7.2f} {flops / p_ * 1e-9:6.1f} "
                          f"{100 * flops / p_ * 1e-9 / peak:6.1f} {med([v['cpu_wall'] for v in rs]):8.2f} "
                          f"{med([v['first_s'] / v['step_s'] for v in rs]):8.2f} {'-':>6} {med([v['faults'] for v in rs]):7.1f}")
    print("\npeer/ours > 1: ours is faster. Backward rows: forward+backward less a separately timed forward (the "
          "peer; ours times backward alone). first/st: the first call on a fresh layer over a steady one.")


if __name__ == "__main__":
    main()
