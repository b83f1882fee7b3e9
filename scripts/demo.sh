#!/bin/sh
# The main job, end to end: convert a Hugging Face model into a workspace,
# verify it, and (once the engine is built) generate with it.
# Usage: scripts/demo.sh [MODEL_DIR] [BUILD_DIR]
set -eu
MODEL=${1:-../shared/models/tinytech-25m}
BUILD=${2:-build}
BIN="$BUILD/bin"
WS="$BUILD/demo/$(basename "$MODEL")"
echo "== tm-convert $MODEL -> $WS"
"$BIN/tm-convert" "$MODEL" -o "$WS" --force
"$BIN/tm-convert" --check "$WS"
if [ -x "$BIN/tm-run" ]; then
    echo "== tm-run: tokenizer round trip"
    echo '{"text": "The kernel schedules processes."}' | "$BIN/tm-run" --tokenizer "$WS" --encode
fi
