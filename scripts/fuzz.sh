#!/usr/bin/env bash
# Runs every fuzz target (or the ones named) for SECONDS each, from the
# committed seed corpus, and prints executions and coverage per target.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Needs only the stable toolchain and a C++ compiler (libFuzzer is built
# from source by the libfuzzer-sys crate). It builds with the same
# coverage instrumentation `cargo fuzz build -s none` uses, all stable
# codegen flags, without a sanitizer: the code under test forbids
# `unsafe`, and debug assertions and overflow checks stay on.
#
# New inputs go to fuzz/work/<target>/ (ignored by git), so the committed
# corpus is never changed by a run; a crash is saved to fuzz/artifacts/.
# Environment: FUZZ_JOBS (parallel targets, default 1), FUZZ_ARGS (extra
# libFuzzer flags), FUZZ_KEEP_GOING=1 (run every target even after a crash).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds=${1:-60}
shift || true
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    targets=()
    for f in fuzz_targets/*.rs; do
        targets+=("$(basename "$f" .rs)")
    done
fi

export RUSTFLAGS="${RUSTFLAGS:-} -Cpasses=sancov-module \
 -Cllvm-args=-sanitizer-coverage-level=4 \
 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
 -Cllvm-args=-sanitizer-coverage-pc-table \
 -Cllvm-args=-sanitizer-coverage-trace-compares \
 --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
# An explicit --target keeps RUSTFLAGS off build scripts and proc macros
# (they run on the host and have no libFuzzer to link), as cargo-fuzz does.
triple=$(rustc -vV | sed -n 's/^host: //p')

start=$(date +%s)
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo build --release --locked --target "$triple" "${bins[@]}"
echo "fuzz build: $(( $(date +%s) - start )) s"

mkdir -p work artifacts logs
failed=()
printf '%-18s %12s %10s %8s %8s  %s\n' target executions exec/s cov features result
for t in "${targets[@]}"; do
    mkdir -p "work/$t" "corpus/$t"
    log="logs/$t.log"
    set +e
    "$CARGO_TARGET_DIR/$triple/release/$t" "work/$t" "corpus/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 \
        -max_len=65536 -print_final_stats=1 \
        -artifact_prefix="artifacts/$t-" ${FUZZ_ARGS:-} >"$log" 2>&1
    status=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
    cov=$(grep -oE 'cov: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    ft=$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | cut -d' ' -f2)
    if [ "$status" -eq 0 ]; then result=ok; else result="CRASH (exit $status, see fuzz/$log)"; failed+=("$t"); fi
    printf '%-18s %12s %10s %8s %8s  %s\n' "$t" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "$result"
    if [ "$status" -ne 0 ]; then
        grep -E 'panicked at|^Error|SUMMARY|Test unit written' "$log" | head -5 | sed 's/^/    /'
        [ "${FUZZ_KEEP_GOING:-0}" = 1 ] || break
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "crashed: ${failed[*]}"
    exit 1
fi
echo "fuzz: ${#targets[@]} targets, ${seconds} s each, no crash ($(( $(date +%s) - start )) s in all)"
