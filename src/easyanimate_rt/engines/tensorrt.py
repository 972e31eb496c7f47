"""TensorRT engines: the one builder behind datacenter TensorRT (``tensorrt``, GPU) and
TensorRT-RTX (``tensorrt_rtx``, which also builds ahead of time for a named compute
capability without a GPU). Strongly typed networks parsed from the ONNX file (external
data next to it is found by the parser), one optimisation profile per bucket profile,
optimisation level, workspace limit, optional weight streaming and refit, a persistent
timing cache, ``build_serialized_network``. The libraries are imported lazily.

``engine_loader`` is the polygraphy loader the validation ladder runs TensorRT through.
A build also records what the runtime plans its buffers from (``PlanBuild.io``, and
``device_memory`` where the plan can be deserialized); ``import_backend`` is the one
place a backend name becomes its TensorRT module.
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
    #: {name, mode (input | output), dtype} per network I/O tensor (manifest field ``io``)
    io: list[dict[str, str]] = field(default_factory=list)
    #: activation bytes per optimisation profile; empty where the plan cannot be
    #: deserialized here (every ahead-of-time build) (manifest field ``device_memory``)
    device_memory: list[int] = field(default_factory=list)


#: TensorRT DataType member name -> the dtype name specs and manifests use (numpy/torch spelling)
DTYPE_NAMES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "FP8": "float8_e4m3fn",
               "INT64": "int64", "INT32": "int32", "INT8": "int8", "UINT8": "uint8", "BOOL": "bool"}


def dtype_name(trt_dtype) -> str:
    """``trt.DataType.HALF`` -> ``"float16"`` (unknown types: their lower-case TensorRT name)."""
    name = getattr(trt_dtype, "name", str(trt_dtype).rsplit(".", 1)[-1])
    return DTYPE_NAMES.get(name, name.lower())


def import_backend(backend: str):
    """The TensorRT module of an engine backend: ``tensorrt`` for ``trt``, ``tensorrt_rtx``
    for ``rtx``; a MissingDependencyError naming the extra (trt, rtx) when it is missing."""
    if backend == "trt":
        return import_tensorrt()
    if backend == "rtx":
        from .tensorrt_rtx import _import

        return _import()
    raise EngineError(f"backend {backend!r} is not a TensorRT backend (trt, rtx)")


def collecting_logger(trt, messages: list[str]):
    """A TensorRT logger that keeps warnings and errors in ``messages`` (for error text)
    and sends everything to this module's log at debug level."""
    return _logger(trt, messages)


def network_io(network) -> list[dict[str, str]]:
    """{name, mode, dtype} of each input and output of a parsed network. Strongly typed
    networks keep these dtypes in the engine, so the runtime can plan its buffers from
    them without deserializing the plan."""
    ins = [network.get_input(i) for i in range(network.num_inputs)]
    outs = [network.get_output(i) for i in range(network.num_outputs)]
    return ([{"name": t.name, "mode": "input", "dtype": dtype_name(t.dtype)} for t in ins]
            + [{"name": t.name, "mode": "output", "dtype": dtype_name(t.dtype)} for t in outs])


def plan_device_memory(trt, plan: bytes) -> list[int]:
    """Activation bytes each optimisation profile of ``plan`` needs, read from the
    deserialized engine (``get_device_memory_size_for_profile_v2``, else the engine-wide
    ``device_memory_size_v2``). The builder does not report it, and deserializing needs a
    GPU this TensorRT runs on: ``[]`` elsewhere (every ahead-of-time RTX build)."""
    from .manifest import cuda_visible

    if not cuda_visible():
        return []
    messages: list[str] = []
    try:
        runtime = trt.Runtime(_logger(trt, messages))
        engine = runtime.deserialize_cuda_engine(plan)
    except Exception as exc:  # a plan for another GPU, a library that cannot run here
        log.debug("%s: no device memory figures (%s)", trt.__name__, exc)
        return []
    if engine is None:
        log.debug("%s: no device memory figures (%s)", trt.__name__, "; ".join(messages[-2:]))
        return []
    n = engine.num_optimization_profiles
    per_profile = getattr(engine, "get_device_memory_size_for_profile_v2", None)
    if per_profile is not None:
        return [int(per_profile(i)) for i in range(n)]
    total = getattr(engine, "device_memory_size_v2", None)
    return [int(engine.device_memory_size if total is None else total)] * n


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
               timing_cache: str | Path | None = None, require_user_allocation: bool = False) -> PlanBuild:
    """Parse ``onnx_path`` with ``trt`` (the tensorrt or tensorrt_rtx module) and build a
    serialized engine with one optimisation profile per entry of ``profiles``. Raises
    EngineError with the parser's or builder's messages if TensorRT rejects the graph.
    ``require_user_allocation``: TensorRT-RTX's REQUIRE_USER_ALLOCATION flag (all memory
    from the application), which RTX asks for before its engines can be captured in a
    CUDA graph; ignored by a TensorRT without the flag. The result records the network's
    I/O and, where the plan can be deserialized here, each profile's activation bytes."""
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
    if require_user_allocation and hasattr(trt.BuilderFlag, "REQUIRE_USER_ALLOCATION"):
        config.set_flag(trt.BuilderFlag.REQUIRE_USER_ALLOCATION)
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
    plan_bytes = bytes(memoryview(plan))
    return PlanBuild(plan_bytes, seconds, network.num_layers, shapes, messages, io=network_io(network),
                     device_memory=plan_device_memory(trt, plan_bytes))


def local_gpu(backend: str = "trt") -> dict[str, Any]:
    """Name and compute capability of the local CUDA device (the build target of the GPU
    backends); an EngineError naming ``backend`` where there is none."""
    import torch

    if not torch.cuda.is_available():
        raise EngineError(f"--backend {backend} builds for the local GPU and there is none; use --backend rtx with "
                          f"--compute-capability for an ahead-of-time build, or ort-cpu")
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
