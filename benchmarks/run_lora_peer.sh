#!/usr/bin/env bash
# Builds bench_lora and runs it interleaved with the PyTorch peer. Usage: run_lora_peer.sh [threads]
# PRESET=release-blas builds ours with Eigen on the system BLAS (OpenBLAS, as the peer uses).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh --peer
cmake --preset "${PRESET:-release}" -DPEFT_BUILD_BENCHMARKS=ON >/dev/null
cmake --build --preset "${PRESET:-release}" --target bench_lora
/usr/bin/python3 benchmarks/peer/lora_peer.py "build/${PRESET:-release}/benchmarks/bench_lora" --threads "${1:-1}"
