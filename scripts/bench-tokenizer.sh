#!/bin/sh
# Tokenizer encode speed, one core: llama2, llama3 and qwen3 tokenizers on
# ../shared/text/eval.txt. One JSON line per tokenizer (MB/s for the whole
# file as one string, and line by line). Target: 10 MB/s or more.
# Usage: scripts/bench-tokenizer.sh [BUILD_DIR]
set -eu
BUILD=${1:-build}
SHARED=${TM_SHARED:-../shared}
make -s "$BUILD/bench/tokenizer_bench" >/dev/null 2>&1 || make "$BUILD/bench/tokenizer_bench"
for t in llama2 llama3 qwen3; do
    taskset -c 0 "$BUILD/bench/tokenizer_bench" "$SHARED/tokenizers/$t" "$SHARED/text/eval.txt" 2>/dev/null ||
        "$BUILD/bench/tokenizer_bench" "$SHARED/tokenizers/$t" "$SHARED/text/eval.txt"
done
