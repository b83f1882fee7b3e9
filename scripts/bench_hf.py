#!/usr/bin/env python3
"""Hugging Face transformers baseline for scripts/bench-gpu.sh, and the
hardware bounds measured on the same GPU.

    bench_hf.py MODEL_DIR SHAREGPT_JSONL SUBSET > hf.jsonl

Workloads (bf16, sdpa, greedy, EOS ignored), as engine_bench runs them on tm:
  decode_b1      128-token prompt, 256 new tokens: tokens/s after the first
  prefill_2048   one 2048-token prompt: time to first token
  offline_output the first SUBSET requests of the ShareGPT-like file, in
                 batches of 64 sorted by input length (left padding), each
                 batch generating its longest output; output tokens/s counts
                 the tokens the requests asked for
  copy_GBps, bf16_TFLOPs  device-to-device copy bandwidth and cuBLAS bf16 peak
"""
import json, sys, time

import torch
from transformers import AutoModelForCausalLM

model_dir, sharegpt, subset = sys.argv[1], sys.argv[2], int(sys.argv[3])
dev = "cuda"


def emit(name, value, unit, **extra):
    print(json.dumps({"bench": name, "value": round(value, 3), "unit": unit, **extra}), flush=True)


def sync_time(f, reps=1):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        r = f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps, r


# Hardware bounds.
a = torch.empty(4 << 30, dtype=torch.uint8, device=dev)
b = torch.empty_like(a)
b.copy_(a)
t, _ = sync_time(lambda: b.copy_(a), 5)
emit("copy_GBps", 2 * a.numel() / t / 1e9, "GB/s")
del a, b
x = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
y = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
x @ y
t, _ = sync_time(lambda: x @ y, 10)
emit("bf16_TFLOPs", 2 * 8192**3 / t / 1e12, "TFLOP/s")
del x, y
torch.cuda.empty_cache()

model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, attn_implementation="sdpa").to(dev).eval()
params = sum(p.numel() for p in model.parameters())
emit("params", params / 1e9, "billion")
gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)


def ids(n, salt=0):
    return torch.tensor([[1] + [300 + (i * 7919 + salt * 104729) % 20000 for i in range(1, n)]], device=dev)


with torch.no_grad():
    p128 = ids(128)
    model.generate(p128, max_new_tokens=8, min_new_tokens=8, **gen)
    t1, _ = sync_time(lambda: model.generate(p128, max_new_tokens=1, min_new_tokens=1, **gen))
    tn, _ = sync_time(lambda: model.generate(p128, max_new_tokens=256, min_new_tokens=256, **gen))
    emit("decode_b1", 255 / (tn - t1), "tok/s")
    p2048 = ids(2048, 99)
    model(p2048, logits_to_keep=1)
    t, _ = sync_time(lambda: model(p2048, logits_to_keep=1), 3)
    emit("prefill_2048", 2048 / t, "tok/s", ttft_s=t)

    reqs = [json.loads(l) for l in open(sharegpt)][:subset]
    order = sorted(range(len(reqs)), key=lambda i: reqs[i]["input_len"])
    useful = sum(r["output_len"] for r in reqs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(0, len(order), 64):
        batch = [reqs[i] for i in order[k:k + 64]]
        n_in = max(r["input_len"] for r in batch)
        n_out = max(r["output_len"] for r in batch)
        rows = [ids(r["input_len"], i)[0] for i, r in enumerate(batch)]
        x = torch.zeros(len(rows), n_in, dtype=torch.long, device=dev)
        mask = torch.zeros_like(x)
        for i, r in enumerate(rows):
            x[i, n_in - len(r):] = r
            mask[i, n_in - len(r):] = 1
        model.generate(x, attention_mask=mask, max_new_tokens=n_out, min_new_tokens=n_out, **gen)
    torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    emit("offline_output", useful / secs, "tok/s", requests=len(reqs), requests_per_s=len(reqs) / secs, seconds=secs)
