#!/usr/bin/env python3
"""transformers + peft peer of benchmarks/bench_llama.cpp, run interleaved with it.

The same model (transformers' LlamaForCausalLM, random init): vocab 8192, hidden 384, 6 layers,
6 heads over 2 key/value heads (head_dim 64), intermediate 1024 (SwiGLU), tied embeddings, rope
theta 10000, float32; the same LoRA (peft: r 8, alpha 16, dropout 0, target_modules "all-linear",
lora_B ~ N(0, 0.02) so every path does real work) and the same two measurements:

  train     zero_grad + forward + causal-LM loss (labels = ids) + backward + AdamW step
            (lr 1e-4, weight decay 0), batch 4 x seq 128 random tokens: tokens/s
  generate  greedy generate(max_new_tokens = min_new_tokens = 64, use_cache, no eos) after a
            16-token prompt, batch 1, the LoRA active and unmerged: new tokens/s

Two modes:
  llama_peer.py BENCH_BINARY [--threads 1,2] [--repeats 5] [--min-time 5]
      the driver (imports no torch): for each repeat and each thread count it runs our binary
      (OMP_NUM_THREADS) and then a child of this script in a fresh process, and prints medians.
  llama_peer.py --measure --threads N --min-time S
      one measurement: OMP_NUM_THREADS / MKL_NUM_THREADS / OPENBLAS_NUM_THREADS are set before torch
      is imported, then torch.set_num_threads(N); untimed warm-up (3 steps, 2 generations); then
      as many iterations as fit in S seconds; prints one JSON line with wall and process-CPU time.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

B, S, PROMPT, NEW = 4, 128, 16, 64


def measure(threads, min_time):
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    import torch  # noqa: E402  (after the environment, on purpose)
    import transformers
    import peft

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                                   num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                                   rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                                   bos_token_id=None, eos_token_id=None, pad_token_id=0)
    base = transformers.LlamaForCausalLM(cfg).float()
    params = sum(p.numel() for p in base.parameters())
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = torch.randint(0, cfg.vocab_size, (B, S))

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()

    prompt = torch.randint(0, cfg.vocab_size, (1, PROMPT))

    def gen():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW,
                             min_new_tokens=NEW, do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[1] == PROMPT + NEW

    def timed(fn, warmup):
        for _ in range(warmup):
            fn()
        n, w0, c0 = 0, time.perf_counter(), time.process_time()
        while True:
            fn()
            n += 1
            w = time.perf_counter() - w0
            if w >= min_time and n >= 3:
                return w / n, (time.process_time() - c0) / n

    model.train()
    tw, tc = timed(step, 3)
    model.eval()
    gw, gc = timed(gen, 2)
    blas = [l.split("=", 1)[1].split(",")[0] for l in torch.__config__.show().split() if l.startswith("BLAS_INFO")]
    print(json.dumps({
        "side": "torch", "threads": threads, "torch_threads": torch.get_num_threads(),
        "train_s": tw, "train_cpu_s": tc, "gen_s": gw, "gen_cpu_s": gc,
        "tokens_per_s": B * S / tw, "new_tokens_per_s": NEW / gw, "params": params,
        "trainable_pct": 100.0 * sum(p.numel() for p in trainable) / sum(p.numel() for p in model.parameters()),
        "versions": f"torch {torch.__version__} (BLAS {blas[0] if blas else '?'}, "
                    f"mkldnn {torch.backends.mkldnn.is_available()}), transformers {transformers.__version__}, "
                    f"peft {peft.__version__}, attn_implementation {base.config._attn_implementation}",
    }), flush=True)


def ours(binary, threads, min_time):
    env = {"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run([binary, f"--benchmark_min_time={min_time}", "--benchmark_min_warmup_time=1",
                          "--benchmark_format=json"], check=True, capture_output=True, text=True, env=env)
    res = {"side": "ours", "threads": threads}
    for b in json.loads(out.stdout)["benchmarks"]:
        scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
        key = "train" if b["name"].startswith("BM_LlamaLoraStep") else "gen"
        res[f"{key}_s"] = b["real_time"] * scale
        res[f"{key}_cpu_s"] = b["cpu_time"] * scale
        if key == "train":
            res["tokens_per_s"] = b["tokens/s"]
            res["params"] = b["params"]
            res["trainable_pct"] = b["trainable_%"]
        else:
            res["new_tokens_per_s"] = b["new_tokens/s"]
    return res


def torch_child(threads, min_time):
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--measure", "--threads", str(threads),
                          "--min-time", str(min_time)], check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def driver(args):
    threads = [int(t) for t in args.threads.split(",")]
    runs = {(side, t): [] for side in ("ours", "torch") for t in threads}
    with open("/proc/loadavg") as f:
        load0 = f.read().split()[:3]
    print(f"machine: {os.cpu_count()} cores, load average at start {' '.join(load0)}; "
          f"{args.repeats} interleaved repeats x threads {threads}, min time {args.min_time} s each", flush=True)
    versions = None
    for r in range(args.repeats):
        for t in threads:
            for side in ("ours", "torch"):
                res = ours(args.binary, t, args.min_time) if side == "ours" else torch_child(t, args.min_time)
                if side == "torch":
                    versions = res["versions"]
                runs[(side, t)].append(res)
                print(f"  repeat {r} threads {t} {side:5}: train {res['tokens_per_s']:8.0f} tokens/s "
                      f"(cpu/wall {res['train_cpu_s'] / res['train_s']:.2f}), generate {res['new_tokens_per_s']:6.1f} "
                      f"tokens/s (cpu/wall {res['gen_cpu_s'] / res['gen_s']:.2f})", flush=True)
    with open("/proc/loadavg") as f:
        load1 = f.read().split()[:3]
    print(f"peer: {versions}; load average at end {' '.join(load1)}")
    o0, t0 = runs[("ours", threads[0])][0], runs[("torch", threads[0])][0]
    print(f"model: {o0['params']:.0f} parameters (torch {t0['params']}), trainable {o0['trainable_pct']:.3f} % "
          f"(torch {t0['trainable_pct']:.3f} %)")
    med = statistics.median
    print(f"\nmedians of {args.repeats}; per CPU-second = per wall-second / (cpu/wall): what one busy core does, "
          "the fair figure when other processes share the cores")
    print("| threads | side | LoRA train tokens/s | per CPU-s | cpu/wall | greedy gen tokens/s | per CPU-s | cpu/wall |")
    print("|---|---|---|---|---|---|---|---|")
    for t in threads:
        for side, name in (("ours", "peft-cpp"), ("torch", "transformers + peft")):
            rs = runs[(side, t)]
            cw = {k: med(r[f"{k}_cpu_s"] / r[f"{k}_s"] for r in rs) for k in ("train", "gen")}
            tr, g = med(r["tokens_per_s"] for r in rs), med(r["new_tokens_per_s"] for r in rs)
            tr_c = med(r["tokens_per_s"] * r["train_s"] / r["train_cpu_s"] for r in rs)
            g_c = med(r["new_tokens_per_s"] * r["gen_s"] / r["gen_cpu_s"] for r in rs)
            print(f"| {t} | {name} | {tr:.0f} | {tr_c:.0f} | {cw['train']:.2f} | {g:.1f} | {g_c:.1f} | {cw['gen']:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary", nargs="?")
    ap.add_argument("--measure", action="store_true")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--min-time", type=float, default=5.0)
    args = ap.parse_args()
    if args.measure:
        measure(int(args.threads), args.min_time)
    else:
        if not args.binary:
            ap.error("the driver needs BENCH_BINARY (build/release/benchmarks/bench_llama)")
        driver(args)


if __name__ == "__main__":
    main()
