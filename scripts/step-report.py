#!/usr/bin/env python3
"""Where an engine run's time went, from its TM_STEP_LOG file.

    TM_STEP_LOG=steps.jsonl tm-run WS --jsonl < requests.jsonl > out.jsonl
    scripts/step-report.py steps.jsonl

Steps are grouped by kind (decode only, or with prompt rows) and by the
number of rows; for each group: steps, mean rows and sequences, mean
milliseconds scheduling, in the backend's forward pass and after it
(sampling, detokenizing, outputs), and the share of the run's time.

Then the slow steps: those whose forward pass took at least 2 ms and 25%
more than the median of the (up to) six nearest steps of their kind, with
the time beyond that median. One-off costs paid in the middle of a run show
there: a CUDA graph captured for a batch size met for the first time, a
kernel's module loaded at its first launch.
"""
import json
import sys
from collections import defaultdict


def bucket(rows):
    b = 1
    while b < rows:
        b *= 2
    return b


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    steps = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
    if not steps:
        sys.exit("no steps")
    groups = defaultdict(list)
    for s in steps:
        kind = "decode" if s["decode_seqs"] == s["seqs"] and s["rows"] == s["seqs"] else "mixed"
        groups[(kind, bucket(s["rows"]))].append(s)
    total_us = sum(s["schedule_us"] + s["forward_us"] + s["after_us"] for s in steps)
    print(f"{len(steps)} steps, {total_us / 1e6:.2f} s in steps; "
          f"forward {sum(s['forward_us'] for s in steps) / total_us:.1%}, "
          f"after {sum(s['after_us'] for s in steps) / total_us:.1%}, "
          f"schedule {sum(s['schedule_us'] for s in steps) / total_us:.1%}")
    print(f"{'kind':<7} {'rows<=':>6} {'steps':>6} {'rows':>7} {'seqs':>6} {'ctx/seq':>8} "
          f"{'sched ms':>8} {'fwd ms':>8} {'after ms':>8} {'share':>6}")
    for (kind, b), g in sorted(groups.items()):
        n = len(g)
        mean = lambda k: sum(s[k] for s in g) / n
        share = sum(s["schedule_us"] + s["forward_us"] + s["after_us"] for s in g) / total_us
        ctx = sum(s["context_tokens"] for s in g) / max(1, sum(s["seqs"] for s in g))
        print(f"{kind:<7} {b:>6} {n:>6} {mean('rows'):>7.1f} {mean('seqs'):>6.1f} {ctx:>8.0f} "
              f"{mean('schedule_us') / 1e3:>8.2f} {mean('forward_us') / 1e3:>8.2f} {mean('after_us') / 1e3:>8.2f} "
              f"{share:>6.1%}")
    slow = slow_steps(steps)
    extra = sum(x for _, x, _ in slow)
    print(f"slow steps: {len(slow)}, {extra / 1e3:.1f} ms beyond their neighbours "
          f"({extra / total_us:.1%} of the time in steps)")
    for s, x, med in sorted(slow, key=lambda v: -v[1])[:5]:
        kind = "decode" if s["decode_seqs"] == s["seqs"] and s["rows"] == s["seqs"] else "mixed"
        print(f"  step {s.get('step', '?')}: {kind}, {s['rows']} rows, {s['forward_us'] / 1e3:.1f} ms "
              f"(neighbours {med / 1e3:.1f})")


def slow_steps(steps):
    """(step, microseconds beyond the neighbours' median, that median) of the
    steps whose forward pass is well above that of their kind's neighbours."""
    by_kind = defaultdict(list)
    for s in steps:
        by_kind[s["decode_seqs"] == s["seqs"] and s["rows"] == s["seqs"]].append(s)
    out = []
    for g in by_kind.values():
        for i, s in enumerate(g):
            near = sorted(t["forward_us"] for t in g[max(0, i - 3):i + 4] if t is not s)
            if not near:
                continue
            med = near[len(near) // 2]
            if s["forward_us"] >= med * 1.25 and s["forward_us"] - med >= 2000:
                out.append((s, s["forward_us"] - med, med))
    return out


if __name__ == "__main__":
    main()
