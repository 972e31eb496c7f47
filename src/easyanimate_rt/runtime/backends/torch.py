"""The torch backend: the reference modules behind the Engine protocol, on the model's
device and dtype, eager or under ``torch.compile`` (backend ``torch-compile``: inductor,
static shapes; the first call of each shape compiles, later calls reuse the code).

On a CUDA device ``prepare(shapes, cuda_graph=True)`` makes the engine capture its
forward into a CUDA graph on the first run of those shapes (a warm-up run on a side
stream, then capture into persistent input and output buffers); later runs copy the
inputs into those buffers and replay. A capture that fails logs one line and the engine
runs eagerly. Outputs are torch tensors on the model's device: views of the graph's
buffers when graphed, which the next run overwrites (the loop takes its own copy).
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from ...export.graphs import graph_module
from ...export.spec import ExportSpec
from ..engine import EngineBase

log = logging.getLogger(__name__)

#: Inputs that keep float32 whatever the model's dtype: the timestep goes through the
#: sinusoidal embedding in float32 (a bf16 timestep of 999 would read 1000).
FLOAT32_INPUTS = ("timestep",)


class TorchEngine(EngineBase):
    """One graph of a reference model, computed by the torch modules. Floating inputs
    are cast to the model's dtype on its device (but :data:`FLOAT32_INPUTS`)."""

    def __init__(self, model, spec: ExportSpec, compiled: bool = False):
        self.model = model
        self.spec = spec
        self.module = graph_module(model, spec)
        if compiled:
            import torch

            self.module = torch.compile(self.module, dynamic=False)
        param = next(model.dit.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._graph_shapes: set[tuple] = set()   # shapes prepare() asked to graph
        self._graphs: dict[tuple, Any] = {}       # shapes -> (graph, inputs, outputs), or None: eager

    def covers(self, dims) -> bool:  # the reference takes any valid shape
        return True

    def check(self, shapes):
        return self.spec.dims_of(shapes)

    def prepare(self, shapes: Mapping[str, tuple[int, ...]], cuda_graph: bool = False) -> None:
        self.check(shapes)
        if cuda_graph and self.device.type == "cuda":
            self._graph_shapes.add(self._key(shapes))

    def _key(self, shapes: Mapping[str, tuple[int, ...]]) -> tuple:
        return tuple(tuple(shapes[t.name]) for t in self.spec.inputs)

    def _args(self, feeds: Mapping[str, Any]) -> list:
        import torch

        args = []
        for t in self.spec.inputs:
            value = feeds[t.name]
            value = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.asarray(value))
            value = value.to(self.device)
            if value.is_floating_point() and t.name not in FLOAT32_INPUTS:
                value = value.to(self.dtype)
            args.append(value)
        return args

    def _outputs(self, out) -> dict[str, Any]:
        outs = out if isinstance(out, tuple) else (out,)
        return {t.name: o for t, o in zip(self.spec.outputs, outs)}

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        import torch

        args = self._args(feeds)
        key = tuple(tuple(a.shape) for a in args)
        if key in self._graph_shapes:
            if key not in self._graphs:
                self._graphs[key] = self._capture(args)
            captured = self._graphs[key]
            if captured is not None:
                graph, inputs, outputs = captured
                for buf, a in zip(inputs, args):
                    buf.copy_(a)
                graph.replay()
                return self._outputs(outputs)
        with torch.no_grad():
            return self._outputs(self.module(*args))

    def _capture(self, args: list):
        """(graph, input buffers, output buffers) of the forward at these shapes, or None
        with one log line when capture fails."""
        import torch

        inputs = [a.clone() for a in args]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.no_grad(), torch.cuda.stream(stream):
                self.module(*inputs)  # warm-up: lazy buffers, cuBLAS handles, kernel selection
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.no_grad(), torch.cuda.graph(graph):
                outputs = self.module(*inputs)
        except Exception as exc:  # capture is an optimisation: never a failed generation
            log.warning("%s: CUDA graph capture failed (%s: %s); running eagerly", self.spec.key,
                        type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        return graph, inputs, outputs if isinstance(outputs, tuple) else (outputs,)

    def close(self) -> None:
        self._graphs.clear()
