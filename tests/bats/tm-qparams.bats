#!/usr/bin/env bats
# tm-qparams: tm-calib | tm-qparams into a workspace, the engine running the
# result, online mode, and failures that must leave the workspace untouched.

load helpers

setup_file() {
    tm-convert "$SHARED/models/tinytech-25m" -o "$BATS_FILE_TMPDIR/ws" > /dev/null 2>&1
    tm-convert "$SHARED/models/random-qwen2" -o "$BATS_FILE_TMPDIR/other" > /dev/null 2>&1
    tm-calib "$BATS_FILE_TMPDIR/ws" --dataset "$SHARED/text/calib.txt" --samples 4 --seqlen 256 \
        -o "$BATS_FILE_TMPDIR/tiny.stats" 2> /dev/null
    tm-calib "$BATS_FILE_TMPDIR/other" --dataset "$SHARED/text/calib.txt" --samples 2 --seqlen 64 \
        -o "$BATS_FILE_TMPDIR/other.stats" 2> /dev/null
}

setup() {
    T="$BATS_TEST_TMPDIR"
    # A private copy of the workspace per test.
    cp -r "$BATS_FILE_TMPDIR/ws" "$T/ws"
    WS="$T/ws"
}

# snapshot DIR: every file's path and checksum, to compare before and after.
snapshot() { (cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum); }

engine_key() { sed -n "s/^$1 = //p" "$WS/config.ini"; }

@test "tm-calib | tm-qparams --kv int8 writes static scales, and tm-run uses them" {
    tm-calib "$WS" --dataset "$SHARED/text/calib.txt" --samples 4 --seqlen 256 2> /dev/null |
        tm-qparams "$WS" --kv int8
    [ "$(engine_key quant_policy)" = 8 ]
    [ "$(engine_key kv_scales)" = static ]
    [ -f "$WS/quant/rank0/kv_int8.bin" ]
    [ "$(stat -c %s "$WS/quant/rank0/kv_int8.bin")" = $((8 * 4 * 2 * 4)) ]
    grep -q '"quant/rank0/kv_int8.bin"' "$WS/manifest.json"
    run tm-convert --check "$WS"
    assert_success
    # Nothing left beside the workspace, and the comments of config.ini kept.
    [ "$(leftovers "$T" ws)" = "" ]
    grep -q '^# \[engine\] holds run-time settings' "$WS/config.ini"
    # The engine runs it; the answer is close to the unquantized one.
    echo '{"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}' > "$T/req.jsonl"
    run tm-run "$WS" --device cpu --jsonl < "$T/req.jsonl"
    assert_success
    assert_output --partial '"finish_reason": "length"'
}

@test "scales: asymmetric from min/max, symmetric from absmax, int4 and int8 side by side" {
    tm-qparams "$WS" --kv int8 --full-range --stats "$BATS_FILE_TMPDIR/tiny.stats"
    tm-qparams "$WS" --kv int4 --sym --full-range --stats "$BATS_FILE_TMPDIR/tiny.stats"
    [ "$(engine_key quant_policy)" = 4 ]
    run python3 - "$BATS_FILE_TMPDIR/tiny.stats" "$WS" "$BATS_TEST_DIRNAME" <<'EOF'
import sys
sys.path.insert(0, sys.argv[3])
from kv_stats import load_params, load_stats
v = load_stats(sys.argv[1])
p8, p4 = load_params(sys.argv[2], 8), load_params(sys.argv[2], 4)
L, H, D = 8, 2, 64
for l in range(L):
    for which, kv in enumerate("kv"):
        for hh in range(H):
            sl = slice(hh * D, (hh + 1) * D)
            lo = min(v[f"layers.{l}.{kv}.min"][sl]); hi = max(v[f"layers.{l}.{kv}.max"][sl])
            am = max(v[f"layers.{l}.{kv}.absmax"][sl])
            s8, o8 = p8[(l * 4 + 2 * which) * H + hh], p8[(l * 4 + 2 * which + 1) * H + hh]
            assert abs(s8 - (hi - lo) / 255) <= 1e-6 * abs(s8) and o8 == lo, (l, kv, hh, s8, o8, lo, hi)
            s4, o4 = p4[(l * 4 + 2 * which) * H + hh], p4[(l * 4 + 2 * which + 1) * H + hh]
            assert abs(s4 - am / 7) <= 1e-6 * s4 and abs(o4 + 8 * s4) <= 1e-6 * s4, (l, kv, hh, s4, o4, am)
print("ok")
EOF
    assert_success
    assert_output ok
    echo '{"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}' | tm-run "$WS" --device cpu --jsonl
}

