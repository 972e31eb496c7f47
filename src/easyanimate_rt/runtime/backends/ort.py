"""ONNX Runtime engines on a built engine directory (``easyanimate-rt build``).

On the CPU (``ort-cpu``) a run hands numpy arrays to ``session.run`` and returns its
numpy arrays. On the CUDA and TensorRT providers (``ort-cuda``, ``ort-trt``) the engine
owns its buffers (DESIGN.md 4): for each prepared shape one set of device tensors,
bound once to an IOBinding; a run copies the feeds into the bound inputs and returns
the bound outputs, views the next run of that shape overwrites.

The buffers are torch CUDA tensors, not ONNX Runtime OrtValues: torch is the runtime's
GPU array library, so feeds that already live on the device (the sampler's latents) are
copied device to device on a stream, and outputs reach the sampler without a DLPack hop
(an OrtValue is filled from numpy only, through the host). ONNX Runtime runs on the
engine's own stream (the provider's ``user_compute_stream``): the copies and the kernels
are ordered on it and the caller's stream waits for it, with no host synchronisation.

CUDA graphs (``ort-cuda``): a session created with ``enable_cuda_graph`` captures one
graph per shape prepared with ``cuda_graph=True`` (RunOptions ``gpu_graph_id`` 1, 2, ...;
its addresses are that shape's bound buffers, which live as long as the engine) and
replays it on later runs; other runs on it pass ``gpu_graph_id=-1``. A session without
CUDA graphs (TensorRT, or a graph ONNX Runtime could not capture) logs one line and runs
eager; so does an engine whose capture fails in a run (DESIGN.md 4), from then on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ...engines import onnxruntime as ortb
from ...engines.build import check_network
from ...engines.manifest import Manifest
from ...export.spec import ExportSpec, Profile
from ..engine import EngineBase

log = logging.getLogger(__name__)


class OrtEngine(EngineBase):
    """One network of an engine directory, checked against its manifest before loading.
    GPU backends run on CUDA device ``device_id``."""

    def __init__(self, directory: str | Path, spec: ExportSpec, onnx_path: str | Path | None = None,
                 threads: int | None = None, spinning: bool = False, shared_arena: bool = False,
                 device_id: int = 0):
        directory = Path(directory)
        backend = Manifest.load(directory).backend
        if backend != "ort-cpu":
            ortb.require_provider(backend)  # a CPU-only onnxruntime: say what to install before any other work
        self.manifest = check_network(directory, onnx_path)
        self.spec = spec
        self._profiles = [Profile(p["name"], {k: tuple(v) for k, v in p["dims"].items()})
                          for p in self.manifest.profiles]
        self.device_id = device_id
        self._device: _CudaBuffers | None = None
        if backend == "ort-cpu":
            self.session = ortb.load(directory, self.manifest.artifact["file"], self.manifest.backend, threads,
                                     spinning=spinning, shared_arena=shared_arena)
            return
        self._device = _CudaBuffers(device_id)
        # TensorRT: the build's profile shapes again, in the graph's input order, or its engine cache would not match
        shapes = ([{t.name: p["shapes"][t.name] for t in spec.inputs} for p in self.manifest.profiles]
                  if backend == "ort-trt" else ())
        self.session = ortb.load(directory, self.manifest.artifact["file"], backend, threads, shapes,
                                 device_id=device_id, stream=self._device.stream)
        provider = self.session.get_providers()[0]
        options = self.session.get_provider_options().get(provider, {})
        # A provider that did not take the stream runs on its own: then each run waits on
        # the host for the copies, and ONNX Runtime synchronises its stream before returning.
        self._shared_stream = options.get("user_compute_stream") == str(self._device.stream)
        self._graph_session = ortb.cuda_graphs(self.session)  # its runs name a graph, or -1
        self._graphs = self._graph_session  # and capturing works (until a capture fails)
        self._names = [t.name for t in spec.inputs]
        self._bound: dict[tuple, _Bound] = {}
        self._graph_ids = itertools.count(1)  # 0 is the session's default graph; ids name one shape each
        self._said_eager = False

    def prepare(self, shapes: Mapping[str, tuple[int, ...]], cuda_graph: bool = False) -> None:
        """Check ``shapes``; on a GPU, allocate and bind this shape's buffers (once) and
        choose its run: replaying a CUDA graph of its own, or eager."""
        dims = self.check(shapes)
        if self._device is None:
            return
        key = tuple(tuple(shapes[name]) for name in self._names)
        bound = self._bound.get(key) or self._bind(key, dims)
        if cuda_graph and not self._graphs and not self._said_eager:
            self._said_eager = True
            log.info("%s: the %s session was not created with CUDA graphs; running eager", self.spec.key,
                     self.session.get_providers()[0])
        bound.replay = cuda_graph and self._graphs
        if bound.replay and bound.graph_id < 0:
            bound.graph_id = next(self._graph_ids)
        bound.run_options = self._run_options(bound.graph_id if bound.replay else -1)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        if self._device is None:
            # Each input in the graph's own dtype (a float CLIP mask for an int64 input, say).
            outs = self.session.run(None, {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype)
                                           for t in self.spec.inputs})
            return dict(zip(self.spec.output_names, outs))
        key = tuple(tuple(np.shape(feeds[name])) for name in self._names)
        bound = self._bound.get(key)
        if bound is None:  # a shape not prepared: bind it now, eager
            self.prepare(dict(zip(self._names, key)))
            bound = self._bound[key]
        self._device.copy_in([(bound.inputs[t.name], feeds[t.name], t.dtype) for t in self.spec.inputs],
                             wait=not self._shared_stream)
        try:
            self.session.run_with_iobinding(bound.binding, bound.run_options)
        except Exception as exc:  # onnxruntime's own exception types
            if not bound.replay:
                raise
            self._capture_failed(exc)
            self.session.run_with_iobinding(bound.binding, bound.run_options)
        self._device.hand_back()
        return dict(bound.outputs)

    def close(self) -> None:
        self._bound = {}  # buffers and bindings go; the session's captured graphs go with the session

    def _bind(self, key: tuple, dims: Mapping[str, int]) -> _Bound:
        """Buffers of one shape, bound once: CUDA graphs read and write these addresses."""
        binding = self.session.io_binding()
        inputs, outputs = {}, {}
        for t, shape in zip(self.spec.inputs, key):
            inputs[t.name] = buf = self._device.empty(shape, t.dtype)
            binding.bind_input(t.name, "cuda", self.device_id, np.dtype(t.dtype).type, list(shape), buf.data_ptr())
        for t, shape in zip(self.spec.outputs, self.spec.output_shapes(dims).values()):
            outputs[t.name] = buf = self._device.empty(shape, t.dtype)
            binding.bind_output(t.name, "cuda", self.device_id, np.dtype(t.dtype).type, list(shape), buf.data_ptr())
        self._bound[key] = bound = _Bound(inputs, outputs, binding)
        return bound

    def _capture_failed(self, exc: Exception) -> None:
        """Every shape eager from now on (the inputs are still in their buffers)."""
        log.warning("%s: CUDA graph capture failed (%s); running eager", self.spec.key,
                    str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
        self._graphs, self._said_eager = False, True
        for bound in self._bound.values():
            bound.replay, bound.run_options = False, self._run_options(-1)

    def _run_options(self, graph_id: int):
        options = ortb.import_ort().RunOptions()
        if self._graph_session:  # -1: neither capture nor replay in this run
            options.add_run_config_entry(ortb.GRAPH_ID, str(graph_id))
        if self._shared_stream:  # the caller's stream waits on the engine's (hand_back), not the host
            options.add_run_config_entry(ortb.NO_SYNC, "1")
        return options


@dataclass
class _Bound:
    """One prepared shape: engine-owned device buffers, their binding, how it runs."""

    inputs: dict[str, Any]
    outputs: dict[str, Any]
    binding: Any
    run_options: Any = None
    graph_id: int = -1  # -1: no CUDA graph of its own yet
    replay: bool = False  # its runs capture, then replay, that graph


class _CudaBuffers:
    """The engine's device memory and stream, in torch (imported here: the CPU path
    never imports it)."""

    def __init__(self, device_id: int):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device_id)
        self._stream = torch.cuda.Stream(self.device)
        self.stream = self._stream.cuda_stream  # cudaStream_t address, for the provider's user_compute_stream

    def empty(self, shape: tuple[int, ...], dtype: str):
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype), device=self.device)

    def copy_in(self, items, wait: bool) -> None:
        """Copy each (buffer, feed, dtype): torch tensors device to device (any dtype,
        converted by the copy), anything else through numpy in the graph's dtype."""
        with self._on_stream(wait):
            for buf, value, dtype in items:
                if not isinstance(value, self.torch.Tensor):
                    value = self.torch.from_numpy(np.ascontiguousarray(value, dtype=dtype))
                buf.copy_(value, non_blocking=True)

    @contextlib.contextmanager
    def _on_stream(self, wait: bool):
        # The feeds were made, and the last outputs may still be read, on the caller's stream.
        self._stream.wait_stream(self.torch.cuda.current_stream(self.device))
        with self.torch.cuda.stream(self._stream):
            yield
        if wait:
            self._stream.synchronize()

    def hand_back(self) -> None:
        """The caller's stream waits for the run (no host synchronisation)."""
        self.torch.cuda.current_stream(self.device).wait_stream(self._stream)


def load_engine(directory, spec: ExportSpec, onnx_path=None, *, threads: int | None = None, device: str = "cpu",
                spinning: bool = False) -> OrtEngine:
    """The registry's loader (runtime/backends): one network of an ONNX Runtime engine
    directory. On the CPU the pipeline's engines share one activation arena."""
    index = int(device.partition(":")[2] or 0) if device.startswith("cuda") else 0
    return OrtEngine(directory, spec, onnx_path, threads, spinning=spinning, shared_arena=device == "cpu",
                     device_id=index)
