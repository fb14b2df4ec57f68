#!/usr/bin/env bash
# Checks what volunteers install from: the systemd unit (systemd-analyze
# verify, against the binary built here) and, when a container engine with a
# reachable registry is present, the Dockerfile (docker build, then the
# image's --version). Prints what it could not check and why.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --bin barnraise
status=0

if command -v systemd-analyze >/dev/null 2>&1; then
    # The unit names /usr/local/bin/barnraise; verify against this build.
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    sed "s#/usr/local/bin/barnraise#$PWD/target/release/barnraise#" \
        packaging/barnraise-node.service >"$tmp/barnraise-node.service"
    if systemd-analyze verify "$tmp/barnraise-node.service"; then
        echo "packaging: systemd unit verifies"
    else
        echo "packaging: systemd unit does not verify" >&2
        status=1
    fi
else
    echo "packaging: systemd-analyze not installed; unit not checked"
fi

if docker info >/dev/null 2>&1; then
    docker build -t barnraise:check .
    docker run --rm barnraise:check --version
    echo "packaging: container image builds and runs"
else
    echo "packaging: no container engine reachable here; Dockerfile not built"
fi
exit "$status"
