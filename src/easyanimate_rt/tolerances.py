"""Numerical tolerances of the validation ladder (DESIGN.md 4), in one table.

Tests, the ``verify`` command and benchmarks read these; nobody hard-codes their own.
"""

from __future__ import annotations

import torch

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


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float((a @ b) / (a.norm() * b.norm()).clamp_min(1e-30))


def check_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> dict[str, float]:
    """Compare against ``TOLERANCES[name]``; raise AssertionError with the statistics."""
    max_abs, min_cos = TOLERANCES[name]
    actual, expected = actual.detach().float().cpu(), expected.detach().float().cpu()
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    stats = {"max_abs": float((actual - expected).abs().max()), "cosine": cosine(actual, expected),
             "finite": bool(torch.isfinite(actual).all())}
    ok = stats["finite"]
    ok &= max_abs is None or stats["max_abs"] <= max_abs
    ok &= min_cos is None or stats["cosine"] >= min_cos
    if not ok:
        raise AssertionError(f"{name}: {stats} outside tolerance (max_abs<={max_abs}, cosine>={min_cos})")
    return stats
