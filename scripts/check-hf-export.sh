#!/usr/bin/env bash
# Loads a `barnraise export` with Hugging Face `transformers` and compares its
# logits with barnraise's own forward pass on the same bytes
# (docs/running-a-coordinator.md, "Exporting the model").
#
#   scripts/check-hf-export.sh [EXPORT_DIR]
#
# Without EXPORT_DIR it trains a small run first (`barnraise up`, tiny model,
# 3 rounds) and exports it. The Python side runs in a venv under
# target/hf-check-venv, made on first use from PyPI (torch for the CPU,
# transformers, safetensors). Passes when the largest absolute difference of
# the logits is at most 1e-4 (f32 on both sides).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BARNRAISE_BIN:-target/release/barnraise}
[ -x "$BIN" ] || cargo build --release
VENV=target/hf-check-venv
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    # The CPU wheel when its index is reachable; PyPI's otherwise.
    "$VENV/bin/pip" install --quiet torch --index-url https://download.pytorch.org/whl/cpu \
        || "$VENV/bin/pip" install --quiet torch
    "$VENV/bin/pip" install --quiet transformers safetensors
fi
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
EXPORT=${1:-}
if [ -z "$EXPORT" ]; then
    "$BIN" up --nodes 2 --rounds 3 --model tiny --data-dir "$WORK/run" >/dev/null
    EXPORT="$WORK/export"
    "$BIN" export --data-dir "$WORK/run/coordinator" --out "$EXPORT"
fi
PROMPT="The barn was raised by the whole village, one beam at a time."
"$BIN" generate --checkpoint "$EXPORT/model.safetensors" --prompt "$PROMPT" \
    --logits-out "$WORK/ours.json" >/dev/null
"$VENV/bin/python" - "$EXPORT" "$WORK/ours.json" "$PROMPT" <<'PY'
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

export, ours_path, prompt = sys.argv[1], sys.argv[2], sys.argv[3]
tokenizer = AutoTokenizer.from_pretrained(export)
ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
assert ids == list(prompt.encode()), f"the tokenizer does not map bytes to ids: {ids[:8]}"
model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
model.eval()
with torch.no_grad():
    theirs = model(torch.tensor([ids])).logits[0]
ours = torch.tensor(json.load(open(ours_path)))
diff = (theirs - ours).abs().max().item()
agree = (theirs.argmax(-1) == ours.argmax(-1)).float().mean().item()
print(json.dumps({
    "transformers": __import__("transformers").__version__,
    "torch": torch.__version__,
    "positions": len(ids),
    "vocab": ours.shape[1],
    "max_abs_diff": diff,
    "argmax_agreement": agree,
}))
sys.exit(0 if diff <= 1e-4 else 1)
PY
