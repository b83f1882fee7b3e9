#!/usr/bin/env python3
"""Fills a Hugging Face model directory with random weights for its config.json.

    gen-random-hf.py DIR [--seed N] [--dtype bfloat16]

DIR holds config.json (and the tokenizer files); model.safetensors is written
by transformers' save_pretrained, as a real checkpoint of that architecture
would be. Needs PyTorch and transformers (the GPU machine has both).
"""
import argparse, os, sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--dtype", default="bfloat16")
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
a = p.parse_args()
torch.manual_seed(a.seed)
cfg = AutoConfig.from_pretrained(a.dir)
with torch.device(a.device):
    model = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, a.dtype))
model.save_pretrained(a.dir, safe_serialization=True, max_shard_size="5GB")
print(f"{a.dir}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters", file=sys.stderr)
