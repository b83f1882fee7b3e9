#!/usr/bin/env python3
"""Turns a golden file into tm-run input and checks tm-run's output against it.
  tokenizer_golden.py input  GOLDEN MODE   -> request lines on stdout
  tokenizer_golden.py check  GOLDEN MODE OUTPUT [TOKENIZER] -> exit 1 on any mismatch
MODE: encode, encode-special, decode, chat."""
import json, sys

cmd, golden, mode = sys.argv[1], sys.argv[2], sys.argv[3]
rows = [json.loads(l) for l in open(golden, encoding="utf-8")]
if mode == "chat":
    rows = [r for r in rows if r["tokenizer"] == sys.argv[5 if cmd == "check" else 4]]
if cmd == "input":
    for i, r in enumerate(rows):
        if mode == "encode":
            req = {"id": i, "text": r["text"]}
        elif mode == "encode-special":
            req = {"id": i, "text": r["text"], "add_special_tokens": True}
        elif mode == "decode":
            req = {"id": i, "ids": r["ids"]}
        else:
            req = {"id": i, "messages": r["messages"], "add_generation_prompt": r["add_generation_prompt"]}
        print(json.dumps(req, ensure_ascii=False))
    sys.exit(0)
outs = [json.loads(l) for l in open(sys.argv[4], encoding="utf-8")]
assert len(outs) == len(rows), f"{len(outs)} outputs for {len(rows)} inputs"
bad = 0
for out, r in zip(outs, rows):
    want = {"encode": ("ids", r.get("ids")), "encode-special": ("ids", r.get("ids_with_special")),
            "decode": ("text", r.get("decoded")), "chat": ("text", r.get("text"))}[mode]
    if out.get(want[0]) != want[1] or (mode == "chat" and out.get("ids") != r["ids"]):
        bad += 1
        print("mismatch:", json.dumps(r, ensure_ascii=False)[:200], "->", json.dumps(out, ensure_ascii=False)[:200])
print(f"{len(rows) - bad}/{len(rows)} match")
sys.exit(1 if bad else 0)
