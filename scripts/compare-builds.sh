#!/bin/sh
# Compares two builds' outputs on every shared model: the greedy token ids of
# `tm-run --jsonl` (golden prompts, 32 tokens each, batched and with a chunked
# prompt) and tinytech's perplexity of text/eval.txt. A restructuring that
# changes no arithmetic gives identical lines; the summary says how many
# requests agree and both perplexities.
# Usage: scripts/compare-builds.sh OLD_BIN NEW_BIN [DEVICE] [SHARED_DIR]
#   OLD_BIN, NEW_BIN: directories holding tm-convert and tm-run; DEVICE cpu (default) or cuda.
set -eu
OLD=$1
NEW=$2
DEVICE=${3:-cpu}
SHARED=${4:-${TM_SHARED:-../shared}}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
fail=0
python3 - "$SHARED/golden/tinytech/greedy-fp32.jsonl" > "$TMP/in.jsonl" <<'EOF'
import json, sys
n = 0
for l in open(sys.argv[1]):
    g = json.loads(l)
    if "prompt" in g:
        print(json.dumps({"id": n, "prompt": g["prompt"], "temperature": 0, "max_tokens": 32,
                          "ignore_eos": True, "return_token_ids": True}))
        n += 1
# A long prompt, prefilled in several chunks (--max-batch-tokens 64).
print(json.dumps({"id": n, "prompt": " ".join(["The kernel schedules tasks on every CPU."] * 40),
                  "temperature": 0, "max_tokens": 32, "ignore_eos": True, "return_token_ids": True}))
EOF
for m in tinytech-25m random-qwen2 random-qwen3 random-mistral; do
    [ -d "$SHARED/models/$m" ] || { echo "$m: missing, skipped"; continue; }
    "$OLD/tm-convert" "$SHARED/models/$m" -o "$TMP/$m" > /dev/null
    for b in old new; do
        bin=$OLD
        [ "$b" = new ] && bin=$NEW
        "$bin/tm-run" "$TMP/$m" --device "$DEVICE" --jsonl --max-batch-tokens 64 < "$TMP/in.jsonl" > "$TMP/$m.$b.jsonl"
    done
    python3 - "$TMP/$m.old.jsonl" "$TMP/$m.new.jsonl" "$m" <<'EOF' || fail=1
import json, sys
a, b = ({o["id"]: o.get("token_ids") for o in map(json.loads, open(f))} for f in sys.argv[1:3])
same = sum(a[k] == b.get(k) and a[k] is not None for k in a)
print(f"{sys.argv[3]}: {same}/{len(a)} requests give the same {len(next(iter(a.values())))} greedy tokens")
sys.exit(0 if same == len(a) and len(a) == len(b) else 1)
EOF
done
for b in old new; do
    bin=$OLD
    [ "$b" = new ] && bin=$NEW
    "$bin/tm-run" "$TMP/tinytech-25m" --device "$DEVICE" --ppl "$SHARED/text/eval.txt" > "$TMP/ppl.$b.json"
done
python3 - "$TMP/ppl.old.json" "$TMP/ppl.new.json" <<'EOF' || fail=1
import json, sys
a, b = (json.load(open(f))["perplexity"] for f in sys.argv[1:3])
print(f"tinytech perplexity of eval.txt: old {a:.6f}, new {b:.6f}{'' if a == b else ' (DIFFERENT)'}")
sys.exit(0 if a == b else 1)
EOF
[ "$fail" -eq 0 ] && echo "compare-builds ($DEVICE): identical" || echo "compare-builds ($DEVICE): DIFFERENT"
exit "$fail"
