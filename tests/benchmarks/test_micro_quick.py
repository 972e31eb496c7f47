"""The pytest-benchmark micro-benchmarks (benchmarks/test_micro.py) in their quick mode:
each hot piece runs once on the ``tiny`` preset and is checked against the reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from needs import require

REPO = Path(__file__).resolve().parents[2]


def test_micro_benchmarks_quick_mode():
    for m in ("onnx", "onnxruntime", "pytest_benchmark"):
        require(m)
    env = {**os.environ, "EASYANIMATE_BENCH_MODEL": "tiny"}  # XDG_CACHE_HOME: the session's cache
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
                          str(REPO / "benchmarks" / "test_micro.py")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "5 passed" in out.stdout, out.stdout[-2000:]
