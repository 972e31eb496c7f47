"""ONNX Runtime "engines": the session configuration plus what ONNX Runtime can persist.

- ``ort-cpu``: intra/inter-op threads, full graph optimisation, thread spinning off (the
  runtime loop mixes torch and ORT calls), and the optimised model written once with
  ``optimized_model_filepath`` into the engine directory, so later loads skip the
  optimisation passes.
- ``ort-cuda``: the CUDA provider with CUDA graphs enabled (the runtime binds I/O).
- ``ort-trt``: the TensorRT provider with the bucket profiles as explicit profile
  shapes and its engine and timing caches inside the engine directory.

The GPU providers need onnxruntime-gpu and a CUDA device; asking for them without is
an error that says so. ``onnxruntime`` is imported lazily.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import EngineError, MissingDependencyError

OPTIMIZED_NAME = "model.ort.onnx"
PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "ort-trt": "TensorrtExecutionProvider"}


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime", "", "ONNX Runtime engines") from None
    return ort


def version() -> str:
    return import_ort().__version__


def default_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)


def session_options(threads: int | None = None, optimized_path: Path | None = None, external_data: bool = False,
                    optimize: bool = True, spinning: bool = False, shared_arena: bool = False):
    """Spinning off by default (builds and tests share the cores); the runtime turns it on
    for the DiT: its step takes 10.7 ms spinning against 17.5 ms without on 2 cores, as
    idle threads otherwise sleep between its ~1,600 small ops. ``shared_arena``: the
    session allocates from one process-wide CPU arena shared by every such session, so
    the runtime's engines (the five decoder variants above all) hold one peak's worth of
    activations between them, not one each."""
    ort = import_ort()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or default_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if shared_arena:
        _register_shared_arena(ort)
        opts.add_session_config_entry("session.use_env_allocators", "1")
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
        if external_data:  # > 2 GB models keep their weights outside the protobuf
            opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                          optimized_path.name + ".data")
            opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return opts


@functools.cache
def _register_shared_arena(ort) -> None:
    """The process-wide CPU arena, registered once."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))


def providers(backend: str, directory: Path, profile_shapes: Sequence[Mapping[str, Any]] = ()) -> list:
    """The provider list of ``backend`` (its options point into the engine ``directory``)."""
    ort = import_ort()
    want = PROVIDERS[backend]
    available = ort.get_available_providers()
    if want not in available:
        raise EngineError(f"backend {backend} needs ONNX Runtime's {want} (onnxruntime-gpu and a CUDA device); this "
                          f"onnxruntime {ort.__version__} has {available}; use --backend ort-cpu")
    if backend == "ort-cpu":
        return ["CPUExecutionProvider"]
    if backend == "ort-cuda":
        return [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]

    def fmt(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, shapes[i]))}" for p in profile_shapes
                        for name, shapes in p.items())

    trt_opts = {"trt_engine_cache_enable": "1", "trt_engine_cache_path": str(directory / "trt_cache"),
                "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(directory / "trt_cache"),
                "trt_fp16_enable": "1"}
    if profile_shapes:
        trt_opts.update(trt_profile_min_shapes=fmt(0), trt_profile_opt_shapes=fmt(1), trt_profile_max_shapes=fmt(2))
    return [("TensorrtExecutionProvider", trt_opts), ("CUDAExecutionProvider", {}), "CPUExecutionProvider"]


def build(onnx_path: Path, directory: Path, backend: str, threads: int | None = None,
          profile_shapes: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Create the session once in ``directory`` (writing the optimised model for
    ``ort-cpu``); return the artefact file name and the flags used."""
    ort = import_ort()
    external = onnx_path.with_name(onnx_path.name + ".data").exists()
    optimized = directory / OPTIMIZED_NAME if backend == "ort-cpu" else None
    opts = session_options(threads, optimized, external)
    try:
        ort.InferenceSession(str(onnx_path), opts, providers=providers(backend, directory, profile_shapes))
    except EngineError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types
        raise EngineError(f"ONNX Runtime could not load {onnx_path}: {exc}") from None
    if optimized is None:
        # GPU providers: the artefact is the source graph itself (their caches live beside it)
        import shutil

        for f in [onnx_path] + ([onnx_path.with_name(onnx_path.name + ".data")] if external else []):
            shutil.copy2(f, directory / f.name)
        artefact = onnx_path.name
    else:
        artefact = OPTIMIZED_NAME
    return {"artifact": artefact, "flags": {"threads": opts.intra_op_num_threads, "graph_optimization": "all",
                                            "spinning": False, "provider": PROVIDERS[backend]}}


def load(directory: Path, artifact: str, backend: str, threads: int | None = None,
         profile_shapes: Sequence[Mapping[str, Any]] = (), spinning: bool = False, shared_arena: bool = False):
    """A session on a built engine directory (the optimised model loads without
    re-running the optimisation passes)."""
    ort = import_ort()
    opts = session_options(threads, optimize=backend != "ort-cpu", spinning=spinning,
                           shared_arena=shared_arena and backend == "ort-cpu")
    try:
        return ort.InferenceSession(str(directory / artifact), opts,
                                    providers=providers(backend, directory, profile_shapes))
    except EngineError:
        raise
    except Exception as exc:
        raise EngineError(f"{directory / artifact} is not a loadable ONNX Runtime model ({exc}); rebuild with "
                          f"`easyanimate-rt build`") from None


# --- transformer fusions -------------------------------------------------------------------------


def try_fusions(onnx_path: Path, out_path: Path, num_heads: int, hidden_size: int) -> dict[str, int] | None:
    """``onnxruntime.transformers.optimizer`` fusions (attention, LayerNorm, GELU) written
    to ``out_path``; the counts of fused operators, or None where the optimiser cannot
    handle the graph. Skip-LayerNorm fusion is off: it assumes affine LayerNorms, and the
    DiT's are not."""
    try:
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions
    except ImportError:
        return None
    import logging

    opts = FusionOptions("bert")
    opts.enable_skip_layer_norm = False
    opts.enable_bias_skip_layer_norm = False
    # it warns that the producer is not "pytorch": expected for our graphs, not the user's business
    logging.getLogger("onnxruntime.transformers.optimizer").setLevel(logging.ERROR)
    try:
        model = optimizer.optimize_model(str(onnx_path), model_type="bert", num_heads=num_heads,
                                         hidden_size=hidden_size, optimization_options=opts, opt_level=0)
        model.save_model_to_file(str(out_path))
    except Exception as exc:  # the optimiser's pattern matchers raise on graphs they do not expect
        logging.getLogger(__name__).info("transformer fusions do not apply to %s: %s", onnx_path, exc)
        return None
    return {k: int(v) for k, v in model.get_fused_operator_statistics().items() if v}


def time_session(session, feeds: Mapping[str, Any], repeat: int = 5) -> float:
    """Median seconds of one run after a warm-up run."""
    import time

    session.run(None, dict(feeds))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        session.run(None, dict(feeds))
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]
