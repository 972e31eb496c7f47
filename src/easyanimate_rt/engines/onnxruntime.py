"""ONNX Runtime "engines": the session configuration plus what ONNX Runtime can persist.

- ``ort-cpu``: intra/inter-op threads, full graph optimisation, thread spinning off (the
  runtime loop mixes torch and ORT calls), and the optimised model written once with
  ``optimized_model_filepath`` into the engine directory, so later loads skip the
  optimisation passes.
- ``ort-cuda``: the CUDA provider with CUDA graphs enabled (the runtime binds I/O);
  a graph ONNX Runtime cannot capture (a node off the CUDA provider, control flow) is
  loaded without them, with a log line.
- ``ort-trt``: the TensorRT provider with the bucket profiles as explicit profile
  shapes and its engine and timing caches inside the engine directory.

The GPU providers need onnxruntime-gpu and a CUDA device; asking for them without is
an error that says so. ``onnxruntime`` is imported lazily.

NVIDIA's TensorRT-RTX execution provider (:data:`RTX_PROVIDER`) is a plugin that the
application registers (``onnxruntime-ep-nv-tensorrt-rtx``, ONNX Runtime >= 1.23's
plugin EP ABI) and runs on RTX-class GPUs only; no backend builds for it yet, but the
runtime binds a session on it like one on the TensorRT provider.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..errors import EngineError, MissingDependencyError

OPTIMIZED_NAME = "model.ort.onnx"
PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "ort-trt": "TensorrtExecutionProvider"}
RTX_PROVIDER = "NvTensorRTRTXExecutionProvider"
#: Providers whose sessions read and write CUDA device memory (the runtime binds their I/O).
GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider", RTX_PROVIDER)
#: RunOptions config keys (onnxruntime_run_options_config_keys.h): the CUDA graph of a run
#: (an integer >= 1; -1 runs without capture or replay), and "1": Run() returns without
#: synchronising the provider's stream with the host.
GRAPH_ID = "gpu_graph_id"
NO_SYNC = "disable_synchronize_execution_providers"
#: onnxruntime and onnxruntime-gpu are one module: the GPU build replaces the CPU one.
INSTALL_GPU = "pip uninstall -y onnxruntime && pip install onnxruntime-gpu"

log = logging.getLogger(__name__)


def import_ort():
    try:
        import onnxruntime as ort
    except ImportError:
        raise MissingDependencyError("onnxruntime", "", "ONNX Runtime engines") from None
    return ort


class MissingProviderError(MissingDependencyError):
    """The installed onnxruntime lacks the execution provider a backend runs on."""

    def __init__(self, message: str):
        ImportError.__init__(self, message)  # MissingDependencyError's own message names an extra; here it is a swap
        self.package, self.extra = "onnxruntime-gpu", ""


def require_provider(backend: str) -> None:
    """A MissingProviderError (a MissingDependencyError) unless this onnxruntime has the
    execution provider of ``backend``: checked before an engine does any other work."""
    ort = import_ort()
    want = PROVIDERS[backend]
    available = ort.get_available_providers()
    if want in available:
        return
    extra = " and NVIDIA TensorRT's libraries" if backend == "ort-trt" else ""
    raise MissingProviderError(
        f"backend {backend} needs ONNX Runtime's {want}, which this onnxruntime {ort.__version__} lacks (it has "
        f"{', '.join(available)}); install onnxruntime-gpu{extra}. onnxruntime-gpu replaces onnxruntime (one "
        f"module, two packages that must not be installed together): {INSTALL_GPU}. A CUDA device and driver are "
        f"needed too; without them use --backend ort-cpu")


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


def providers(backend: str, directory: Path, profile_shapes: Sequence[Mapping[str, Any]] = (), *,
              device_id: int = 0, stream: int | None = None, cuda_graph: bool = True) -> list:
    """The provider list of ``backend`` (its options point into the engine ``directory``).
    GPU providers run on device ``device_id`` and, given ``stream`` (a ``cudaStream_t``
    address), on that stream (the caller's copies and ONNX Runtime's kernels are then
    ordered without a host synchronisation); ``cuda_graph=False``: the CUDA provider
    without CUDA graphs."""
    ort = import_ort()
    want = PROVIDERS[backend]
    available = ort.get_available_providers()
    if want not in available:
        raise EngineError(f"backend {backend} needs ONNX Runtime's {want} (onnxruntime-gpu and a CUDA device); this "
                          f"onnxruntime {ort.__version__} has {available}; use --backend ort-cpu")
    if backend == "ort-cpu":
        return ["CPUExecutionProvider"]
    device = {"device_id": str(device_id)}
    if stream is not None:
        device["user_compute_stream"] = str(stream)  # has_user_compute_stream follows from it
    if backend == "ort-cuda":
        return [("CUDAExecutionProvider", {**device, "enable_cuda_graph": "1" if cuda_graph else "0"}),
                "CPUExecutionProvider"]

    def fmt(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, shapes[i]))}" for p in profile_shapes
                        for name, shapes in p.items())

    trt_opts = {**device, "trt_engine_cache_enable": "1", "trt_engine_cache_path": str(directory / "trt_cache"),
                "trt_timing_cache_enable": "1", "trt_timing_cache_path": str(directory / "trt_cache"),
                "trt_fp16_enable": "1"}
    if profile_shapes:
        trt_opts.update(trt_profile_min_shapes=fmt(0), trt_profile_opt_shapes=fmt(1), trt_profile_max_shapes=fmt(2))
    return [("TensorrtExecutionProvider", trt_opts), ("CUDAExecutionProvider", device), "CPUExecutionProvider"]


def gpu_session(path: Path, opts, backend: str, directory: Path, profile_shapes: Sequence[Mapping[str, Any]] = (),
                *, device_id: int = 0, stream: int | None = None):
    """A session on the GPU provider of ``backend``, or an error. ONNX Runtime's Python
    session, when a provider fails to start, prints and falls back to the next ones
    (the CPU); here that is an error, and the session cannot fall back later in a run
    either. A CUDA-graph session ONNX Runtime refuses (a node off the CUDA provider,
    control flow: an error, or a fallback where this onnxruntime's session does not take
    ``enable_fallback``) is created again without CUDA graphs, with a log line."""
    ort = import_ort()
    want = PROVIDERS[backend]

    def create(cuda_graph: bool):
        return ort.InferenceSession(str(path), opts, enable_fallback=0, providers=providers(
            backend, directory, profile_shapes, device_id=device_id, stream=stream, cuda_graph=cuda_graph))

    try:
        session = create(True)
        why = f"the session fell back to {session.get_providers()[0]}"
        refused = backend == "ort-cuda" and session.get_providers()[0] != want
    except Exception as exc:
        if backend != "ort-cuda" or "graph capture" not in str(exc):
            raise
        why, refused = str(exc).strip().splitlines()[-1], True
    if refused:
        log.info("%s: ONNX Runtime refused a session with CUDA graphs (%s); loading it without them", path, why)
        session = create(False)
    if session.get_providers()[0] != want:
        raise EngineError(f"ONNX Runtime did not start {want} for {path} (the session runs on "
                          f"{session.get_providers()}); check the CUDA{' and TensorRT' if backend == 'ort-trt' else ''}"
                          f" libraries onnxruntime-gpu {ort.__version__} needs, or use --backend ort-cpu")
    session.disable_fallback()
    return session


def cuda_graphs(session) -> bool:
    """Whether ``session`` was created with the CUDA provider's CUDA graphs (runs may then
    name a graph with :data:`GRAPH_ID`)."""
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return False
    value = session.get_provider_options().get("CUDAExecutionProvider", {}).get("enable_cuda_graph", "0")
    return str(value).lower() in ("1", "true")


def build(onnx_path: Path, directory: Path, backend: str, threads: int | None = None,
          profile_shapes: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """Create the session once in ``directory`` (writing the optimised model for
    ``ort-cpu``); return the artefact file name and the flags used."""
    ort = import_ort()
    external = onnx_path.with_name(onnx_path.name + ".data").exists()
    optimized = directory / OPTIMIZED_NAME if backend == "ort-cpu" else None
    opts = session_options(threads, optimized, external)
    try:
        if optimized is not None:
            ort.InferenceSession(str(onnx_path), opts, providers=providers(backend, directory, profile_shapes))
            graphs = None
        else:
            graphs = cuda_graphs(gpu_session(onnx_path, opts, backend, directory, profile_shapes))
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
    flags = {"threads": opts.intra_op_num_threads, "graph_optimization": "all", "spinning": False,
             "provider": PROVIDERS[backend]}
    if backend == "ort-cuda":
        flags["cuda_graph"] = graphs
    return {"artifact": artefact, "flags": flags}


def load(directory: Path, artifact: str, backend: str, threads: int | None = None,
         profile_shapes: Sequence[Mapping[str, Any]] = (), spinning: bool = False, shared_arena: bool = False, *,
         device_id: int = 0, stream: int | None = None):
    """A session on a built engine directory (the optimised model loads without
    re-running the optimisation passes); GPU backends on device ``device_id`` and
    ``stream`` (see :func:`providers` and :func:`gpu_session`)."""
    ort = import_ort()
    opts = session_options(threads, optimize=backend != "ort-cpu", spinning=spinning,
                           shared_arena=shared_arena and backend == "ort-cpu")
    try:
        if backend != "ort-cpu":
            return gpu_session(directory / artifact, opts, backend, directory, profile_shapes, device_id=device_id,
                               stream=stream)
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
