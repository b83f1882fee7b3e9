# Sourced on the GPU machine at the start of a call, from the repository root:
#   . scripts/device-unpack.sh .carry
# Unpacks what scripts/device-carry.sh assembled: the binaries into C/bin,
# the models into C/shared/models (the random models' weights made by
# scripts/gen-random-hf.py with PyTorch), and sets LD_LIBRARY_PATH, TM_SHARED
# and NCCL_NVLS_ENABLE=0 for the GPU tests and benches (scripts/test-gpu.sh C
# C/shared with GPU_TESTS=C/bin/gpu-tests, CALIB_STATS=C/calib.stats).
C=$(cd "${1:-.carry}" && pwd)
tar xzf "$C/bin.tar.gz" -C "$C"
[ -d "$C/shared/tokenizers/llama3" ] || tar xzf "$C/tokenizers.tar.gz" -C "$C/shared"
mkdir -p "$C/shared/models"
[ -d "$C/shared/models/tinytech-25m" ] || tar xzf "$C/tinytech.tar.gz" -C "$C/shared/models"
if [ ! -d "$C/shared/models/random-qwen3" ]; then
    tar xzf "$C/random.tar.gz" -C "$C/shared/models"
    for m in random-mistral random-qwen2 random-qwen3; do
        python3 scripts/gen-random-hf.py "$C/shared/models/$m" > /dev/null 2>&1 ||
            echo "device-unpack: no weights for $m (PyTorch missing?)" >&2
    done
fi
export LD_LIBRARY_PATH="$C/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export TM_SHARED="$C/shared" NCCL_NVLS_ENABLE=0
