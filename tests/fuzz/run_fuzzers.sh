#!/usr/bin/env bash
# Builds the libFuzzer targets (clang++, ASan + UBSan) and runs each for a bounded time, seeded from
# tests/data. Exits non-zero if a target crashes, leaks, trips a sanitizer or fails to build.
#
#   tests/fuzz/run_fuzzers.sh                 # 20 s per target (what CI runs)
#   FUZZ_SECONDS=3600 tests/fuzz/run_fuzzers.sh   # longer local campaign
#   FUZZ_JOBS=4 ...                           # parallel fuzzing jobs per target
#   FUZZ_PARALLEL=1 ...                       # targets built and run one at a time (default: nproc)
# Targets are built, then run, FUZZ_PARALLEL at a time (each run on JOBS cores); every target's
# output goes to $OUT/logs/ and is printed in order once all have finished.
# The growing corpus is kept in build-fuzz/corpus/<target>/ between runs (delete it to restart);
# a crashing input is written to build-fuzz/artifacts/ and can be replayed with
#   build-fuzz/<target> build-fuzz/artifacts/crash-...
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
OUT="${FUZZ_BUILD_DIR:-$ROOT/build-fuzz}"
SECONDS_PER_TARGET="${FUZZ_SECONDS:-20}"
JOBS="${FUZZ_JOBS:-1}"
PAR="${FUZZ_PARALLEL:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}"
CXX="${FUZZ_CXX:-clang++}"
mkdir -p "$OUT/artifacts" "$OUT/logs"

EIGEN_INC="$(pkg-config --cflags-only-I eigen3 2>/dev/null || echo -I/usr/include/eigen3)"
FLAGS=(-std=c++17 -O1 -g -fno-omit-frame-pointer -fsanitize=fuzzer,address,undefined
       -fno-sanitize-recover=undefined -I"$ROOT/include" $EIGEN_INC -Wall -Wextra -Werror)

TARGETS=(fuzz_safetensors fuzz_adapter_config fuzz_regex fuzz_checkpoint fuzz_bnb_nf4 fuzz_adapter_merge
         fuzz_load_state fuzz_tokenizer fuzz_llama_config)

# for_each_target FN: FN target for every target, PAR at a time, each in the background with its output in
# $OUT/logs/<target>.FN.log and its exit status in ….rc; then prints the logs in order and fails if any failed.
for_each_target() {
  local fn=$1 t failed=0
  for t in "${TARGETS[@]}"; do
    while (( $(jobs -rp | wc -l) >= PAR )); do sleep 0.2; done
    ( if "$fn" "$t" > "$OUT/logs/$t.$fn.log" 2>&1; then echo 0; else echo 1; fi > "$OUT/logs/$t.$fn.rc" ) &
  done
  wait
  for t in "${TARGETS[@]}"; do
    cat "$OUT/logs/$t.$fn.log"
    if [[ $(cat "$OUT/logs/$t.$fn.rc" 2>/dev/null) != 0 ]]; then
      echo "!! $t FAILED in $fn (see $OUT/artifacts/ and $OUT/logs/$t.$fn.log)"
      failed=1
    fi
  done
  return $failed
}

build() {
  echo "== building $1"
  "$CXX" "${FLAGS[@]}" "$ROOT/tests/fuzz/$1.cpp" -o "$OUT/$1"
}

seed() {
  local target=$1 i d n f t p
  local seeds="$OUT/seeds/$target"
  rm -rf "$seeds" && mkdir -p "$seeds" "$OUT/corpus/$target"
  if [[ $target == fuzz_safetensors || $target == fuzz_load_state ]]; then
    find "$ROOT/tests/data" -name '*.safetensors' -exec cp {} "$seeds/" \;
  elif [[ $target == fuzz_checkpoint ]]; then
    cp "$ROOT/tests/data/fuzz/checkpoint_seed.safetensors" "$seeds/"
  elif [[ $target == fuzz_adapter_merge ]]; then
    i=0  # each adapter directory as one input: a 2-byte little-endian config length, config, weights
    for d in "$ROOT"/tests/data/*/; do
      [[ -f $d/adapter_config.json && -f $d/adapter_model.safetensors ]] || continue
      n=$(stat -c %s "$d/adapter_config.json")
      printf "\\x$(printf %02x $((n & 255)))\\x$(printf %02x $((n >> 8)))" > "$seeds/dir_$((i++))"
      cat "$d/adapter_config.json" "$d/adapter_model.safetensors" >> "$seeds/dir_$((i - 1))"
    done
  elif [[ $target == fuzz_bnb_nf4 ]]; then
    find "$ROOT/tests/quant/data" -name '*.safetensors' -exec cp {} "$seeds/" \;
  elif [[ $target == fuzz_tokenizer ]]; then
    i=0  # the fixture files (JSON mode) and a few texts (text mode)
    for f in "$ROOT"/tests/data/tokenizers/*/tokenizer.json; do cp "$f" "$seeds/tokenizer_$((i++)).json"; done
    i=0
    for t in "Hello world, I'LL be there" $'tabs\t\tand\r\n\n  spaces  ' "12345 3.14 \xc3\xa9t\xc3\xa9 \xf0\x9f\x98\x80" \
             "<|endoftext|>x<s>y</s><|begin_of_text|><tool> dog"; do
      printf '%b' "$t" > "$seeds/text_$((i++))"
    done
  elif [[ $target == fuzz_regex ]]; then
    i=0
    for p in '.*\.(q_proj|v_proj)' '(.*\.)?(layers\.0\.attn\.q)' '(?:^|\.)layers\.(\d+)\.' '[^.]+\.fc{1,2}$' '(a|ab)(c|bcd)(d*)'; do
      printf '%s\0model.layers.0.self_attn.q_proj' "$p" > "$seeds/regex_$((i++))"
    done
  else
    i=0
    while IFS= read -r f; do cp "$f" "$seeds/config_$((i++)).json"; done < <(find "$ROOT/tests/data" -name '*.json')
  fi
}

fuzz() {
  local target=$1 parallel=()
  if (( JOBS > 1 )); then parallel=(-jobs="$JOBS" -workers="$JOBS"); fi
  echo "== running $target for ${SECONDS_PER_TARGET}s"
  ASAN_OPTIONS=detect_leaks=1:allocator_may_return_null=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$OUT/$target" "$OUT/corpus/$target" "$OUT/seeds/$target" -max_total_time="$SECONDS_PER_TARGET" -max_len=65536 \
    -rss_limit_mb=2048 -timeout=10 "${parallel[@]}" -artifact_prefix="$OUT/artifacts/" -print_final_stats=1
}

for_each_target build
for t in "${TARGETS[@]}"; do seed "$t"; done
for_each_target fuzz
