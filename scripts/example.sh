#!/usr/bin/env bash
# Set up, build and run the main example on its built-in default data. Extra arguments go to the
# example, e.g. scripts/example.sh --quick
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
cmake --preset release
cmake --build --preset release --target finetune_study
./build/release/examples/finetune_study/finetune_study "$@"
