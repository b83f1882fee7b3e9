#!/usr/bin/env bats
# tm-run generation: JSON-lines batch (against the reference), streaming,
# sessions, a small KV pool, bad input, perplexity, Hugging Face directories.

load helpers

setup_file() {
    tm-convert "$SHARED/models/tinytech-25m" -o "$BATS_FILE_TMPDIR/ws" > /dev/null 2>&1
}

setup() {
    T="$BATS_TEST_TMPDIR"
    WS="$BATS_FILE_TMPDIR/ws"
    PY="$ROOT/tests/bats/generate_check.py"
    G="$SHARED/golden/tinytech/greedy-fp32.jsonl"
}

@test "greedy outputs equal the reference for every golden prompt" {
    python3 "$PY" golden-input "$G" > "$T/in.jsonl"
    tm-run "$WS" --jsonl < "$T/in.jsonl" > "$T/out.jsonl"
    run python3 "$PY" golden-check "$G" "$T/out.jsonl"
    assert_success
}

@test "the AVX2 and AVX-512 paths give the same tokens and perplexity" {
    python3 "$PY" golden-input "$G" > "$T/in.jsonl"
    TM_CPU_ISA=avx2 tm-run "$WS" --jsonl < "$T/in.jsonl" > "$T/avx2.jsonl"
    tm-run "$WS" --jsonl < "$T/in.jsonl" > "$T/default.jsonl"
    run python3 "$PY" same "$T/avx2.jsonl" "$T/default.jsonl"
    assert_success
    head -c 8000 "$SHARED/text/eval.txt" > "$T/text.txt"
    a=$(TM_CPU_ISA=avx2 tm-run "$WS" --ppl "$T/text.txt")
    b=$(tm-run "$WS" --ppl "$T/text.txt")
    [ "$a" = "$b" ]
}

@test "a Hugging Face directory runs directly" {
    python3 "$PY" golden-input "$G" | head -3 > "$T/in.jsonl"
    tm-run "$SHARED/models/tinytech-25m" < "$T/in.jsonl" > "$T/out.jsonl"
    tm-run "$WS" < "$T/in.jsonl" > "$T/ws.jsonl"
    run python3 "$PY" same "$T/out.jsonl" "$T/ws.jsonl"
    assert_success
}

@test "a prompt of token ids gives the same answer as its text" {
    printf '%s\n' '{"id": 1, "prompt": "The Linux kernel", "temperature": 0, "max_tokens": 8}' \
        '{"id": 2, "prompt": [1, 415, 19486, 13653], "temperature": 0, "max_tokens": 8}' > "$T/in.jsonl"
    tm-run "$WS" < "$T/in.jsonl" > "$T/out.jsonl"
    run python3 -c '
import json, sys
o = {d["id"]: d for d in map(json.loads, open(sys.argv[1]))}
assert o[1]["text"] == o[2]["text"] and o[1]["usage"] == o[2]["usage"], o
' "$T/out.jsonl"
    assert_success
    run tm-run "$WS" <<< '{"prompt": [1, 99999999]}'
    assert_failure 1
    assert_output --partial 'must be an array of token ids in the vocabulary'
}

@test "--stream writes deltas that add up to the answer" {
    echo '{"id": "s", "prompt": "The Linux kernel", "temperature": 0, "max_tokens": 20, "return_token_ids": true}' |
        tm-run "$WS" --jsonl --stream > "$T/out.jsonl"
    run python3 -c '
import json, sys
lines = [json.loads(l) for l in open(sys.argv[1])]
deltas, final = lines[:-1], lines[-1]
assert len(deltas) >= 5, len(deltas)
assert all(d["id"] == "s" and "delta" in d for d in deltas)
assert "".join(d["delta"] for d in deltas) == final["text"], final
assert sum((d["token_ids"] for d in deltas), []) == final["token_ids"]
assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 20
' "$T/out.jsonl"
    assert_success
}

@test "64 concurrent requests with a KV pool too small for all equal their solo runs" {
    for i in $(seq 1 64); do
        echo "{\"id\": $i, \"prompt\": \"Item $i of the list\", \"temperature\": 0, \"max_tokens\": $((20 + i % 24)), \"ignore_eos\": true, \"return_token_ids\": true}"
    done > "$T/in.jsonl"
    tm-run "$WS" --cache-tokens 512 < "$T/in.jsonl" > "$T/batch.jsonl"
    tm-run "$WS" --max-batch-size 1 < "$T/in.jsonl" > "$T/solo.jsonl"
    [ "$(wc -l < "$T/batch.jsonl")" -eq 64 ]
    run python3 "$PY" same "$T/batch.jsonl" "$T/solo.jsonl"
    assert_success
}

