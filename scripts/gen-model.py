#!/usr/bin/env python3
"""Writes a Llama-shaped Hugging Face model directory with synthetic weights.

For tests and benchmarks that need a model of a given size without PyTorch:
    scripts/gen-model.py OUT --hidden 2048 --layers 8 --inter 5632 --vocab 32000 [--fill zero|random]
--fill zero makes a sparse file (instant, no disk used); random fills with
bf16 values drawn uniformly from bytes (finite values only).
The tokenizer files are copied from --tokenizer DIR when given.
"""
import argparse, json, os, shutil, struct, sys

p = argparse.ArgumentParser()
p.add_argument("out")
p.add_argument("--hidden", type=int, default=512)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--heads", type=int, default=8)
p.add_argument("--kv-heads", type=int, default=2)
p.add_argument("--inter", type=int, default=1536)
p.add_argument("--vocab", type=int, default=32000)
p.add_argument("--fill", choices=["zero", "random"], default="zero")
p.add_argument("--tokenizer", default=None)
a = p.parse_args()

hd = a.hidden // a.heads
shapes = [("model.embed_tokens.weight", [a.vocab, a.hidden]), ("model.norm.weight", [a.hidden]),
          ("lm_head.weight", [a.vocab, a.hidden])]
for l in range(a.layers):
    pre = f"model.layers.{l}."
    shapes += [(pre + "input_layernorm.weight", [a.hidden]), (pre + "post_attention_layernorm.weight", [a.hidden]),
               (pre + "self_attn.q_proj.weight", [a.heads * hd, a.hidden]),
               (pre + "self_attn.k_proj.weight", [a.kv_heads * hd, a.hidden]),
               (pre + "self_attn.v_proj.weight", [a.kv_heads * hd, a.hidden]),
               (pre + "self_attn.o_proj.weight", [a.hidden, a.heads * hd]),
               (pre + "mlp.gate_proj.weight", [a.inter, a.hidden]), (pre + "mlp.up_proj.weight", [a.inter, a.hidden]),
               (pre + "mlp.down_proj.weight", [a.hidden, a.inter])]
header, off = {}, 0
for name, shape in shapes:
    n = 2
    for d in shape:
        n *= d
    header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [off, off + n]}
    off += n
htext = json.dumps(header).encode()
htext += b" " * (-len(htext) % 8)
os.makedirs(a.out, exist_ok=True)
path = os.path.join(a.out, "model.safetensors")
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(htext)))
    f.write(htext)
    if a.fill == "zero":
        f.truncate(8 + len(htext) + off)
    else:
        left = off
        while left:
            n = min(left, 1 << 24)
            b = bytearray(os.urandom(n))
            b[1::2] = bytes(x & 0x3f for x in b[1::2]) if n < 4096 else bytes(b[1::2]).translate(bytes(x & 0x3f for x in range(256)))
            f.write(b)
            left -= n
config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
          "num_hidden_layers": a.layers, "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads,
          "intermediate_size": a.inter, "vocab_size": a.vocab, "max_position_embeddings": 4096,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1,
          "eos_token_id": 2, "torch_dtype": "bfloat16"}
with open(os.path.join(a.out, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
if a.tokenizer:
    for fn in ("tokenizer.json", "tokenizer_config.json"):
        src = os.path.join(a.tokenizer, fn)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(a.out, fn))
else:
    with open(os.path.join(a.out, "tokenizer.json"), "w") as f:
        f.write('{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}\n')
print(f"{a.out}: {off / 1e6:.1f} MB of weights", file=sys.stderr)
