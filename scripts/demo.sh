#!/bin/sh
# The main job, end to end: convert a Hugging Face model into a workspace,
# verify it, and generate with it (a batch of JSON-lines requests, then the
# perplexity of a slice of held-out text).
# Usage: scripts/demo.sh [MODEL_DIR] [BUILD_DIR]
set -eu
MODEL=${1:-../shared/models/tinytech-25m}
BUILD=${2:-build}
BIN="$BUILD/bin"
WS="$BUILD/demo/$(basename "$MODEL")"
echo "== tm-convert $MODEL -> $WS"
"$BIN/tm-convert" "$MODEL" -o "$WS" --force
"$BIN/tm-convert" --check "$WS"
echo "== tm-run: tokenizer round trip"
echo '{"text": "The kernel schedules processes."}' | "$BIN/tm-run" --tokenizer "$WS" --encode
echo "== tm-run --jsonl: three requests at once (greedy, 32 tokens)"
printf '%s\n' \
    '{"id": 1, "prompt": "The Linux kernel", "max_tokens": 32, "temperature": 0}' \
    '{"id": 2, "prompt": "To create a new table in PostgreSQL, use the", "max_tokens": 32, "temperature": 0}' \
    '{"id": 3, "messages": [{"role": "user", "content": "What is git?"}], "max_tokens": 32, "temperature": 0}' |
    "$BIN/tm-run" "$WS" --jsonl
SHARED=$(dirname "$(dirname "$MODEL")")
if [ -f "$SHARED/text/eval.txt" ]; then
    echo "== tm-run --ppl: perplexity of the first 64 KB of $SHARED/text/eval.txt"
    head -c 65536 "$SHARED/text/eval.txt" > "$BUILD/demo/eval-64k.txt"
    "$BIN/tm-run" "$WS" --ppl "$BUILD/demo/eval-64k.txt"
fi
echo "== chat: $BIN/tm-run $WS   (on a terminal)"
