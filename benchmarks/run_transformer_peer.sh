#!/usr/bin/env bash
# Builds bench_transformer and runs it interleaved with the PyTorch peers (same model, same six
# methods, one training step each) at 1 and 2 threads, printing per method: ours and each peer
# (Debian's torch; the pinned venv's ~/.cache/peft-peer torch when installed), the ratio, GF/s, % of
# the core's FMA peak, CPU/wall, first step / steady step, allocations and page faults per step.
# Thread variables are set before each peer imports torch (benchmarks/peer/peer_harness.py).
# Usage: run_transformer_peer.sh [repeats] [extra transformer_peer.py options, e.g. --threads 1]
#   BENCH=path/to/bench_transformer skips the build and uses that binary; PRESET=release-blas builds
#   ours with Eigen on the system BLAS (OpenBLAS, as Debian's torch uses).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BENCH:-}" ]; then
  bash scripts/bootstrap.sh --peer
  cmake --preset "${PRESET:-release}" -DPEFT_BUILD_BENCHMARKS=ON >/dev/null
  cmake --build --preset "${PRESET:-release}" --target bench_transformer
  BENCH="build/${PRESET:-release}/benchmarks/bench_transformer"
fi
python3 benchmarks/peer/transformer_peer.py "$BENCH" --repeats "${1:-3}" "${@:2}"
