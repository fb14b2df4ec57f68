#!/usr/bin/env bash
# Install the CUDA compiler, headers and libraries that `cargo build --features cuda`
# needs, from NVIDIA's wheels on PyPI, into one prefix laid out like a CUDA toolkit.
# No GPU and no driver are needed: where there is no libcuda, a link stub is made
# (what a toolkit's lib64/stubs holds), so the binary links here and runs where a
# real driver is installed. Prints the lines to export.
#
#   scripts/cuda-toolchain.sh [--cuda 13.0|12.8] [--prefix DIR] [--headers-only]
#
# --cuda          toolkit version (default 13.0; 12.8 for drivers older than 580
#                 and for GPUs before Turing, which CUDA 13 no longer supports)
# --prefix        where to install (default ~/.cache/barnraise/cuda-VERSION)
# --headers-only  nvcc and headers only: enough for `cargo check --features cuda`
#                 (CI's compile check), not for linking
#
# docs/training.md, "GPUs", says how the build uses what this installs.
set -euo pipefail

version=13.0
prefix=
headers_only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cuda) version="${2:?--cuda needs a version}"; shift 2 ;;
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --headers-only) headers_only=1; shift ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "cuda-toolchain.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

case "$version" in
    13.0)
        compiler=("nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*")
        libraries=("nvidia-cuda-nvrtc==13.0.*" "nvidia-cublas==13.0.*" "nvidia-curand==10.4.*")
        cudarc_version=13000
        ;;
    12.8)
        compiler=("nvidia-cuda-nvcc-cu12==12.8.*" "nvidia-cuda-runtime-cu12==12.8.*" "nvidia-cuda-cccl-cu12==12.8.*")
        libraries=("nvidia-cuda-nvrtc-cu12==12.8.*" "nvidia-cublas-cu12==12.8.*" "nvidia-curand-cu12==10.3.9.*")
        cudarc_version=12080
        ;;
    *) echo "cuda-toolchain.sh: CUDA $version is not one this script knows (13.0 or 12.8)" >&2; exit 2 ;;
esac
prefix="${prefix:-$HOME/.cache/barnraise/cuda-$version}"
packages=("${compiler[@]}")
[ "$headers_only" = 1 ] || packages+=("${libraries[@]}")

python=$(command -v python3 || command -v python || true)
[ -n "$python" ] || { echo "cuda-toolchain.sh: python3 with pip is needed to fetch NVIDIA's wheels" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching CUDA $version wheels: ${packages[*]}" >&2
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux2010_x86_64 \
    --python-version 3.11 -d "$work/wheels" "${packages[@]}"

mkdir -p "$prefix/bin" "$prefix/include" "$prefix/lib64"
for wheel in "$work"/wheels/*.whl; do
    rm -rf "$work/x" && mkdir "$work/x"
    "$python" -m zipfile -e "$wheel" "$work/x"
    # CUDA 13 wheels share nvidia/cu13/{bin,include,lib}; CUDA 12 wheels use
    # one folder per component (nvidia/cuda_nvcc/bin, nvidia/cublas/lib...).
    for part in "$work"/x/nvidia/*/; do
        [ -d "$part/bin" ] && cp -a "$part/bin/." "$prefix/bin/"
        [ -d "$part/include" ] && cp -a "$part/include/." "$prefix/include/"
        [ -d "$part/lib" ] && cp -a "$part/lib/." "$prefix/lib64/"
        [ -d "$part/nvvm" ] && cp -a "$part/nvvm" "$prefix/"
    done
done
chmod +x "$prefix"/bin/* "$prefix"/nvvm/bin/* 2>/dev/null || true

# The linker looks for libX.so; wheels ship only libX.so.N.
for lib in "$prefix"/lib64/lib*.so.*; do
    [ -e "$lib" ] || continue
    base="${lib##*/}"
    plain="${base%%.so.*}.so"
    [ -e "$prefix/lib64/$plain" ] || ln -s "$base" "$prefix/lib64/$plain"
done

if [ "$headers_only" = 0 ]; then
    # libcuda comes with the driver, not the toolkit. Where none is installed,
    # link against a stub that names every driver entry point cudarc binds;
    # at run time the loader finds the real libcuda.so.1.
    mkdir -p "$prefix/lib64/stubs"
    symbols=$(grep -ho '\bcu[A-Z][A-Za-z0-9_]*\b' "$prefix/include/cuda.h" | sort -u)
    {
        for s in $symbols; do echo "void $s(void) {}"; done
    } >"$work/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$prefix/lib64/stubs/libcuda.so" "$work/libcuda_stub.c"
fi

"$prefix/bin/nvcc" --version | tail -2 >&2
stub_path=
[ "$headers_only" = 0 ] && stub_path=":$prefix/lib64/stubs"
cat <<EOF
export CUDA_HOME=$prefix
export PATH=$prefix/bin:\$PATH
export CUDARC_CUDA_VERSION=$cudarc_version
export LIBRARY_PATH=$prefix/lib64$stub_path\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export LD_LIBRARY_PATH=$prefix/lib64\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}
# and the GPU generation to compile kernels for, e.g. 89 (RTX 40xx), 90 (H100/H200):
# export CUDA_COMPUTE_CAP=90
EOF
