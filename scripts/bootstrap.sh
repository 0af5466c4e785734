#!/usr/bin/env bash
# Installs the Debian packages peft-cpp needs, only those missing. Nothing is downloaded from
# anywhere but the distribution's package registry.
#   scripts/bootstrap.sh            build + tests + examples (default)
#   scripts/bootstrap.sh --clang    also clang++ and its sanitizer/libFuzzer runtimes (the asan
#                                   preset and the fuzzers build with clang)
#   scripts/bootstrap.sh --peer     also python3-torch and OpenBLAS (PyTorch peer benchmark scripts)
#   scripts/bootstrap.sh --blas     also OpenBLAS for the release-blas preset (PEFT_USE_BLAS)
#   scripts/bootstrap.sh --docs     also Doxygen (the peft_docs target: API reference from the headers)
set -euo pipefail

packages=(cmake ninja-build g++ libeigen3-dev catch2 nlohmann-json3-dev libbenchmark-dev zlib1g-dev
          dataset-fashion-mnist)
for arg in "$@"; do
  case "$arg" in
    --clang|--fuzz) packages+=(clang libclang-rt-dev) ;;
    # Debian's torch calls the system BLAS: without OpenBLAS that is the reference BLAS, ~30x slower
    # than an optimized GEMM, which would make every comparison meaningless. The OpenMP build
    # follows torch.set_num_threads.
    --peer) packages+=(python3-torch libopenblas0-openmp libblas-dev) ;;
    --blas) packages+=(libopenblas0-openmp libblas-dev) ;;  # the release-blas preset (PEFT_USE_BLAS)
    --docs) packages+=(doxygen) ;;  # the peft_docs target
    *) echo "bootstrap.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

echo "bootstrap: installing ${missing[*]}"
sudo_cmd=()
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || { echo "bootstrap: need root or sudo to install ${missing[*]}" >&2; exit 1; }
  sudo_cmd=(sudo)
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo_cmd[@]}" apt-get update -q || true   # a stale index is still worth a try
"${sudo_cmd[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
