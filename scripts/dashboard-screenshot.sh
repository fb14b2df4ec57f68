#!/usr/bin/env bash
# Checks the coordinator dashboard in a real headless browser (Debian's
# chromium) against a short real run, and saves screenshots to look at.
#
# The run: a coordinator on loopback (tiny model, a few rounds) and four
# `barnraise node` processes — two enrolled in an org whose name holds markup
# (so the pages must escape it), one independent, and one that sign-flips its
# updates (so rejections show up). When the run has finished (the coordinator
# keeps serving during its linger time) the script takes screenshots of the
# overview, a node page, the rejected node's page, the org page, a round page
# and a 404 page, and fails if chromium fails or a page lacks what it should
# show (checked on chromium's --dump-dom output).
#
#   scripts/dashboard-screenshot.sh [OUT_DIR]   (default target/dashboard-screenshots)
#
# BARNRAISE_BIN=path uses that binary instead of building one. Not part of CI:
# it needs chromium, which it installs with apt-get when it is missing.

set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${1:-target/dashboard-screenshots}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    cp "$WORK"/*.log "$OUT"/ 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

fail() {
    echo "dashboard-screenshot: FAILED: $*" >&2
    echo "logs and pages so far are in $OUT" >&2
    exit 1
}

# 1. Chromium.
if ! command -v chromium >/dev/null 2>&1; then
    echo "installing chromium (apt-get)…"
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get install -y chromium >"$WORK/apt.log" 2>&1 ||
        { $SUDO apt-get update >>"$WORK/apt.log" 2>&1 && $SUDO apt-get install -y chromium >>"$WORK/apt.log" 2>&1; } ||
        fail "could not install chromium (see apt.log)"
fi

# 2. The barnraise binary.
if [ -z "${BARNRAISE_BIN:-}" ]; then
    echo "building barnraise…"
    cargo build -p barnraise --quiet
    BARNRAISE_BIN="${CARGO_TARGET_DIR:-target}/debug/barnraise"
fi
BIN=$(cd "$(dirname "$BARNRAISE_BIN")" && pwd)/$(basename "$BARNRAISE_BIN")
[ -x "$BIN" ] || fail "no barnraise binary at $BIN"

# 3. A short real run.
ORG_NAME='Example Lab, "R&D" <b>bold</b>'
"$BIN" org new --name "$ORG_NAME" --key "$WORK/org.key" >"$WORK/org.log" 2>&1 || fail "org new (see org.log)"
ORG_ID=$(awk '/^org id:/ {print $3}' "$WORK/org.log")
NODE_IDS=()
for i in 0 1 2 3; do
    mkdir -p "$WORK/node-$i"
    "$BIN" id new --key "$WORK/node-$i/node.key" >/dev/null 2>&1 || fail "id new"
    NODE_IDS+=("$("$BIN" id show --key "$WORK/node-$i/node.key" 2>/dev/null | awk '/^node id:/ {print $3}')")
done
for i in 0 1; do
    "$BIN" org enroll --key "$WORK/org.key" --node "${NODE_IDS[$i]}" --out "$WORK/node-$i.cert" >>"$WORK/org.log" 2>&1 ||
        fail "org enroll (see org.log)"
done
# Node 3 corrupts its updates; the coordinator must reject them.
echo 'misbehave = "sign-flip"' >"$WORK/node-3/node.toml"

cat >"$WORK/run.toml" <<EOF
run_id = "dashboard-demo"
model = "tiny"
inner_steps = 8
batch_size = 4
seq_len = 32
codec = "int8"
total_rounds = 5
min_nodes = 4
round_deadline_secs = 180
linger_secs = 900
http = "127.0.0.1:0"
data_dir = "coordinator"

[dataset]
source = "builtin"
shards = 8
shard_tokens = 8192
seed = 0
EOF
"$BIN" coordinator --config "$WORK/run.toml" >"$WORK/coordinator.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 120); do
    grep -q "HTTP API and dashboard on" "$WORK/coordinator.log" && break
    kill -0 "${PIDS[0]}" 2>/dev/null || fail "the coordinator stopped (see coordinator.log)"
    sleep 1
done
DIAL=$(awk '/coordinator listening on/ {print $4; exit}' "$WORK/coordinator.log")
URL=$(awk '/HTTP API and dashboard on/ {print $6; exit}' "$WORK/coordinator.log")
[ -n "$DIAL" ] && [ -n "$URL" ] || fail "the coordinator printed no addresses (see coordinator.log)"
echo "coordinator: $URL"

for i in 0 1 2 3; do
    CERT=()
    [ "$i" -lt 2 ] && CERT=(--certificate "$WORK/node-$i.cert")
    "$BIN" node --coordinator "$DIAL" --data-dir "$WORK/node-$i" --key "$WORK/node-$i/node.key" \
        --device cpu --listen /ip4/127.0.0.1/tcp/0 "${CERT[@]}" >"$WORK/node-$i.log" 2>&1 &
    PIDS+=($!)
done

echo "waiting for the run to finish…"
for _ in $(seq 600); do
    curl -sf "$URL/api/v1/run" | grep -q '"phase":"finished"' && break
    kill -0 "${PIDS[0]}" 2>/dev/null || fail "the coordinator stopped (see coordinator.log)"
    sleep 1
done
curl -sf "$URL/api/v1/run" | grep -q '"phase":"finished"' || fail "the run did not finish in 10 minutes"

# 4. Pages in the browser.
chrome() {
    local profile
    profile=$(mktemp -d -p "$WORK")
    timeout 120 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
        --disable-background-networking --disable-component-update --disable-sync \
        --hide-scrollbars --user-data-dir="$profile" "$@" 2>>"$WORK/chromium.log"
}

# shot NAME PATH STATUS HEIGHT TEXT...: the page answers STATUS, its DOM holds every TEXT,
# and its screenshot is written.
shot() {
    local name=$1 path=$2 status=$3 height=$4
    shift 4
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' "$URL$path")
    [ "$code" = "$status" ] || fail "$path answered $code, not $status"
    chrome --dump-dom "$URL$path" >"$OUT/$name.html" || fail "chromium could not load $path (see chromium.log)"
    for text in "$@"; do
        grep -qF -- "$text" "$OUT/$name.html" || fail "$path lacks \`$text\` (see $name.html)"
    done
    # The org name's markup must stay text: no <b> element in any page.
    ! grep -qF '<b>bold</b>' "$OUT/$name.html" || fail "$path renders a node's markup (see $name.html)"
    rm -f "$OUT/$name.png"
    chrome --screenshot="$OUT/$name.png" --window-size="1280,$height" "$URL$path" >/dev/null ||
        fail "chromium could not screenshot $path (see chromium.log)"
    [ -s "$OUT/$name.png" ] || fail "no screenshot of $path"
    echo "  $path -> $OUT/$name.png"
}

short() { echo "${1:0:12}"; }
ESCAPED_ORG='Example Lab, "R&amp;D" &lt;b&gt;bold&lt;/b&gt;'
shot overview / 200 2600 "Leaderboard by node" "Leaderboard by org" "Loss per round" \
    "Participants per round" "data-parallel" "$ESCAPED_ORG" "independent" \
    "$(short "${NODE_IDS[0]}")" "$(short "${NODE_IDS[2]}")" "$(short "${NODE_IDS[3]}")"
shot node-enrolled "/nodes/${NODE_IDS[0]}" 200 1400 "${NODE_IDS[0]}" "$ESCAPED_ORG" "accepted" "on-time"
shot node-rejected "/nodes/${NODE_IDS[3]}" 200 1400 "${NODE_IDS[3]}" "rejected" "Rejections by reason"
shot org "/orgs/$ORG_ID" 200 1100 "$ESCAPED_ORG" "$ORG_ID" "$(short "${NODE_IDS[0]}")" "$(short "${NODE_IDS[1]}")"
shot round "/rounds/1" 200 1100 "round 1" "rejected" "$(short "${NODE_IDS[3]}")"
shot not-found "/nodes/0000" 404 500 "Not found"

# The CLI's CSV agrees with what the pages show: the rejected node has a non-zero rejected count.
"$BIN" stats --coordinator "$URL" --format csv >"$OUT/stats.csv" || fail "barnraise stats --format csv"
awk -F, -v node="${NODE_IDS[3]}" '$1 == node && $6 > 0 {found = 1} END {exit !found}' "$OUT/stats.csv" ||
    fail "stats.csv does not show node 3's rejections"
"$BIN" stats --coordinator "$URL" --by org >"$OUT/stats-by-org.txt" || fail "barnraise stats --by org"

echo "dashboard-screenshot: OK — screenshots in $OUT"
