#!/usr/bin/env bash
# One device lease: install the carried wheels (diffusers is not in the GPU image), print the machine, run the GPU
# benchmark inside a time budget, leave the results in $OUT. Run from the repository root on the GPU machine:
#     bash bench/gpu_lease.sh [budget seconds]
set -uo pipefail
budget="${1:-420}"
shift || true
out="${OUT:-bench/results}"
mkdir -p "$out"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c "import torch, diffusers, transformers, accelerate; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"
PYTHONUNBUFFERED=1 python3 bench/bench_gpu.py --out "$out" --budget-s "$budget" "$@" 2>&1 | tee "$out/gpu_bench.log"
