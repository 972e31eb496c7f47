"""The backend registry: one vocabulary from the command line to the engine cache.

Each backend name pairs the engines/ builder of its engines (``easyanimate-rt build
--backend``) with the runtime's loader in this package, and says where its engines run,
which precisions they take, whether they capture CUDA graphs and what they need
installed. The runtime, ``generate --backend``, per-network choices
(``dit=trt,vae=ort-cuda``) and the engine-directory names all use these names; ``ort``
stays an alias of ``ort-cpu``. A new backend is one entry here plus its engine module.

``auto`` (:func:`choose_auto`): ``trt`` where TensorRT imports and a GPU is visible,
then ``ort-cuda`` (onnxruntime-gpu with a GPU), then ``torch`` on the GPU, then
``ort-cpu``; it says why each better one was skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...engines.manifest import cuda_visible
from ...errors import InputError, MissingDependencyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backend:
    """One backend: where its engines run and what builds and loads them."""

    name: str
    device: str                    # "cpu" or "cuda": where its engines run
    builder: str | None            # the engines/build backend that makes its engines; None: none (torch modules)
    precisions: tuple[str, ...]
    cuda_graphs: bool              # its engines can capture a CUDA graph around their launch
    loader: str                    # "module:function" here: (directory, spec, onnx, **options) -> Engine; "" for
                                   # the torch modules, which run the reference model (no engine directory)
    modules: tuple[str, ...]       # what must import for it to run
    package: str                   # what to install for them
    extra: str                     # the easyanimate-rt extra that installs them ("" for the base install)
    provider: str = ""             # ONNX Runtime execution provider it needs, where it is one

    def load(self, directory: Path, spec, onnx_path: Path | None, **options: Any):
        """This backend's engine for one network of an engine directory."""
        module, _, function = self.loader.partition(":")
        return getattr(importlib.import_module(f"{__name__}.{module}"), function)(directory, spec, onnx_path,
                                                                                   **options)


GPU_PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
REGISTRY: dict[str, Backend] = {b.name: b for b in (
    Backend("ort-cpu", "cpu", "ort-cpu", ("fp32", "fp16"), False, "ort:load_engine", ("onnxruntime",),
            "onnxruntime", ""),
    Backend("ort-cuda", "cuda", "ort-cuda", GPU_PRECISIONS[:3], True, "ort:load_engine", ("onnxruntime",),
            "onnxruntime-gpu in place of onnxruntime", "", provider="CUDAExecutionProvider"),
    Backend("ort-trt", "cuda", "ort-trt", GPU_PRECISIONS[:3], False, "ort:load_engine", ("onnxruntime",),
            "onnxruntime-gpu in place of onnxruntime, and TensorRT", "", provider="TensorrtExecutionProvider"),
    Backend("trt", "cuda", "trt", GPU_PRECISIONS, True, "trt:load_engine", ("tensorrt", "torch"), "tensorrt", "trt"),
    Backend("rtx", "cuda", "rtx", GPU_PRECISIONS, True, "trt:load_engine", ("tensorrt_rtx", "torch"),
            "tensorrt-rtx", "rtx"),
    Backend("torch", "any", None, ("fp32", "fp16", "bf16"), True, "", ("torch",), "torch", ""),
    Backend("torch-compile", "any", None, ("fp32", "fp16", "bf16"), False, "", ("torch",), "torch", ""),
)}
ALIASES = {"ort": "ort-cpu"}
AUTO_ORDER = ("trt", "ort-cuda", "torch", "ort-cpu")
NAMES = tuple(REGISTRY) + tuple(ALIASES)


def backend(name: str) -> Backend:
    """The registry entry of ``name`` (or its alias); an InputError listing the names."""
    entry = REGISTRY.get(ALIASES.get(name, name))
    if entry is None:
        raise InputError(f"backend must be one of {['auto', *NAMES]}, got {name!r}")
    return entry


@dataclass
class Probe:
    """What the machine has, asked lazily (tests pass fakes): a visible CUDA device, an
    importable module, ONNX Runtime's execution providers."""

    gpu: Callable[[], bool]
    importable: Callable[[str], bool]
    providers: Callable[[], list[str]]


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _ort_providers() -> list[str]:
    try:
        import onnxruntime
    except ImportError:
        return []
    return list(onnxruntime.get_available_providers())


MACHINE = Probe(cuda_visible, _importable, _ort_providers)


def missing(entry: Backend, probe: Probe | None = None, device: str | None = None) -> str | None:
    """Why ``entry`` cannot run here (the library, provider or GPU it lacks), else None.
    ``device``: the device the run was asked for (a CPU run takes no GPU backend);
    ``probe``: default :data:`MACHINE`, this machine."""
    probe = probe or MACHINE
    for module in entry.modules:
        if not probe.importable(module):
            return f"{module} is not installed"
    if entry.provider and entry.provider not in probe.providers():
        return f"this onnxruntime has no {entry.provider}"
    if entry.device == "cuda" and (device == "cpu" or not probe.gpu()):
        return "the run is on the CPU (--device cpu, or no CUDA device is visible)"
    return None


def require(entry: Backend, probe: Probe | None = None, device: str | None = None) -> None:
    """A MissingDependencyError (exit 2) naming what ``entry`` lacks and what installs it,
    before any work; a GPU backend without a GPU is an InputError saying so."""
    why = missing(entry, probe, device)
    if why is None:
        return
    if why.startswith("this onnxruntime"):  # onnxruntime-gpu replaces the CPU wheel: no extra can add it
        from ...engines.onnxruntime import require_provider

        require_provider(entry.name)  # raises its MissingProviderError, which says how to swap the wheels
        raise MissingDependencyError(entry.package, "", f"--backend {entry.name} ({why})")  # (a probe's word)
    if why.endswith("installed"):
        raise MissingDependencyError(entry.package, entry.extra, f"--backend {entry.name} ({why})")
    raise InputError(f"backend {entry.name} runs on a CUDA GPU, but {why}; use ort-cpu or torch")


def choose_auto(probe: Probe | None = None, device: str | None = None) -> tuple[Backend, list[str]]:
    """The backend ``auto`` runs, with a line for each better one skipped and why."""
    probe = probe or MACHINE
    skipped = []
    for name in AUTO_ORDER:
        entry = REGISTRY[name]
        if name == "torch" and (device == "cpu" or not probe.gpu()):
            skipped.append("torch: on the CPU ONNX Runtime is faster")  # torch is auto's choice on a GPU only
            continue
        why = missing(entry, probe, device)
        if why is None:
            for line in skipped:
                log.info("backend auto: skipped %s", line)
            return entry, skipped
        skipped.append(f"{name}: {why}")
    raise InputError(f"no backend can run here: {'; '.join(skipped)}")


def gate_runner(staging: Path, spec, onnx_path: Path, builder: str, threads: int | None):
    """engines.build's parity-gate runner on the runtime's own Engine class: the gate
    runs the code generation runs (EngineRunner)."""
    from ..engine import first_output

    entry = backend(builder)
    engine = entry.load(staging, spec, onnx_path, threads=threads, device="cuda" if entry.device == "cuda" else "cpu")
    return first_output(engine, spec.output_names[0])
