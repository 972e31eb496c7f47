#!/usr/bin/env bash
# The whole GPU check in one call (device tool): which runtime backends run on this
# machine (TensorRT and ONNX Runtime GPU rows say "not run: <why>" where the library is
# absent), the CUDA tests (each backend against the reference, CUDA-graph replay equal
# to eager, the one denoising loop on device arrays), the benchmark suite's GPU part
# (matmul peaks; eager vs CUDA graphs vs torch.compile, bf16, with TFLOP/s; VAE slice
# decode; the upstream comparison), then what is asked by arguments. It stops at the
# first failing stage and says which. Afterwards, here:
#   python benchmarks/report.py --out <fetched>/bench --suite gpu
# Usage on the device machine, from the repo root (about 6 minutes on one H200):
#   bash benchmarks/gpu_check.sh [extra python module invocations...]
set -euo pipefail
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
stage=start
trap 'echo "gpu_check: stopped at stage \"$stage\" (exit $?); outputs so far in $OUT" >&2' ERR

stage=card
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

stage=backends
python3 - <<'PY' 2>&1 | tee "$OUT/backends.txt"
from easyanimate_rt.runtime.backends import REGISTRY, choose_auto, missing
for name, entry in REGISTRY.items():
    why = missing(entry, device="cuda")
    print(f"{name:14s} {'runs' if why is None else 'not run: ' + why}")
print("auto ->", choose_auto(device="cuda")[0].name)
PY

stage=gpu-tests
python3 -m pytest -q -m "gpu" tests -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"

stage=gpu-suite
timeout 420 python3 benchmarks/run.py --suite gpu --out "$OUT/bench" --work "$OUT/work" --no-report 2>&1 \
  | tail -30 | tee "$OUT/gpu_suite.txt"

for cmd in "$@"; do
  stage="extra: $cmd"
  echo "== $cmd"; eval "$cmd" 2>&1 | tee -a "$OUT/gpu_extra.txt"
done
stage=done
echo "gpu_check: all stages done; outputs in $OUT"
