#!/usr/bin/env bash
# The GPU check, in one call: build with --features cuda, run the trainer's
# device tests on cuda:0, `bench train` on small and medium (and the PyTorch
# reference beside each, where torch is installed), the memory of each preset
# at a batch that fits a 24 GB card, and a 2-node `up --device cuda:0`.
# Results go under $OUT (default ./gpu-check-out) as JSON; a table is printed last.
#
#   scripts/gpu-check.sh                   build here, then check
#   scripts/gpu-check.sh --build-only DIR  build, and copy the binaries into DIR
#   scripts/gpu-check.sh --prebuilt DIR    check with binaries built elsewhere
#                                          (a GPU machine without a Rust toolchain)
#
# Building needs nvcc and the CUDA libraries: scripts/cuda-toolchain.sh
# installs them; set CUDA_COMPUTE_CAP to the GPU's (90 for H100/H200).
# docs/training.md, "GPUs", explains the figures.
set -uo pipefail

cd "$(dirname "$0")/.."
mode=full
bindir=
case "${1:-}" in
    --build-only) mode=build; bindir="${2:?--build-only needs a directory}" ;;
    --prebuilt) mode=check; bindir="${2:?--prebuilt needs a directory}" ;;
    "") ;;
    -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu-check.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
log() { echo "[gpu-check $(date +%H:%M:%S)] $*" >&2; }

build() {
    local dest="$1"
    mkdir -p "$dest"
    log "building barnraise --features cuda (CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-detected})"
    cargo build --release --features cuda || return 1
    local test_bin
    test_bin=$(cargo test --release -p barnraise-trainer --features cuda --test trainer --no-run \
        --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "trainer":
        print(m["executable"])' | tail -1)
    [ -n "$test_bin" ] || { log "could not find the trainer test binary"; return 1; }
    local target="${CARGO_TARGET_DIR:-target}"
    cp "$target/release/barnraise" "$dest/barnraise"
    cp "$test_bin" "$dest/trainer-tests"
    log "binaries in $dest"
}

case "$mode" in
    build) build "$bindir"; exit $? ;;
    full) bindir="$out/bin"; build "$bindir" || exit 1 ;;
esac

# Where the CUDA libraries the binaries link (cuBLAS, cuRAND, NVRTC, the
# runtime) live on this machine: a toolkit, or NVIDIA's Python wheels.
for dir in ${CUDA_HOME:-} /usr/local/cuda /usr/local/nvidia/lib64 $(python3 -c 'import glob,site
for s in site.getsitepackages(): print(*glob.glob(s + "/nvidia/*/lib"))' 2>/dev/null); do
    [ -d "$dir" ] || continue
    [ -d "$dir/lib64" ] && dir="$dir/lib64"
    if ls "$dir"/libcublas.so* >/dev/null 2>&1 || ls "$dir"/libcudart.so* >/dev/null 2>&1 \
        || ls "$dir"/libcurand.so* >/dev/null 2>&1 || ls "$dir"/libcuda.so.1 >/dev/null 2>&1; then
        export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
done
bin="$bindir/barnraise"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv >"$out/gpu.csv" 2>&1
missing=$(ldd "$bin" | grep "not found")
if [ -n "$missing" ]; then
    log "libraries not found: $missing"
    exit 1
fi

status=0
log "device tests on cuda:0"
rm -f "$out/device-tests.jsonl"
BARNRAISE_TEST_DEVICE=cuda:0 BARNRAISE_TEST_REPORT="$out/device-tests.jsonl" \
    timeout 300 "$bindir/trainer-tests" on_device_ --test-threads=1 --nocapture >"$out/device-tests.log" 2>&1 \
    || { status=1; log "device tests FAILED (device-tests.log)"; }
grep -E "^test |test result" "$out/device-tests.log" >&2

bench() {
    local name="$1"; shift
    log "bench train $name: $*"
    timeout 240 "$bin" bench train --json --device cuda:0 "$@" >"$out/bench-$name.json" 2>"$out/bench-$name.log" \
        || { status=1; log "bench $name FAILED"; tail -5 "$out/bench-$name.log" >&2; }
}
torch_ref() {
    local name="$1"; shift
    python3 -c 'import torch' 2>/dev/null || return 0
    log "pytorch reference $name: $*"
    timeout 240 python3 scripts/torch-reference.py --device cuda:0 "$@" >"$out/torch-$name.json" 2>"$out/torch-$name.log" \
        || { log "torch reference $name failed"; tail -3 "$out/torch-$name.log" >&2; }
}
bench small --model small --steps 20
torch_ref small --model small --steps 20
bench medium --model medium --batch-size 8 --steps 10
torch_ref medium --model medium --batch-size 8 --steps 10
torch_ref medium-sdpa --model medium --batch-size 8 --steps 10 --attention sdpa
# What fits a 24 GB card: one micro-batch size per preset, peak memory measured.
bench medium-b4 --model medium --batch-size 4 --steps 3 --warmup 1
bench large-b2 --model large --batch-size 2 --steps 3 --warmup 1

log "2-node up on cuda:0"
rm -rf /tmp/gpu-check-up
timeout 300 "$bin" up --nodes 2 --rounds 3 --device cuda:0 --json --data-dir /tmp/gpu-check-up \
    >"$out/up.json" 2>"$out/up.log" || { status=1; log "up FAILED"; tail -5 "$out/up.log" >&2; }

python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except Exception:
        return None
print(f"{'run':<14}{'tokens/s':>12}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'vs torch':>10}")
for name in ["small", "medium", "medium-b4", "large-b2"]:
    r = load(f"bench-{name}.json")
    if not r:
        print(f"{name:<14} failed"); continue
    t = load(f"torch-{name}.json")
    ratio = f"{r['tokens_per_sec'] / t['tokens_per_sec']:.2f}x" if t else "-"
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    mem = f"{r['peak_memory_bytes'] / 2**30:.2f}" if r.get("peak_memory_bytes") else "-"
    print(f"{name:<14}{r['tokens_per_sec']:>12.0f}{r['flops_per_sec'] / 1e12:>9.1f}{mfu:>7}{mem:>10}{ratio:>10}")
    if r.get("phase_seconds"):
        p = r["phase_seconds"]
        print(f"{'':<14}forward {p['forward']:.4f} s, backward {p['backward']:.4f} s, optimizer {p['optimizer']:.4f} s per step")
for name in ["small", "medium", "medium-sdpa"]:
    t = load(f"torch-{name}.json")
    if t:
        print(f"torch {name:<8}{t['tokens_per_sec']:>12.0f}{t['flops_per_sec'] / 1e12:>9.1f}  peak {t['peak_memory_bytes'] / 2**30:.2f} GiB")
try:
    for line in open(os.path.join(out, "device-tests.jsonl")):
        print(line.strip())
except OSError:
    pass
up = load("up.json")
if up:
    print("up:", {k: up[k] for k in list(up)[:8]})
EOF
exit $status
