#!/usr/bin/env bash
# Set up, build and run every test. Usage: scripts/test.sh [preset]   (release | debug | asan)
set -euo pipefail
cd "$(dirname "$0")/.."
preset="${1:-release}"
bash scripts/bootstrap.sh
cmake --preset "$preset"
cmake --build --preset "$preset"
ctest --preset "$preset" -j "$(nproc)"
