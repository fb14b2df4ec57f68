#!/usr/bin/env bash
# barnraise's trainer against the same model in PyTorch, side by side on this
# machine: `barnraise bench train` and scripts/torch-reference.py with the same
# preset, batch, sequence length, steps and thread count, alternating, each
# repeated; prints tokens/s of each and the ratio (barnraise / PyTorch).
#
#   scripts/compare-torch.sh [--model small] [--device cpu] [--threads "1 2"]
#                            [--batch-size 8] [--seq-len N] [--steps 10]
#                            [--repeats 3] [--compile] [--python PYTHON]
#
# --threads   CPU thread counts to compare at (RAYON_NUM_THREADS for barnraise,
#             torch.set_num_threads for PyTorch); ignored on a GPU
# --compile   also time torch.compile (its first steps compile; they are warm-up)
# --python    a Python with torch installed (default: python3). On a machine
#             without one: python3 -m venv .venv && .venv/bin/pip install torch
#
# Needs a release build (cargo build --release). docs/training.md has the figures.
set -euo pipefail
cd "$(dirname "$0")/.."

model=small device=cpu threads="1 2" batch=8 seq= steps=10 repeats=3 compile=0 python=python3
while [ $# -gt 0 ]; do
    case "$1" in
        --model) model="$2"; shift 2 ;;
        --device) device="$2"; shift 2 ;;
        --threads) threads="$2"; shift 2 ;;
        --batch-size) batch="$2"; shift 2 ;;
        --seq-len) seq="$2"; shift 2 ;;
        --steps) steps="$2"; shift 2 ;;
        --repeats) repeats="$2"; shift 2 ;;
        --compile) compile=1; shift ;;
        --python) python="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare-torch.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
bin="${BARNRAISE_BIN:-target/release/barnraise}"
[ -x "$bin" ] || { echo "compare-torch.sh: $bin not found: run cargo build --release" >&2; exit 1; }
"$python" -c 'import torch' 2>/dev/null || {
    echo "compare-torch.sh: '$python' has no torch (python3 -m venv .venv && .venv/bin/pip install torch)" >&2
    exit 1
}
[[ "$device" == cuda* ]] && threads=0
common=(--model "$model" --device "$device" --batch-size "$batch" --steps "$steps")
[ -n "$seq" ] && common+=(--seq-len "$seq")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

tps() { "$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["tokens_per_sec"])' "$1"; }
median() { tr ' ' '\n' | grep . | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

printf '%-8s %-8s %14s %14s %8s\n' threads torch "barnraise t/s" "pytorch t/s" ratio
for t in $threads; do
    modes=(eager)
    [ "$compile" = 1 ] && modes+=(compile)
    for mode in "${modes[@]}"; do
        ours="" theirs=""
        for r in $(seq "$repeats"); do
            # Alternate the two so drift in the machine's load hits both.
            if [ "$t" = 0 ]; then
                "$bin" bench train --json "${common[@]}" >"$work/b.json" 2>/dev/null
            else
                RAYON_NUM_THREADS="$t" "$bin" bench train --json "${common[@]}" >"$work/b.json" 2>/dev/null
            fi
            ours="$ours $(tps "$work/b.json")"
            extra=()
            [ "$t" != 0 ] && extra+=(--threads "$t")
            [ "$mode" = compile ] && extra+=(--compile)
            "$python" scripts/torch-reference.py "${common[@]}" "${extra[@]}" >"$work/t.json" 2>/dev/null
            theirs="$theirs $(tps "$work/t.json")"
        done
        a=$(echo "$ours" | median) b=$(echo "$theirs" | median)
        printf '%-8s %-8s %14.0f %14.0f %7.2fx\n' "${t/#0/gpu}" "$mode" "$a" "$b" \
            "$(echo "$a $b" | awk '{print $1 / $2}')"
    done
done
