#!/usr/bin/env bash
# Set up, build and run every test. Usage: scripts/test.sh [preset]   (release | debug | asan)
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-release}"
if [ "$preset" = asan ]; then
  bash scripts/bootstrap.sh --clang  # the sanitizer build uses clang++ (faster, and a second compiler)
else
  bash scripts/bootstrap.sh
fi
cmake --preset "$preset"
cmake --build --preset "$preset" --target peft_test_deps  # what ctest runs (not the benchmarks)
ctest --preset "$preset" -j "$(nproc)"
