#!/usr/bin/env bats
# tm-convert: every model of ../shared, tensor-parallel splits, --check, and
# failures that must leave nothing behind.

load helpers

setup() { T="$BATS_TEST_TMPDIR"; }

@test "tm-convert --help describes the options" {
    run tm-convert --help
    assert_success
    assert_output --partial "--tp"
    assert_output --partial "--check"
}

@test "tm-convert with no arguments is a usage error (exit 2)" {
    run tm-convert
    assert_failure 2
    assert_output --partial "tm-convert: error:"
    run tm-convert "$MODELS/tinytech-25m" -o "$T/ws" --tp 0
    assert_failure 2
    run tm-convert "$MODELS/tinytech-25m" -o "$T/ws" --dtype int3
    assert_failure 2
    assert_output --partial "--dtype must be bf16 or fp16"
    run tm-convert --bogus
    assert_failure 2
}

@test "tm-convert converts every model in ../shared/models and --check passes" {
    for m in tinytech-25m random-qwen2 random-qwen3 random-mistral; do
        run tm-convert "$MODELS/$m" -o "$T/$m"
        assert_success
        run tm-convert --check "$T/$m"
        assert_success
        assert_output --partial "ok"
        grep -q "^architecture = " "$T/$m/config.ini"
        [ -f "$T/$m/tokenizer/tokenizer.json" ]
    done
    grep -q "^qk_norm = 1" "$T/random-qwen3/config.ini"
    grep -q "^attn_bias = 1" "$T/random-qwen2/config.ini"
    grep -q "^tie_word_embeddings = 0" "$T/random-mistral/config.ini"
    [ -f "$T/random-mistral/weights/rank0/output.weight.bin" ]
    [ ! -f "$T/tinytech-25m/weights/rank0/output.weight.bin" ]
}

@test "tm-convert --dtype fp16 writes fp16 weights" {
    run tm-convert "$MODELS/random-qwen3" -o "$T/ws" --dtype fp16
    assert_success
    grep -q "^weight_dtype = fp16" "$T/ws/config.ini"
    ! grep -q '"bf16"' "$T/ws/manifest.json"
}

@test "tm-convert --tp 2 gives each rank half of each split tensor" {
    run tm-convert "$MODELS/tinytech-25m" -o "$T/tp1"
    assert_success
    run tm-convert "$MODELS/tinytech-25m" -o "$T/tp2" --tp 2
    assert_success
    grep -q "^tp = 2" "$T/tp2/config.ini"
    run python3 "$ROOT/tests/bats/check_tp_split.py" "$T/tp1" "$T/tp2"
    assert_success
    assert_output --partial "split ok"
}

@test "tm-convert --tp 4 replicates KV heads when the model has fewer" {
    # random-qwen3: 4 heads, 2 KV heads.
    run tm-convert "$MODELS/random-qwen3" -o "$T/tp1"
    assert_success
    run tm-convert "$MODELS/random-qwen3" -o "$T/tp4" --tp 4
    assert_success
    run python3 "$ROOT/tests/bats/check_tp_split.py" "$T/tp1" "$T/tp4"
    assert_success
}

@test "tm-convert refuses a tp that does not divide the heads, leaving nothing" {
    run tm-convert "$MODELS/tinytech-25m" -o "$T/ws" --tp 4
    assert_failure 1
    assert_output --partial "does not divide num_attention_heads 6"
    [ -z "$(leftovers "$T")" ]
}

@test "tm-convert --check fails, naming the file, after one byte of a weight is flipped" {
    run tm-convert "$MODELS/tinytech-25m" -o "$T/ws"
    assert_success
    f="$T/ws/weights/rank0/layers.2.attention.wo.weight.bin"
    python3 -c "import sys; p=sys.argv[1]; b=bytearray(open(p,'rb').read()); b[1000]^=1; open(p,'wb').write(b)" "$f"
    run tm-convert --check "$T/ws"
    assert_failure 1
    assert_output --partial "layers.2.attention.wo.weight.bin: checksum mismatch"
}

