#!/usr/bin/env bash
# The whole GPU check in one call (device tool): CUDA tests, the runtime's GPU
# benchmark (eager vs CUDA graphs vs torch.compile, bf16), then what is asked by
# arguments. Usage on the device machine, from the repo root:
#   bash benchmarks/gpu_check.sh [extra python module invocations...]
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -m "gpu" tests -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 400 python3 benchmarks/gpu_runtime.py --json "$OUT/gpu_runtime.json" 2>&1 | tail -20 | tee "$OUT/gpu_runtime.txt"
for cmd in "$@"; do
  echo "== $cmd"; eval "$cmd" 2>&1 | tee -a "$OUT/gpu_extra.txt"
done