@test "by default each head's range is narrowed inside its min/max where outlier channels cost the others" {
    tm-qparams "$WS" --kv int4 --stats "$BATS_FILE_TMPDIR/tiny.stats"
    run python3 - "$BATS_FILE_TMPDIR/tiny.stats" "$WS" "$BATS_TEST_DIRNAME" <<'EOF'
import sys
sys.path.insert(0, sys.argv[3])
from kv_stats import load_params, load_stats
v = load_stats(sys.argv[1])
p = load_params(sys.argv[2], 4)
L, H, D = 8, 2, 64
narrower = 0
for l in range(L):
    for which, kv in enumerate("kv"):
        for hh in range(H):
            sl = slice(hh * D, (hh + 1) * D)
            lo = min(v[f"layers.{l}.{kv}.min"][sl]); hi = max(v[f"layers.{l}.{kv}.max"][sl])
            s, o = p[(l * 4 + 2 * which) * H + hh], p[(l * 4 + 2 * which + 1) * H + hh]
            top = o + 15 * s
            assert s > 0 and lo - 1e-5 <= o and top <= hi + 1e-5 * max(1, abs(hi)), (l, kv, hh, o, top, lo, hi)
            narrower += (top - o) < 0.999 * (hi - lo)
assert narrower > 0, "no head was narrowed"
print("ok", narrower)
EOF
    assert_success
    assert_output --partial ok
}

@test "--online selects per-token scales without statistics; --kv none turns quantization off" {
    tm-qparams "$WS" --kv int4 --online
    [ "$(engine_key quant_policy)" = 4 ]
    [ "$(engine_key kv_scales)" = online ]
    [ ! -e "$WS/quant" ]
    echo '{"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}' | tm-run "$WS" --device cpu --jsonl
    tm-qparams "$WS" --kv none --online
    [ "$(engine_key quant_policy)" = 0 ]
}

@test "statistics of another model, truncated or damaged statistics: refused, workspace byte-for-byte unchanged" {
    before=$(snapshot "$WS")
    run tm-qparams "$WS" --kv int8 --stats "$BATS_FILE_TMPDIR/other.stats"
    assert_failure 1
    assert_output --partial 'recorded on another model'
    head -c 3000 "$BATS_FILE_TMPDIR/tiny.stats" > "$T/trunc.stats"
    run tm-qparams "$WS" --kv int8 --stats "$T/trunc.stats"
    assert_failure 1
    assert_output --regexp 'trunc.stats: .*(truncated|corrupt)'
    run tm-qparams "$WS" --kv int8 < "$T/trunc.stats"
    assert_failure 1
    assert_output --partial 'standard input'
    : > "$T/empty.stats"
    run tm-qparams "$WS" --kv int8 --stats "$T/empty.stats"
    assert_failure 1
    run tm-qparams "$WS" --kv int8 --stats "$T/nope.stats"
    assert_failure 1
    [ "$(snapshot "$WS")" = "$before" ]
    [ "$(leftovers "$T" ws trunc.stats empty.stats)" = "" ]
}

@test "a workspace whose weights changed refuses statistics recorded before" {
    # Same shapes, other weights: the identity is the weights' checksums.
    tm-convert "$SHARED/models/tinytech-25m" -o "$T/fp16" --dtype fp16 > /dev/null 2>&1
    before=$(snapshot "$T/fp16")
    run tm-qparams "$T/fp16" --kv int8 --stats "$BATS_FILE_TMPDIR/tiny.stats"
    assert_failure 1
    assert_output --partial 'another model'
    [ "$(snapshot "$T/fp16")" = "$before" ]
}

@test "kv_scales = static by hand without scales for the bits: a clear error; quant_policy by hand works" {
    sed -i 's/^quant_policy = .*/quant_policy = 8/; s/^kv_scales = .*/kv_scales = static/' "$WS/config.ini"
    run tm-run "$WS" --device cpu --jsonl <<< '{"prompt": "Hi", "max_tokens": 2}'
    assert_failure
    assert_output --partial 'no int8 scales (run tm-qparams'
    sed -i 's/^kv_scales = .*/kv_scales = online/' "$WS/config.ini"
    run tm-run "$WS" --device cpu --jsonl <<< '{"prompt": "Hi", "max_tokens": 2}'
    assert_success
    sed -i 's/^kv_scales = .*/kv_scales = sometimes/' "$WS/config.ini"
    run tm-run "$WS" --device cpu --jsonl <<< '{"prompt": "Hi", "max_tokens": 2}'
    assert_failure
    assert_output --partial 'kv_scales must be online or static'
}

@test "usage errors" {
    run tm-qparams "$WS"
    assert_failure 2
    assert_output --partial 'missing --kv'
    run tm-qparams "$WS" --kv int3 --online
    assert_failure 2
    run tm-qparams "$WS" --kv int8 --online --stats x
    assert_failure 2
    run tm-qparams "$WS" --kv int8 --sym --asym --stats x
    assert_failure 2
    run tm-qparams "$WS" --kv none --stats "$BATS_FILE_TMPDIR/tiny.stats"
    assert_failure 2
    run tm-qparams "$WS" --kv int4 --online --full-range
    assert_failure 2
    assert_output --partial 'no --full-range'
    run tm-qparams "$T/missing" --kv int8 --online
    assert_failure 1
    run tm-qparams --help
    assert_success
    assert_output --partial 'tm-qparams(1)'
}
