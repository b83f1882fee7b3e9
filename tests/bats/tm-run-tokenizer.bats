#!/usr/bin/env bats
# tm-run's tokenizer modes against Hugging Face's outputs, and bad input.

load helpers

setup() { T="$BATS_TEST_TMPDIR"; G="$SHARED/golden"; PY="$ROOT/tests/bats/tokenizer_golden.py"; }

golden() {  # golden TOKENIZER_DIR MODE GOLDEN_FILE [CHAT_NAME]
    local dir=$1 mode=$2 file=$3 name=${4:-}
    local flag=--encode
    case $mode in decode) flag=--decode ;; chat) flag=--render-chat ;; esac
    python3 "$PY" input "$file" "$mode" $name > "$T/in.jsonl"
    tm-run --tokenizer "$dir" $flag < "$T/in.jsonl" > "$T/out.jsonl"
    run python3 "$PY" check "$file" "$mode" "$T/out.jsonl" $name
    assert_success
}

@test "tm-run --encode/--decode match Hugging Face for llama2, llama3, qwen3" {
    for t in llama2 llama3 qwen3; do
        golden "$SHARED/tokenizers/$t" encode "$G/tokenizer/$t.jsonl"
        golden "$SHARED/tokenizers/$t" encode-special "$G/tokenizer/$t.jsonl"
        golden "$SHARED/tokenizers/$t" decode "$G/tokenizer/$t.jsonl"
    done
}

@test "tm-run --render-chat matches apply_chat_template (text and ids)" {
    golden "$SHARED/tokenizers/llama3" chat "$G/chat/chat-templates.jsonl" llama3
    golden "$SHARED/tokenizers/qwen3" chat "$G/chat/chat-templates.jsonl" qwen3
    golden "$MODELS/tinytech-25m" chat "$G/chat/chat-templates.jsonl" tinytech
}

@test "tm-run --tokenizer accepts a workspace" {
    tm-convert -q "$MODELS/tinytech-25m" -o "$T/ws"
    run sh -c "echo '{\"text\": \"Hello world\", \"add_special_tokens\": true}' | tm-run --tokenizer '$T/ws' --encode"
    assert_success
    assert_output '{"ids": [1, 22557, 1526]}'
}

@test "tm-run --render-chat with built-in templates" {
    run sh -c "echo '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}' | tm-run --tokenizer '$SHARED/tokenizers/qwen3' --render-chat --chat-template chatml"
    assert_success
    assert_output --partial '"text": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"'
    assert_output --partial '"ids": [151644, 872, 198'
    for name in llama2 llama3 internlm2 vicuna; do
        run sh -c "echo '{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}' | tm-run --tokenizer '$SHARED/tokenizers/llama2' --render-chat --chat-template $name"
        assert_success
    done
    run sh -c "echo '{\"messages\": []}' | tm-run --tokenizer '$SHARED/tokenizers/llama2' --render-chat"
    assert_failure 1
    assert_output --partial "no chat_template; pass --chat-template"
    run tm-run --tokenizer "$SHARED/tokenizers/llama2" --render-chat --chat-template nope < /dev/null
    assert_failure 1
    assert_output --partial 'unknown chat template "nope"'
}

@test "tm-run answers bad lines with an error line carrying the id, and goes on" {
    printf '%s\n' '{"id": "a", "text": 5}' 'not json' '' '{"id": 3, "ids": [1]}' '[1,2]' \
        '{"id": "ok", "text": "fine"}' '{"text": "x", "add_special_tokens": "yes"}' > "$T/in"
    printf '{"id": "u", "text": "bad \377 byte"}\n' >> "$T/in"
    run sh -c "tm-run --tokenizer '$SHARED/tokenizers/llama3' --encode < '$T/in' 2>/dev/null"
    assert_failure 1
    assert_line --index 0 '{"id": "a", "error": {"message": "line 1: \"text\" must be a string", "type": "invalid_request_error"}}'
    assert_line --index 1 --partial '"message": "line 2: invalid JSON'
    assert_line --index 2 '{"id": 3, "error": {"message": "line 4: missing \"text\"", "type": "invalid_request_error"}}'
    assert_line --index 3 --partial 'line 5: expected a JSON object'
    assert_line --index 4 '{"id": "ok", "ids": [63157]}'
    assert_line --index 5 --partial 'line 7: \"add_special_tokens\" must be a boolean'
    assert_line --index 6 --partial 'line 8: invalid UTF-8'
    [ "${#lines[@]}" -eq 7 ]
}

@test "tm-run --decode refuses ids outside the vocabulary and wrong types" {
    printf '%s\n' '{"ids": [1, 99999999]}' '{"ids": [-1]}' '{"ids": "1 2"}' '{"ids": [1.5]}' '{"ids": [22557]}' > "$T/in"
    run sh -c "tm-run --tokenizer '$SHARED/tokenizers/llama2' --decode < '$T/in'"
    assert_failure 1
    assert_line --index 0 --partial 'id 99999999 is outside the vocabulary (0..31999)'
    assert_line --index 1 --partial 'id -1 is outside the vocabulary'
    assert_line --index 2 --partial '\"ids\" must be an array of integers'
    assert_line --index 3 --partial '\"ids\" must be an array of integers'
    assert_line --index 4 '{"text": "Hello"}'
}

@test "tm-run --render-chat reports template errors with their position" {
    printf '%s' "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}{{ messages[0].content }}" > "$T/tpl.jinja"
    printf '%s\n' '{"messages": [{"role": "system", "content": "x"}]}' '{"messages": [{"role": "user", "content": "hello"}]}' \
        '{"messages": [{"role": 3, "content": "x"}]}' '{"messages": "hi"}' > "$T/in"
    run sh -c "tm-run --tokenizer '$SHARED/tokenizers/llama2' --render-chat --chat-template '$T/tpl.jinja' < '$T/in'"
    assert_failure 1
    assert_line --index 0 --partial 'chat template: line 1, column 39: raise_exception: first message must be from the user'
    assert_line --index 1 --partial '"text": "hello"'
    assert_line --index 2 --partial 'messages[0].role must be a string'
    assert_line --index 3 --partial '\"messages\" must be an array'
}

@test "tm-run usage errors exit 2" {
    run tm-run --encode
    assert_failure 2
    run tm-run --tokenizer "$SHARED/tokenizers/llama2" --encode --decode
    assert_failure 2
    run tm-run --tokenizer "$T/nothing" --encode
    assert_failure 1
    assert_output --partial "tm-run: error:"
}
