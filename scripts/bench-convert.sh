#!/bin/sh
# Conversion speed against `cp` of the same bytes, in the same run.
# Usage: scripts/bench-convert.sh [BUILD_DIR]
# Converts tinytech-25m and a generated ~1 GB Llama-shaped model (random bf16),
# each 3 times after a warm-up, and prints one JSON line per model:
#   {"model", "bytes", "convert_mb_s", "cp_mb_s", "ratio"}
# The page cache is warm for both (same input bytes), so the figure is the
# cost of the conversion itself over a plain copy.
set -eu
BUILD=${1:-build}
SHARED=${TM_SHARED:-../shared}
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
python3 scripts/gen-model.py "$T/gen1g" --hidden 2048 --layers 10 --inter 5632 --vocab 32000 --fill random 2>/dev/null
now() { date +%s.%N; }
for m in "$SHARED/models/tinytech-25m" "$T/gen1g"; do
    bytes=$(stat -c %s "$m/model.safetensors")
    "$BUILD/bin/tm-convert" -q "$m" -o "$T/ws" --force
    best_conv=999999; best_cp=999999
    for i in 1 2 3; do
        rm -rf "$T/ws" "$T/cp"
        t0=$(now); "$BUILD/bin/tm-convert" -q "$m" -o "$T/ws"; sync "$T/ws" 2>/dev/null || true; t1=$(now)
        c=$(echo "$t1 - $t0" | bc -l)
        t0=$(now); mkdir "$T/cp"; cp "$m/model.safetensors" "$T/cp/"; sync "$T/cp" 2>/dev/null || true; t1=$(now)
        p=$(echo "$t1 - $t0" | bc -l)
        best_conv=$(echo "if ($c < $best_conv) $c else $best_conv" | bc -l)
        best_cp=$(echo "if ($p < $best_cp) $p else $best_cp" | bc -l)
    done
    printf '{"model": "%s", "bytes": %s, "convert_mb_s": %.0f, "cp_mb_s": %.0f, "ratio": %.2f}\n' \
        "$(basename "$m")" "$bytes" "$(echo "$bytes / $best_conv / 1000000" | bc -l)" \
        "$(echo "$bytes / $best_cp / 1000000" | bc -l)" "$(echo "$best_cp / $best_conv" | bc -l)"
done
