#!/usr/bin/env bash
# Builds bench_transformer and runs it interleaved with the PyTorch peer (same model, same six
# methods, same thread count), printing both step times side by side with their ratio.
# Usage: run_transformer_peer.sh [threads] [repeats]
#   BENCH=path/to/bench_transformer skips the build and uses that binary; PRESET=release-blas builds
#   ours with Eigen on the system BLAS (OpenBLAS, as the peer uses).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${BENCH:-}" ]; then
  bash scripts/bootstrap.sh --peer
  cmake --preset "${PRESET:-release}" -DPEFT_BUILD_BENCHMARKS=ON >/dev/null
  cmake --build --preset "${PRESET:-release}" --target bench_transformer
  BENCH="build/${PRESET:-release}/benchmarks/bench_transformer"
fi
/usr/bin/python3 benchmarks/peer/transformer_peer.py "$BENCH" --threads "${1:-1}" --repeats "${2:-3}"
