#!/usr/bin/env bash
# Builds bench_llama and runs it interleaved with the transformers + peft peer
# (benchmarks/peer/llama_peer.py: the same 12.6 M-parameter Llama, the same LoRA, batch and
# generation), at 1 and 2 threads, printing medians of LoRA training tokens/s and greedy generation
# tokens/s with each side's CPU-time / wall-time ratio (the cores it really used).
# Usage: run_llama_peer.sh [repeats] [min-time-seconds] [threads, e.g. 1,2]
#   BENCH=path/to/bench_llama skips the build; PEER_PYTHON (default ~/.cache/peft-peer/bin/python)
#   is a Python with torch, transformers and peft (benchmarks/peer/requirements.txt).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BENCH:-}" ]; then
  cmake --preset "${PRESET:-release}" -DPEFT_BUILD_BENCHMARKS=ON >/dev/null
  cmake --build --preset "${PRESET:-release}" --target bench_llama
  BENCH="build/${PRESET:-release}/benchmarks/bench_llama"
fi
PY="${PEER_PYTHON:-$HOME/.cache/peft-peer/bin/python}"
"$PY" benchmarks/peer/llama_peer.py "$BENCH" --repeats "${1:-5}" --min-time "${2:-5}" --threads "${3:-1,2}"
