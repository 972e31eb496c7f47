"""Numerical tolerances of the validation ladder (DESIGN.md 4), in one table, and the
one implementation of the statistics they are checked on.

Tests, the ``verify`` command and benchmarks read these; nobody hard-codes their own.
torch-free: arrays are anything ``numpy.asarray`` takes (a CPU tensor included).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from .errors import ExportError

#: name -> (max abs error or None, minimum cosine similarity or None)
TOLERANCES: dict[str, tuple[float | None, float | None]] = {
    "reference_exact": (1e-5, None),        # our module vs the same math elsewhere (diffusers, fp32)
    "sampler_parity": (1e-5, None),         # our samplers vs diffusers schedulers, 25-step trajectory
    "onnx_fp32": (1e-4, 0.99999),           # torch fp32 vs ONNX Runtime CPU fp32
    "onnx_fp16": (None, 0.999),             # fp16 graph vs fp32 torch
    "onnx_bf16": (None, 0.999),             # bf16 graph (ONNX reference evaluator) vs fp32 torch
    "trt_fp16": (None, 0.999),              # ONNX Runtime vs TensorRT fp16/bf16
    "fp8": (None, 0.99),                    # fp8 vs bf16 per step
}


def _flat(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor: float64 numpy without importing torch here
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def cosine(a: Any, b: Any) -> float:
    """Cosine similarity; two all-zero tensors have cosine 1, one all-zero tensor 0."""
    a, b = _flat(a), _flat(b)
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b / (na * nb))


def error_stats(actual: Any, expected: Any) -> dict[str, Any]:
    """max/mean absolute error, cosine similarity, finiteness and the reference's scale."""
    a, e = _flat(actual), _flat(expected)
    if a.shape != e.shape:
        raise ExportError(f"output sizes differ: {a.size} vs {e.size}")
    finite = bool(np.isfinite(a).all())
    diff = np.abs(a - e) if finite else np.full_like(a, np.inf)
    return {"max_abs": float(diff.max()) if diff.size else 0.0,
            "mean_abs": float(diff.mean()) if diff.size else 0.0,
            "cosine": cosine(a, e) if finite else 0.0, "finite": finite,
            "ref_max_abs": float(np.abs(e).max()) if e.size else 0.0}


def within(stats: Mapping[str, Any], tolerance: str) -> bool:
    max_abs, min_cos = TOLERANCES[tolerance]
    return bool(stats["finite"]) and (max_abs is None or stats["max_abs"] <= max_abs) and \
        (min_cos is None or stats["cosine"] >= min_cos)


def check_close(actual: Any, expected: Any, name: str) -> dict[str, Any]:
    """Compare against ``TOLERANCES[name]``; raise AssertionError with the statistics."""
    shape_a, shape_e = tuple(np.shape(actual)), tuple(np.shape(expected))
    if shape_a != shape_e:
        raise AssertionError(f"{name}: shape {shape_a} != {shape_e}")
    stats = error_stats(actual, expected)
    if not within(stats, name):
        max_abs, min_cos = TOLERANCES[name]
        raise AssertionError(f"{name}: {stats} outside tolerance (max_abs<={max_abs}, cosine>={min_cos})")
    return stats
