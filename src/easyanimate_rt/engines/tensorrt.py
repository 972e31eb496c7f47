"""TensorRT engines: the one builder behind datacenter TensorRT (``tensorrt``, GPU) and
TensorRT-RTX (``tensorrt_rtx``, which also builds ahead of time for a named compute
capability without a GPU). Strongly typed networks parsed from the ONNX file (external
data next to it is found by the parser), one optimisation profile per bucket profile,
optimisation level, workspace limit, optional weight streaming and refit, a persistent
timing cache, ``build_serialized_network``. The libraries are imported lazily.

``engine_loader`` is the polygraphy loader the validation ladder runs TensorRT through.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import EngineError, MissingDependencyError

log = logging.getLogger(__name__)

#: input name -> (min shape, opt shape, max shape)
ProfileShapes = Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


@dataclass
class PlanBuild:
    """Outcome of one build."""

    plan: bytes
    seconds: float
    layers: int
    inputs: dict[str, list[tuple[int, ...]]]
    messages: list[str] = field(default_factory=list)


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise MissingDependencyError("tensorrt", "trt", "TensorRT engine builds") from None
    return trt


def has_tensorrt_gpu() -> bool:
    """Whether ``tensorrt`` imports and a CUDA device is visible (TensorRT runs there)."""
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _logger(trt, messages: list[str]):
    class _Collect(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.WARNING:
                messages.append(f"{severity.name}: {msg}")
            log.debug("%s %s: %s", trt.__name__, severity.name, msg)

    return _Collect()


def build_plan(trt, onnx_path: str | Path, profiles: Sequence[ProfileShapes], *,
               compute_capability: str | None = None, workspace_bytes: int | None = None,
               optimization_level: int | None = None, weight_streaming: bool = False, refit: bool = False,
               timing_cache: str | Path | None = None) -> PlanBuild:
    """Parse ``onnx_path`` with ``trt`` (the tensorrt or tensorrt_rtx module) and build a
    serialized engine with one optimisation profile per entry of ``profiles``. Raises
    EngineError with the parser's or builder's messages if TensorRT rejects the graph."""
    onnx_path = Path(onnx_path)
    messages: list[str] = []
    logger = _logger(trt, messages)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    t0 = time.perf_counter()
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i).desc()) for i in range(parser.num_errors)]
        raise EngineError(f"{trt.__name__} {trt.__version__} rejected {onnx_path}: " + "; ".join(errors or messages))
    config = builder.create_builder_config()
    if compute_capability is not None:
        names = [n for n in trt.ComputeCapability.__members__ if n.startswith("SM")]
        if compute_capability not in names:
            raise EngineError(f"compute capability must be one of {names}, got {compute_capability!r}")
        config.num_compute_capabilities = 1
        config.set_compute_capability(getattr(trt.ComputeCapability, compute_capability), 0)
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if optimization_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = optimization_level
    if weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    if refit:
        config.set_flag(trt.BuilderFlag.REFIT)
    cache = None
    if timing_cache is not None and hasattr(config, "create_timing_cache"):
        path = Path(timing_cache)
        cache = config.create_timing_cache(path.read_bytes() if path.is_file() else b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    shapes: dict[str, list[tuple[int, ...]]] = {}
    for profile in profiles:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile.items():
            opt.set_shape(name, lo, mid, hi)
            shapes.setdefault(name, []).extend([tuple(lo), tuple(mid), tuple(hi)])
        config.add_optimization_profile(opt)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"{trt.__name__} {trt.__version__} could not build {onnx_path}: " + "; ".join(messages[-5:]))
    if cache is not None:
        from ..fileio import atomic_path

        with atomic_path(timing_cache) as tmp:
            tmp.write_bytes(memoryview(cache.serialize()))
    seconds = time.perf_counter() - t0
    log.info("%s: built %s in %.1fs (%d layers, %d bytes)", trt.__name__, onnx_path, seconds,
             network.num_layers, plan.nbytes)
    return PlanBuild(bytes(memoryview(plan)), seconds, network.num_layers, shapes, messages)


def local_gpu() -> dict[str, Any]:
    """Name and compute capability of the local CUDA device (the build target of ``trt``)."""
    import torch

    if not torch.cuda.is_available():
        raise EngineError("the trt backend builds for the local GPU and there is none; use --backend rtx with "
                          "--compute-capability for an ahead-of-time build, or an ort backend")
    major, minor = torch.cuda.get_device_capability()
    return {"kind": "gpu", "name": torch.cuda.get_device_name(), "compute_capability": f"SM{major}{minor}"}


def engine_loader(onnx_path: str | Path, spec):
    """A polygraphy loader that builds the engine of ``onnx_path`` with the profiles of
    ``spec`` when called (lazily, as polygraphy runners expect)."""
    try:
        from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile
    except ImportError:
        raise MissingDependencyError("polygraphy", "export", "TensorRT engine builds") from None
    profiles = []
    for p in spec.profiles:
        prof = Profile()
        for name, (lo, mid, hi) in spec.profile_shapes(p).items():
            prof.add(name, min=lo, opt=mid, max=hi)
        profiles.append(prof)
    return EngineFromNetwork(NetworkFromOnnxPath(str(onnx_path), strongly_typed=True),
                             config=CreateConfig(profiles=profiles))