@test "tm-convert --check fails on a truncated weight and on a missing manifest" {
    run tm-convert "$MODELS/random-qwen2" -o "$T/ws"
    assert_success
    truncate -s 100 "$T/ws/weights/rank0/norm.weight.bin"
    run tm-convert --check "$T/ws"
    assert_failure 1
    assert_output --partial "norm.weight.bin"
    rm "$T/ws/manifest.json"
    run tm-convert --check "$T/ws"
    assert_failure 1
    assert_output --partial "manifest.json: not found"
}

@test "tm-convert fails cleanly on a truncated safetensors and leaves nothing behind" {
    mkdir "$T/bad"
    cp "$MODELS/tinytech-25m"/*.json "$T/bad/"
    head -c 5000 "$MODELS/tinytech-25m/model.safetensors" > "$T/bad/model.safetensors"
    run tm-convert "$T/bad" -o "$T/out"
    assert_failure 1
    assert_output --partial "model.safetensors: header length"
    [ "${#lines[@]}" -eq 1 ]
    [ -z "$(leftovers "$T" bad)" ]
}

@test "tm-convert fails cleanly without config.json and on an unsupported architecture" {
    mkdir "$T/bad"
    cp "$MODELS/random-qwen2"/* "$T/bad/"
    rm "$T/bad/config.json"
    run tm-convert "$T/bad" -o "$T/out"
    assert_failure 1
    assert_output --partial "config.json: not found"
    cp "$MODELS/random-qwen2/config.json" "$T/bad/"
    sed -i 's/Qwen2ForCausalLM/GPTNeoXForCausalLM/' "$T/bad/config.json"
    run tm-convert "$T/bad" -o "$T/out"
    assert_failure 1
    assert_output --partial "unsupported architecture GPTNeoXForCausalLM"
    echo '{"architectures": ["LlamaForCausalLM"], "hidden_size": "big"' > "$T/bad/config.json"
    run tm-convert "$T/bad" -o "$T/out"
    assert_failure 1
    assert_output --partial "config.json: not valid JSON"
    [ -z "$(leftovers "$T" bad)" ]
}

@test "tm-convert refuses a weight of the wrong shape, naming it" {
    mkdir "$T/bad"
    cp "$MODELS/random-qwen2"/* "$T/bad/"
    sed -i 's/"intermediate_size": 192/"intermediate_size": 128/' "$T/bad/config.json"
    run tm-convert "$T/bad" -o "$T/out"
    assert_failure 1
    assert_output --partial "mlp.gate_proj.weight has shape [192, 64], expected [128, 64]"
    [ -z "$(leftovers "$T" bad)" ]
}

@test "tm-convert refuses to overwrite a workspace unless --force" {
    run tm-convert "$MODELS/random-qwen2" -o "$T/ws"
    assert_success
    run tm-convert "$MODELS/random-qwen3" -o "$T/ws"
    assert_failure 1
    assert_output --partial "already exists"
    grep -q Qwen2ForCausalLM "$T/ws/config.ini"
    run tm-convert "$MODELS/random-qwen3" -o "$T/ws" --force
    assert_success
    grep -q Qwen3ForCausalLM "$T/ws/config.ini"
    [ -z "$(leftovers "$T" ws)" ]
}

@test "tm-convert reads sharded safetensors with an index" {
    python3 "$ROOT/tests/bats/shard_model.py" "$MODELS/random-mistral" "$T/sharded"
    run tm-convert "$T/sharded" -o "$T/ws"
    assert_success
    run tm-convert "$MODELS/random-mistral" -o "$T/ws1"
    assert_success
    # Same weights, same checksums.
    diff <(grep -o '"xxh64": "[0-9a-f]*"' "$T/ws/manifest.json" | sort) \
         <(grep -o '"xxh64": "[0-9a-f]*"' "$T/ws1/manifest.json" | sort)
}

@test "tm-convert interrupted by SIGINT leaves no workspace behind" {
    python3 "$ROOT/scripts/gen-model.py" "$T/big" --hidden 2048 --layers 24 --inter 5632 --fill zero 2>/dev/null
    tm-convert "$T/big" -o "$T/ws" &
    pid=$!
    sleep 0.3
    kill -INT $pid
    rc=0
    wait $pid || rc=$?
    [ "$rc" -eq 130 ]
    [ -z "$(leftovers "$T" big)" ]
}