@test "a session's second turn prefills only its new tokens" {
    cat > "$T/in.jsonl" <<'EOF'
{"id": 1, "session_id": 3, "messages": [{"role": "user", "content": "What is git?"}], "temperature": 0, "max_tokens": 8}
{"id": 2, "session_id": 3, "messages": [{"role": "user", "content": "What is git?"}, {"role": "assistant", "content": "A version control system."}, {"role": "user", "content": "Who wrote it?"}], "temperature": 0, "max_tokens": 8}
EOF
    tm-run "$WS" < "$T/in.jsonl" > "$T/out.jsonl"
    run python3 -c '
import json, sys
o = {d["id"]: d for d in map(json.loads, open(sys.argv[1]))}
first, second = o[1]["usage"], o[2]["usage"]
assert first["prompt_tokens_details"]["cached_tokens"] == 0
# The first turn'"'"'s prompt is reused (its answer differs from the one sent back).
assert second["prompt_tokens_details"]["cached_tokens"] >= first["prompt_tokens"], (first, second)
' "$T/out.jsonl"
    assert_success
}

@test "stop strings end the text before them; seeds repeat" {
    cat > "$T/in.jsonl" <<'EOF'
{"id": 1, "prompt": "The Linux kernel", "temperature": 0, "max_tokens": 30}
{"id": 2, "prompt": "The Linux kernel", "temperature": 0, "max_tokens": 30, "stop": "kernel's"}
{"id": 3, "prompt": "Once upon a time", "temperature": 0.8, "top_p": 0.9, "seed": 5, "max_tokens": 20}
{"id": 4, "prompt": "Once upon a time", "temperature": 0.8, "top_p": 0.9, "seed": 5, "max_tokens": 20}
EOF
    tm-run "$WS" < "$T/in.jsonl" > "$T/out.jsonl"
    run python3 -c '
import json, sys
o = {d["id"]: d for d in map(json.loads, open(sys.argv[1]))}
full, cut = o[1]["text"], o[2]
assert "kernel'"'"'s" in full
assert cut["text"] == full[:full.index("kernel'"'"'s")] and cut["finish_reason"] == "stop", cut
assert o[3]["text"] == o[4]["text"]
' "$T/out.jsonl"
    assert_success
}

@test "bad lines get an error line with their id; the run goes on and exits 1" {
    printf '%s\n' \
        '{"id": 1, "prompt": "ok", "max_tokens": 2}' \
        'not json' \
        '{"id": 3, "prompt": "x", "max_tokens": 0}' \
        '{"id": 4, "prompt": 5}' \
        '{"id": 5, "prompt": "x", "temperature": "hot"}' \
        '{"id": 6, "prompt": "x", "max_token": 3}' \
        '{"id": 7, "prompt": "x", "messages": []}' \
        '{"id": 8, "prompt": "x", "max_tokens": 18446744073709551615}' \
        '{"id": 9, "messages": [{"role": "user"}]}' \
        '{"id": 10, "prompt": "x", "top_p": 0}' \
        '[1, 2]' \
        '{"id": 12, "prompt": "last", "max_tokens": 2}' \
        '{"id": 14, "prompt": "x", "max_tokens": 1e30}' \
        '{"id": 15, "prompt": "x", "seed": -1, "stop": [1]}' \
        '{"id": 16, "prompt": "x", "session_id": -2}' > "$T/in.jsonl"
    printf '{"id": 13, "prompt": "\xff\xfe"}\n' > "$T/bad-utf8.jsonl"
    sed -i "12r $T/bad-utf8.jsonl" "$T/in.jsonl"
    run tm-run "$WS" --jsonl < "$T/in.jsonl"
    assert_failure 1
    assert_line --partial '"id": 3, "error": {"message": "line 3: \"max_tokens\" must be a positive integer"'
    assert_line --partial '"error": {"message": "line 2: invalid JSON'
    assert_line --partial '"id": 4, "error": {"message": "line 4: \"prompt\" must be a string or an array of token ids"'
    assert_line --partial '"id": 5, "error": {"message": "line 5: \"temperature\" must be a number'
    assert_line --partial '"id": 6, "error": {"message": "line 6: unknown field \"max_token\""'
    assert_line --partial '"id": 7, "error": {"message": "line 7: give exactly one of'
    assert_line --partial '"id": 8, "error": {"message": "line 8: \"max_tokens\" must be a positive integer (too large)'
    assert_line --partial '"id": 9, "error": {"message": "line 9: missing \"messages[0].content\"'
    assert_line --partial '"id": 10, "error": {"message": "line 10: \"top_p\" must be'
    assert_line --partial '"error": {"message": "line 11: expected a JSON object'
    assert_line --partial '"error": {"message": "line 13: invalid UTF-8'
    assert_line --partial '"id": 14, "error": {"message": "line 14: \"max_tokens\" must be a positive integer"'
    assert_line --partial '"id": 15, "error": {"message": "line 15: \"stop\" must be a string or an array of strings"'
    assert_line --partial '"id": 16, "error": {"message": "line 16: \"session_id\" must be a non-negative integer"'
    assert_line --partial '"id": 1, "text":'
    assert_line --partial '"id": 12, "text":'
}

@test "a prompt longer than the context fails alone" {
    long=$(python3 -c 'print(" ".join(["word"] * 300))')
    printf '{"id": 1, "prompt": "%s", "max_tokens": 4}\n{"id": 2, "prompt": "short", "max_tokens": 2}\n' "$long" > "$T/in.jsonl"
    run tm-run "$WS" --session-len 128 < "$T/in.jsonl"
    assert_failure 1
    assert_line --partial '"id": 1, "text": "", "finish_reason": "error"'
    assert_line --partial 'the context holds 128'
    assert_line --partial '"id": 2, "text":'
}

@test "usage errors exit 2" {
    run tm-run
    assert_failure 2
    assert_output --partial 'missing the workspace'
    run tm-run "$WS" --max-tokens 0
    assert_failure 2
    run tm-run "$WS" --jsonl --ppl x
    assert_failure 2
    run tm-run "$T/nowhere" --jsonl < /dev/null
    assert_failure 1
    assert_output --partial 'tm-run: error: '
    run tm-run "$WS" --device tpu < /dev/null
    assert_failure 1
    assert_output --partial 'unknown device'
    if ! command -v nvidia-smi > /dev/null; then
        run tm-run "$WS" --device cuda < /dev/null
        assert_failure 1
        assert_output --partial 'tm-run: error: --device cuda: no usable GPU'
    fi
}

@test "--ppl of eval.txt is within 0.1% of the reference fp32 perplexity" {
    tm-run "$WS" --ppl "$SHARED/text/eval.txt" > "$T/ppl.jsonl"
    run python3 "$PY" ppl "$T/ppl.jsonl" 28.4124 0.001
    assert_success
    grep -q '"tokens": 175670' "$T/ppl.jsonl"
}

@test "examples/chat holds a two-turn session through the library API" {
    run example-chat "$WS"
    assert_success
    assert_line --regexp '^\[[0-9]+ prompt tokens, 0 from the session cache'
    assert_line --regexp '^\[[0-9]+ prompt tokens, [1-9][0-9]* from the session cache'
}

@test "--quant-policy 8 and 4: perplexity within 1% and 5% of the unquantized cache" {
    head -c 65536 "$SHARED/text/eval.txt" > "$T/eval.txt"
    tm-run "$WS" --ppl "$T/eval.txt" > "$T/fp.jsonl"
    want=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["perplexity"])' "$T/fp.jsonl")
    tm-run "$WS" --quant-policy 8 --ppl "$T/eval.txt" > "$T/q8.jsonl"
    run python3 "$PY" ppl "$T/q8.jsonl" "$want" 0.01
    assert_success
    tm-run "$WS" --quant-policy 4 --ppl "$T/eval.txt" > "$T/q4.jsonl"
    run python3 "$PY" ppl "$T/q4.jsonl" "$want" 0.05
    assert_success
    run tm-run "$WS" --quant-policy 3 --ppl "$T/eval.txt"
    assert_failure 2
}

@test "sampled tokens do not depend on the number of sampling threads; TM_STEP_LOG writes one line per step" {
    python3 - > "$T/in.jsonl" <<'PY'
import json
for i in range(20):
    print(json.dumps({"id": i, "prompt": f"Story {i}:", "max_tokens": 10, "temperature": 0.9, "top_p": 0.9,
                      "top_k": 50 if i % 2 else 0, "min_p": 0.02 if i % 3 == 0 else 0, "seed": i}))
PY
    TM_SAMPLE_THREADS=1 tm-run "$WS" --jsonl < "$T/in.jsonl" | sort > "$T/one.jsonl"
    TM_SAMPLE_THREADS=4 TM_STEP_LOG="$T/steps.jsonl" tm-run "$WS" --jsonl < "$T/in.jsonl" | sort > "$T/four.jsonl"
    run cmp "$T/one.jsonl" "$T/four.jsonl"
    assert_success
    run python3 "$ROOT/scripts/step-report.py" "$T/steps.jsonl"
    assert_success
    assert_output --partial "steps,"
    assert_output --partial "decode"
    assert_output --partial "slow steps:"
    # Every line is JSON with the documented fields.
    run python3 -c "
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
assert rows and all({'rows', 'seqs', 'forward_us', 'after_us'} <= set(r) for r in rows)
assert sum(1 for r in rows if r['decode_seqs'] >= 8) > 0   # steps that sampled in parallel
" "$T/steps.jsonl"
    assert_success
}
