#!/usr/bin/env bash
# Builds bench_lora and runs it interleaved with the PyTorch peers at 1 and 2 threads (see
# run_transformer_peer.sh for what is printed and benchmarks/peer/peer_harness.py for how).
# Usage: run_lora_peer.sh [repeats] [extra lora_peer.py options, e.g. --threads 1]
#   BENCH=path/to/bench_lora skips the build; PRESET=release-blas builds ours with Eigen on the
#   system BLAS (OpenBLAS, as Debian's torch uses).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BENCH:-}" ]; then
  bash scripts/bootstrap.sh --peer
  cmake --preset "${PRESET:-release}" -DPEFT_BUILD_BENCHMARKS=ON >/dev/null
  cmake --build --preset "${PRESET:-release}" --target bench_lora
  BENCH="build/${PRESET:-release}/benchmarks/bench_lora"
fi
python3 benchmarks/peer/lora_peer.py "$BENCH" --repeats "${1:-3}" "${@:2}"
