#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time: `scripts/fuzz.sh [seconds]`
# (default 20 s per target). Installs cargo-fuzz if missing; needs the nightly toolchain.
# Fails (non-zero) on the first crash, leak, timeout or failed property; libFuzzer leaves
# the input in fuzz/artifacts/<target>/. New inputs found go to target/fuzz-corpus/<target>
# (the committed seeds in fuzz/corpus/<target> are only read). See docs/FUZZING.md.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-20}"
# The instrumented build shares nothing with the regular one (other flags, other
# toolchain), so it has its own target directory, kept outside the clone like cargo's
# registry cache: a fresh clone then rebuilds only what changed.
export CARGO_TARGET_DIR="${MES_FUZZ_TARGET_DIR:-${HOME:-/tmp}/.cache/mes-fuzz-target}"
# libFuzzer's instrumentation takes unstable compiler flags: nightly if it is installed,
# else the stable toolchain told to accept them (RUSTC_BOOTSTRAP=1).
if cargo +nightly --version >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  toolchain=()
  export RUSTC_BOOTSTRAP=1
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz =="
  cargo install --locked cargo-fuzz
fi

targets=$(cargo "${toolchain[@]}" fuzz list --fuzz-dir fuzz)
cargo "${toolchain[@]}" fuzz build --fuzz-dir fuzz
for t in $targets; do
  work="target/fuzz-corpus/$t"
  mkdir -p "$work"
  echo "== fuzz $t for ${seconds}s =="
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a runaway allocation.
  cargo "${toolchain[@]}" fuzz run --fuzz-dir fuzz "$t" "$work" "fuzz/corpus/$t" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1
done
echo "fuzz: every target ran ${seconds}s without a crash"
