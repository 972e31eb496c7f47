"""Engine-layer pieces of the command line. Today: the TensorRT-RTX ahead-of-time build
check behind ``easyanimate-rt export --rtx`` and ``verify --rtx``; the ``build`` and
``engines`` commands will live here."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from ..export.spec import MODEL_NAME, ExportSpec
from . import tensorrt_rtx


def rtx_check(root: Path, keys: Iterable[str], compute_capability: str) -> bool:
    """Build every graph ``keys`` of the export at ``root`` with TensorRT-RTX for
    ``compute_capability``; print one line a graph; True when all built (or when
    TensorRT-RTX is not installed, which is said)."""
    if not tensorrt_rtx.is_available():
        print("tensorrt-rtx: not installed (pip install \"easyanimate-rt[rtx]\"); build check skipped")
        return True
    ok = True
    for key in keys:
        try:
            r = tensorrt_rtx.build_aot(root / key / MODEL_NAME, ExportSpec.load(root / key), compute_capability)
            print(f"  tensorrt-rtx {tensorrt_rtx.version()} {compute_capability}: {key:22s} built in "
                  f"{r.seconds:5.1f}s, {r.layers} layers, plan {r.plan_bytes / 1e6:.1f} MB")
        except Exception as exc:  # report every graph, then fail
            ok = False
            print(f"  tensorrt-rtx {compute_capability}: {key:22s} FAILED: {exc}")
    return ok
