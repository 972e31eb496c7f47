"""TensorRT-RTX ahead-of-time builds (DESIGN.md 5): does TensorRT's ONNX parser and
builder accept an exported graph and its optimisation profiles?

TensorRT-RTX (``tensorrt-rtx-cu13-libs`` + its bindings, imported as ``tensorrt_rtx``)
parses ONNX and builds an engine for a named compute capability without a GPU, so CPU
machines and CI can check every exported graph. It cannot run the engine here. Its
networks are strongly typed: the precision of every layer is the dtype the ONNX graph
gives it (so the fp32 islands of an fp16 export are honoured as written).

This is the minimal helper the export tests use; the engine builder proper (plans on
disk with a manifest, TensorRT on GPU) lives beside it in engines/.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import EngineError, MissingDependencyError

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


def _logger(trt, messages: list[str]):
    class _Collect(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                messages.append(f"{severity.name}: {msg}")
            log.debug("tensorrt_rtx %s: %s", severity.name, msg)

    return _Collect()


def build_aot(onnx_path: str | Path, spec, compute_capability: str = DEFAULT_COMPUTE_CAPABILITY,
              plan_path: str | Path | None = None, workspace_bytes: int | None = None) -> RtxBuild:
    """Parse ``onnx_path`` and build an engine for ``compute_capability`` with one
    optimisation profile per ``spec.profiles`` entry.

    Raises EngineError with the parser's or builder's messages if TensorRT rejects the
    graph. Writes the serialised plan to ``plan_path`` (atomically) when given.
    """
    trt = _import()
    onnx_path = Path(onnx_path)
    if compute_capability not in compute_capabilities():
        raise EngineError(f"compute capability must be one of {compute_capabilities()}, "
                          f"got {compute_capability!r}")
    messages: list[str] = []
    logger = _logger(trt, messages)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineError(f"TensorRT-RTX {trt.__version__} rejected {onnx_path}: " + "; ".join(errors or messages))
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, compute_capability), 0)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    shapes_by_input: dict[str, list[tuple[int, ...]]] = {}
    for profile in spec.profiles:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in spec.profile_shapes(profile).items():
            opt.set_shape(name, lo, mid, hi)
            shapes_by_input.setdefault(name, []).extend([lo, mid, hi])
        config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT-RTX {trt.__version__} could not build {onnx_path} for "
                          f"{compute_capability}: " + "; ".join(messages[-5:]))
    seconds = time.perf_counter() - t0
    if plan_path is not None:
        from ..fileio import atomic_path

        with atomic_path(plan_path) as tmp:
            tmp.write_bytes(memoryview(plan))
    result = RtxBuild(compute_capability, plan.nbytes, seconds, network.num_layers, shapes_by_input, messages)
    log.info("tensorrt_rtx: built %s for %s in %.1fs (%d layers, %d bytes)", onnx_path, compute_capability,
             seconds, result.layers, result.plan_bytes)
    return result
