#!/usr/bin/env python3
"""Re-writes a model.safetensors as two shards with model.safetensors.index.json:
argv = SRC_DIR DST_DIR."""
import json, os, shutil, struct, sys

src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst)
for f in os.listdir(src):
    if f != "model.safetensors":
        shutil.copy(os.path.join(src, f), dst)
raw = open(os.path.join(src, "model.safetensors"), "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + n])
data = raw[8 + n:]
names = sorted(k for k in hdr if k != "__metadata__")
halves = [names[:len(names) // 2], names[len(names) // 2:]]
wm = {}
for i, part in enumerate(halves):
    fn = f"model-0000{i + 1}-of-00002.safetensors"
    h, blob, off = {}, b"", 0
    for k in part:
        b, e = hdr[k]["data_offsets"]
        h[k] = {"dtype": hdr[k]["dtype"], "shape": hdr[k]["shape"], "data_offsets": [off, off + e - b]}
        blob += data[b:e]
        off += e - b
        wm[k] = fn
    ht = json.dumps(h).encode()
    open(os.path.join(dst, fn), "wb").write(struct.pack("<Q", len(ht)) + ht + blob)
json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(dst, "model.safetensors.index.json"), "w"))
