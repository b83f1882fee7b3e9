#!/usr/bin/env python3
"""Helpers for tm-run's generation tests.

  generate_check.py golden-input GOLDEN          request lines for every golden prompt
  generate_check.py golden-check GOLDEN OUT      outputs equal the reference's greedy tokens
                                                 (except after a near tie in the reference)
  generate_check.py same A B                     two answer files hold the same token_ids per id
  generate_check.py ppl OUT WANT REL             perplexity within REL of WANT
"""
import json
import sys


def load(path):
    return [json.loads(l) for l in open(path, encoding="utf-8") if l.strip()]


def golden_lines(path):
    return [g for g in load(path) if "prompt_ids" in g]


def main():
    cmd = sys.argv[1]
    if cmd == "golden-input":
        prompts = [json.loads(l)["prompt"] for l in open(sys.argv[2].replace("greedy-fp32", "prompts"))]
        for i, p in enumerate(prompts):
            print(json.dumps({"id": i, "prompt": p, "temperature": 0, "max_tokens": 48, "return_token_ids": True}))
    elif cmd == "golden-check":
        gold = golden_lines(sys.argv[2])
        out = {o["id"]: o for o in load(sys.argv[3])}
        assert len(out) == len(gold), f"{len(out)} answers for {len(gold)} prompts"
        for i, g in enumerate(gold):
            got, want = out[i]["token_ids"], g["output_ids"]
            d = next((k for k in range(min(len(got), len(want))) if got[k] != want[k]), None)
            if d is None:
                assert len(got) == len(want), f"prompt {i}: {len(got)} tokens, reference {len(want)}"
                continue
            gap = g["top5"][d][0][1] - g["top5"][d][1][1]
            assert gap < 1e-3, f"prompt {i}: token {d} is {got[d]}, reference {want[d]} (top-2 gap {gap})"
    elif cmd == "same":
        a = {o["id"]: o for o in load(sys.argv[2])}
        b = {o["id"]: o for o in load(sys.argv[3])}
        assert a.keys() == b.keys(), "different ids"
        for k in a:
            assert a[k]["token_ids"] == b[k]["token_ids"], f"id {k} differs"
    elif cmd == "ppl":
        got = load(sys.argv[2])[0]["perplexity"]
        want, rel = float(sys.argv[3]), float(sys.argv[4])
        assert abs(got - want) / want <= rel, f"perplexity {got}, want {want} within {rel}"
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()
