#!/usr/bin/env bash
# The benchmarks on a CUDA machine, in under 8 minutes: fp16 autocast, nvJPEG decoding.
#
#   bash bench/gpu.sh [OUT_DIR]        # default OUT_DIR: bench/out-gpu (or $OUT when set)
#
# Runs from the repository root with a python3 that has torch + torchvision (CUDA). Missing
# dependencies can travel as wheels in .whl/ (installed into /tmp/site first). For a machine
# with Python 3.12 and torch but nothing else of ours, fetch them where pip works:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     open_clip_torch faiss-cpu fastapi starlette uvicorn pydantic pydantic-core \
#     pydantic-settings python-dotenv python-multipart annotated-types typing-inspection \
#     typing_extensions ftfy wcwidth opentelemetry-api
# (pick the pydantic-core that the pydantic wheel names).
# Each step has its own time limit so one slow step cannot eat the others' time.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-bench/out-gpu}}"
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 - <<'PY' | tee "$out/machine.txt"
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
PY
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee -a "$out/machine.txt"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.txt" 2>&1
    echo "   exit $? ; tail:"
    tail -n 12 "$out/$name.txt"
}

# --quick: 0.5 s of timing per (row, side); batches up to 256 because a GPU is not busy at 16.
step encode 120 python3 bench/encode.py --device cuda --precisions fp32,fp16 --quick \
    --batches 1,16,64,256 --json "$out/encode.json"
# nvJPEG decoding in the main process (on) vs PIL in the 4 workers (off), same fp16 model.
step index_build 150 python3 bench/index_build.py --device cuda --precisions fp16 --workers 4 \
    --gpu-decode on,off --n 1000 --json "$out/index_build.json"
step serve_load 150 python3 bench/serve_load.py --device cuda --precision fp16 --clients 16 64 \
    --seconds 15 --collection 1000
step ann 60 python3 bench/ann.py --sizes 100000 --kinds exact,hnsw --max-s 5 \
    --json "$out/ann.json"
