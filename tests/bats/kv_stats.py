"""Readers for the tm-qparams tests: a tm-calib statistics file
(formats/calib-stats.md: a JSON header line, then the arrays as
little-endian fp32, zstd-compressed) and a workspace's KV scales
(quant/rank<R>/kv_int<B>.bin, fp32)."""
import json
import struct
import subprocess


def load_stats(path):
    raw = subprocess.run(["zstd", "-dc", path], capture_output=True, check=True).stdout
    nl = raw.index(b"\n")
    header = json.loads(raw[:nl])
    off, arrays = nl + 1, {}
    for a in header["arrays"]:
        k = 1
        for d in a["shape"]:
            k *= d
        arrays[a["name"]] = struct.unpack_from(f"<{k}f", raw, off)
        off += 4 * k
    return arrays


def load_params(ws, bits, rank=0):
    b = open(f"{ws}/quant/rank{rank}/kv_int{bits}.bin", "rb").read()
    return struct.unpack(f"<{len(b) // 4}f", b)
