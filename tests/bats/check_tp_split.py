#!/usr/bin/env python3
"""Checks that a tp=N workspace is the tp=1 workspace cut into N pieces, as
formats/workspace.md says: argv = TP1_DIR TPN_DIR."""
import json, sys

one, many = sys.argv[1], sys.argv[2]
cfg = {}
for line in open(f"{one}/config.ini"):
    if "=" in line and not line.startswith("#"):
        k, v = line.split("=", 1)
        cfg[k.strip()] = v.strip()
man = json.load(open(f"{many}/manifest.json"))
tp = man["tp"]
H, hd = int(cfg["hidden_size"]), int(cfg["head_dim"])
nh, nkv, inter = int(cfg["num_heads"]), int(cfg["num_kv_heads"]), int(cfg["intermediate_size"])
es = 2


def load(ws, rank, name):
    return open(f"{ws}/weights/rank{rank}/{name}.bin", "rb").read()


def rows(buf, ncols, r0, n):
    return buf[r0 * ncols * es:(r0 + n) * ncols * es]


def cols(buf, nrows, ncols, c0, n):
    return b"".join(buf[(r * ncols + c0) * es:(r * ncols + c0 + n) * es] for r in range(nrows))


hq = nh // tp
hkv = nkv // tp if nkv % tp == 0 else 1
for r in range(tp):
    kv0 = r * hkv if nkv % tp == 0 else r // (tp // nkv)
    for l in range(int(cfg["num_layers"])):
        full = load(one, 0, f"layers.{l}.attention.wqkv.weight")
        q = rows(full, H, r * hq * hd, hq * hd)
        k = rows(full, H, nh * hd + kv0 * hd, hkv * hd)
        v = rows(full, H, (nh + nkv) * hd + kv0 * hd, hkv * hd)
        assert load(many, r, f"layers.{l}.attention.wqkv.weight") == q + k + v, f"wqkv rank {r} layer {l}"
        wo = load(one, 0, f"layers.{l}.attention.wo.weight")
        assert load(many, r, f"layers.{l}.attention.wo.weight") == cols(wo, H, nh * hd, r * hq * hd, hq * hd), "wo"
        w13 = load(one, 0, f"layers.{l}.feed_forward.w13.weight")
        I = inter // tp
        want = rows(w13, H, r * I, I) + rows(w13, H, inter + r * I, I)
        assert load(many, r, f"layers.{l}.feed_forward.w13.weight") == want, "w13"
        w2 = load(one, 0, f"layers.{l}.feed_forward.w2.weight")
        assert load(many, r, f"layers.{l}.feed_forward.w2.weight") == cols(w2, H, inter, r * I, I), "w2"
    assert load(many, r, "tok_embeddings.weight") == load(one, 0, "tok_embeddings.weight")
    # Sizes: each rank holds 1/tp of every split tensor.
    for f in man["files"]:
        if f["path"].endswith("w2.weight.bin"):
            assert f["shape"] == [H, inter // tp], f
print(f"split ok: tp={tp}, {hq} heads and {hkv} KV heads per rank")
