"""Shared by transformer_peer.py and lora_peer.py: an honest side-by-side harness.

- Every measurement runs in a fresh process: ours is the Google Benchmark binary (JSON output,
  --benchmark_min_warmup_time so the timed iterations are steady-state; the binary keeps one model
  per method for the whole process, so the warm-up warms the very model that is timed), the peer is
  this same script in --worker mode under each peer Python.
- Thread variables (OMP_NUM_THREADS, MKL_NUM_THREADS, OPENBLAS_NUM_THREADS, ...) are set in the
  environment of that process, i.e. BEFORE it imports torch, and the worker also calls
  torch.set_num_threads / set_num_interop_threads. OpenBLAS sizes its pool at load time and ignores
  torch.set_num_threads(1) when the variable is not set (a 512x4096x4096 product then runs on two
  cores).
- Both sides report wall and process CPU time per step: cpu/wall shows how many threads really
  worked. Both report minor page faults per step; ours also heap allocations per step.
- Rounds are interleaved (ours, peer A, peer B for each case, then the next case; then the next
  round) and medians are printed, so slow phases of a shared machine hit all sides alike.

The driver does not import torch; the peers are given by --peer NAME=PYTHON (default: Debian's
/usr/bin/python3 and the pinned venv ~/.cache/peft-peer/bin/python, each when it imports torch).
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "BLIS_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS")


def openblas_coretype():
    """The OpenBLAS kernel family for this CPU, unless OPENBLAS_CORETYPE is already set.

    Debian's OpenBLAS (0.3.21) picks its kernels by CPU model and falls back to Prescott (SSE3, ~4x
    slower) on models it does not know: on an Emerald Rapids Xeon (family 6, model 207) Debian's
    torch ran the transformer step at 29 GF/s instead of ~100. So the harness names the family from
    the CPU's flags: SkylakeX (AVX-512) or Haswell (AVX2)."""
    if os.environ.get("OPENBLAS_CORETYPE"):
        return os.environ["OPENBLAS_CORETYPE"]
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return None
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= set(flags):
        return "SkylakeX"
    if "avx2" in flags and "fma" in flags:
        return "Haswell"
    return None


def thread_env(threads):
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    for k in THREAD_VARS:
        env[k] = str(threads)
    core = openblas_coretype()
    if core:
        env["OPENBLAS_CORETYPE"] = core
    return env


def set_threads_before_torch(argv):
    """Worker side: set the thread variables from --threads before torch is imported."""
    if "--threads" in argv:
        t = argv[argv.index("--threads") + 1]
        for k in THREAD_VARS:
            os.environ[k] = t


def default_peers():
    peers = []
    for name, py in (("debian", "/usr/bin/python3"), ("pinned", os.path.expanduser("~/.cache/peft-peer/bin/python"))):
        if os.path.exists(py) and subprocess.run([py, "-c", "import torch"], capture_output=True).returncode == 0:
            peers.append((name, py))
    return peers


def parse_peers(specs):
    if not specs:
        return default_peers()
    return [tuple(s.split("=", 1)) for s in specs]


def torch_info(python, script):
    out = subprocess.run([python, script, "--info"], check=True, capture_output=True, text=True, env=thread_env(1))
    return json.loads(out.stdout)


# ---- worker side (imports torch) ----------------------------------------------------------------

def minflt():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(step, min_warmup, min_time):
    """First step (cold), then warm-up for min_warmup s, then steady steps for min_time s."""
    f0, c0, t0 = minflt(), time.process_time(), time.perf_counter()
    step()
    first = time.perf_counter() - t0
    first_cpu = time.process_time() - c0
    first_faults = minflt() - f0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < min_warmup:
        step()
    n, f0, c0, t0 = 0, minflt(), time.process_time(), time.perf_counter()
    while True:
        step()
        n += 1
        wall = time.perf_counter() - t0
        if wall >= min_time and n >= 3:
            break
    cpu = time.process_time() - c0
    return {"step_s": wall / n, "cpu_s": cpu / n, "cpu_wall": cpu / wall, "faults": (minflt() - f0) / n, "first_s": first, "first_cpu_s": first_cpu,
            "first_faults": first_faults, "iterations": n}


