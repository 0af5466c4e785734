#!/usr/bin/env bash
# I/O benchmarks: safetensors load throughput vs. a plain read (bench_io), and `peft merge` on a
# ≥ 1 GB model: wall time vs. `cp` of the same file and peak RSS vs. the largest tensor
# (/usr/bin/time -v). Goals: load ≥ 0.8× read; merge ≤ 2× copy; peak RSS ≤ 2× largest tensor.
#
#   benchmarks/run_io.sh BUILD_DIR [LAYERS] [DTYPE]
# BUILD_DIR holds benchmarks/bench_io, benchmarks/make_big_model and tools/peft (a release build with
# benchmarks and examples). The model is generated under /tmp by make_big_model (no Python needed)
# and deleted at exit.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:?usage: run_io.sh BUILD_DIR [LAYERS] [DTYPE]}"
LAYERS="${2:-8}"
DTYPE="${3:-F32}"
WORK="$(mktemp -d /tmp/peft_io_bench.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

echo "== load throughput (bench_io)"
"$BUILD/benchmarks/bench_io" --benchmark_format=json --benchmark_min_time=1 > "$WORK/bench.json"
python3 - "$WORK/bench.json" <<'PY'
import json, sys
b = {x["name"]: x["bytes_per_second"] for x in json.load(open(sys.argv[1]))["benchmarks"]}
read = b["BM_SequentialRead/real_time"]
for k, v in b.items():
    print(f"{k:32s} {v / 2**30:7.2f} GiB/s   {v / read:5.2f}x read")
PY

echo "== generating a $LAYERS-layer $DTYPE model in $WORK"
"$BUILD/benchmarks/make_big_model" "$WORK" "$LAYERS" "$DTYPE"
SIZE=$(stat -c %s "$WORK/base.safetensors")
LARGEST=$(python3 - "$WORK/base.safetensors" <<'PY'
import json, struct, sys
f = open(sys.argv[1], "rb"); n = struct.unpack("<Q", f.read(8))[0]; h = json.loads(f.read(n))
print(max(v["data_offsets"][1] - v["data_offsets"][0] for k, v in h.items() if k != "__metadata__"))
PY
)
cat "$WORK/base.safetensors" > /dev/null  # warm the page cache for both measurements
sync
t0=$(date +%s.%N); cp "$WORK/base.safetensors" "$WORK/copy.safetensors"; sync; t1=$(date +%s.%N)
rm -f "$WORK/copy.safetensors"
sync
t2=$(date +%s.%N)  # like cp, timed up to the data being on disk (sync)
/usr/bin/time -v "$BUILD/tools/peft" merge --base "$WORK/base.safetensors" --adapter "$WORK/adapter" \
  --out "$WORK/merged.safetensors" 2> "$WORK/time.txt" > /dev/null
sync; t3=$(date +%s.%N)
RSS_KB=$(grep "Maximum resident set size" "$WORK/time.txt" | awk '{print $NF}')
python3 - "$SIZE" "$LARGEST" "$t0" "$t1" "$t2" "$t3" "$RSS_KB" <<'PY'
import sys
size, largest, t0, t1, t2, t3, rss_kb = sys.argv[1:]
size, largest, copy, m = int(size), int(largest), float(t1) - float(t0), float(t3) - float(t2)
rss = int(rss_kb) * 1024
print(f"model {size / 1e9:.2f} GB, largest tensor {largest / 1e6:.1f} MB")
print(f"cp: {copy:.2f} s   peft merge: {m:.2f} s   ratio {m / copy:.2f}x (goal <= 2)")
print(f"peak RSS {rss / 1e6:.1f} MB = {rss / largest:.2f}x largest tensor (goal <= 2)")
PY
