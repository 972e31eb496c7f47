"""TensorRT-RTX ahead-of-time builds (DESIGN.md 5): does TensorRT's ONNX parser and
builder accept an exported graph and its optimisation profiles?

TensorRT-RTX (``tensorrt-rtx-cu13-libs`` + its bindings, imported as ``tensorrt_rtx``)
parses ONNX and builds an engine for a named compute capability without a GPU, so CPU
machines and CI can check every exported graph. It cannot run the engine here. Its
networks are strongly typed: the precision of every layer is the dtype the ONNX graph
gives it (so the fp32 islands of an fp16 export are honoured as written).

The build itself is the shared TensorRT builder (``engines.tensorrt.build_plan``); this
module adds what is RTX's: the module, its compute-capability targets, ``build_aot``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import EngineError, MissingDependencyError
from ..export.spec import Profile
from ..fileio import atomic_path
from .tensorrt import build_plan

log = logging.getLogger(__name__)

#: Ada (SM89) has FP8 and BF16 tensor cores, so every precision of the exporter builds.
DEFAULT_COMPUTE_CAPABILITY = "SM89"


@dataclass
class RtxBuild:
    """Outcome of one ahead-of-time build."""

    compute_capability: str
    plan_bytes: int
    seconds: float
    layers: int
    inputs: dict[str, list[tuple[int, ...]]]
    messages: list[str] = field(default_factory=list)


def _import():
    try:
        import tensorrt_rtx as trt
    except ImportError:
        raise MissingDependencyError("tensorrt-rtx-cu13", "rtx", "TensorRT-RTX engine builds") from None
    return trt


def is_available() -> bool:
    """Whether the TensorRT-RTX Python bindings and libraries import."""
    try:
        _import()
    except (MissingDependencyError, OSError):
        return False
    return True


def version() -> str:
    return _import().__version__


def compute_capabilities() -> list[str]:
    """Compute capabilities this TensorRT-RTX can build for (e.g. SM75 ... SM121)."""
    trt = _import()
    return [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]


def build_aot(onnx_path: str | Path, spec, compute_capability: str = DEFAULT_COMPUTE_CAPABILITY,
              plan_path: str | Path | None = None, workspace_bytes: int | None = None,
              profiles: Sequence[Profile] | None = None) -> RtxBuild:
    """Parse ``onnx_path`` and build an engine for ``compute_capability`` with one
    optimisation profile per entry of ``profiles`` (default ``spec.profiles``), through the
    shared TensorRT builder. Raises EngineError with TensorRT's messages if it rejects the
    graph. Writes the serialized plan to ``plan_path`` (atomically) when given."""
    trt = _import()
    if compute_capability not in compute_capabilities():
        raise EngineError(f"compute capability must be one of {compute_capabilities()}, "
                          f"got {compute_capability!r}")
    shapes = [spec.profile_shapes(p) for p in (profiles or spec.profiles)]
    built = build_plan(trt, onnx_path, shapes, compute_capability=compute_capability, workspace_bytes=workspace_bytes)
    if plan_path is not None:
        with atomic_path(plan_path) as tmp:
            tmp.write_bytes(built.plan)
    return RtxBuild(compute_capability, len(built.plan), built.seconds, built.layers, built.inputs, built.messages)