def info_json():
    import re
    import torch
    torch.ones(64, 64) @ torch.ones(64, 64)  # loads the BLAS
    cfg = torch.__config__.show()
    blas = sorted(set(re.findall(r"BLAS_INFO=[^,]*", cfg)))
    with open("/proc/self/maps") as f:  # the BLAS library actually loaded
        libs = sorted({line.split()[-1] for line in f if re.search(r"blas|mkl|blis", line.split()[-1], re.I)})
    blas += [os.path.basename(os.path.realpath(lib)) for lib in libs if lib.endswith(".so") or ".so." in lib]
    blas += [line.strip() for line in torch.__config__.parallel_info().splitlines() if "MKL" in line or "OpenMP" in line]
    return {"torch": torch.__version__, "python": sys.version.split()[0], "blas": blas,
            "parallel": torch.__config__.parallel_info().splitlines()[:6], "config": cfg}


def init_torch(threads):
    import torch
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    return torch


# ---- driver side ---------------------------------------------------------------------------------

def run_ours(binary, filter_regex, threads, min_time, min_warmup):
    out = subprocess.run(
        [binary, f"--benchmark_filter={filter_regex}", f"--benchmark_min_time={min_time}",
         f"--benchmark_min_warmup_time={min_warmup}", "--benchmark_format=json"],
        check=True, capture_output=True, text=True, env=thread_env(threads))
    runs = [b for b in json.loads(out.stdout)["benchmarks"] if b.get("run_type", "iteration") == "iteration"]
    if not runs:
        raise RuntimeError(f"no benchmark matches {filter_regex} in {binary}")
    b = runs[0]
    scale = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0}[b["time_unit"]]
    b["step_s"] = b["real_time"] * scale
    b["cpu_s"] = b["cpu_time"] * scale
    b["cpu_wall"] = b.get("cpu/wall", b["cpu_time"] / b["real_time"])
    return b


def run_worker(python, script, args, threads):
    out = subprocess.run([python, script, "--worker", *args, "--threads", str(threads)], check=True,
                         capture_output=True, text=True, env=thread_env(threads))
    return json.loads(out.stdout.strip().splitlines()[-1])


def fma_peak(binary):
    out = subprocess.run([binary, "--benchmark_filter=BM_FmaPeak$", "--benchmark_min_time=0.3",
                          "--benchmark_format=json"], check=True, capture_output=True, text=True,
                         env=thread_env(1))
    b = json.loads(out.stdout)["benchmarks"][0]
    return b["GF/s"], b.get("label", "")


def median(xs):
    return statistics.median(xs)


def print_versions(peers, script, binary, header):
    ctx = subprocess.run([binary, "--benchmark_filter=BM_FmaPeak$", "--benchmark_min_time=0.01",
                          "--benchmark_format=json"], capture_output=True, text=True).stdout
    try:
        c = json.loads(ctx)["context"]
        print(f"ours: {binary}; {c.get('num_cpus')} CPUs at {c.get('mhz_per_cpu')} MHz; Google Benchmark "
              f"library build {c.get('library_build_type')}")
    except (ValueError, KeyError):
        pass
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
        print(f"cpu: {cpu}; load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} at start; "
              f"OPENBLAS_CORETYPE={openblas_coretype() or '(OpenBLAS decides)'}")
    except (OSError, StopIteration):
        pass
    for name, py in peers:
        i = torch_info(py, script)
        print(f"peer {name}: {py}: torch {i['torch']} (python {i['python']}); " + "; ".join(i["blas"]))
        print("  " + "; ".join(line.strip() for line in i["parallel"][:5]))
    print(header)
