#!/usr/bin/env bash
# Builds bench_lora and runs it interleaved with the PyTorch peer. Usage: run_lora_peer.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --peer
cmake --preset release -DPEFT_BUILD_BENCHMARKS=ON >/dev/null
cmake --build --preset release --target bench_lora
/usr/bin/python3 benchmarks/peer/lora_peer.py build/release/benchmarks/bench_lora --threads "${1:-1}"
