#!/usr/bin/env bash
# The whole GPU check in one call (device tool): CUDA tests, the benchmark suite's GPU
# part (matmul peaks; eager vs CUDA graphs vs torch.compile, bf16, with TFLOP/s; VAE
# slice decode; the upstream comparison), then what is asked by arguments. Afterwards,
# here: python benchmarks/report.py --out <fetched>/bench --suite gpu
# Usage on the device machine, from the repo root:
#   bash benchmarks/gpu_check.sh [extra python module invocations...]
set -uo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 -m pytest -q -m "gpu" tests -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
timeout 420 python3 benchmarks/run.py --suite gpu --out "$OUT/bench" --work "$OUT/work" --no-report 2>&1 \
  | tail -30 | tee "$OUT/gpu_suite.txt"
for cmd in "$@"; do
  echo "== $cmd"; eval "$cmd" 2>&1 | tee -a "$OUT/gpu_extra.txt"
done
