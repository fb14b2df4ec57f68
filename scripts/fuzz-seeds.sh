#!/usr/bin/env bash
# Regenerates the fuzz seed corpus (fuzz/corpus/<target>/) from a real run:
# a short `barnraise up` on the tiny model, then examples/fuzz_seeds.rs
# reads what that run left on disk (docs/security.md, "Fuzzing").
#
#   scripts/fuzz-seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --bin barnraise --example fuzz_seeds
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
target/debug/barnraise up --model tiny --nodes 3 --rounds 3 --inner-steps 4 \
    --batch-size 2 --data-dir "$run" >"$run/up.log" 2>&1 \
    || { cat "$run/up.log"; exit 1; }
rm -rf fuzz/corpus
target/debug/examples/fuzz_seeds "$run" fuzz/corpus docs
du -sh fuzz/corpus
