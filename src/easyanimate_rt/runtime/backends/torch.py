"""The torch backend: the reference modules behind the Engine protocol, on the model's
device and dtype, eager or under ``torch.compile`` (backend ``torch-compile``: inductor,
static shapes; the first call of each shape compiles, later calls reuse the code)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ...export.graphs import graph_module, outputs_of
from ...export.spec import ExportSpec
from ..engine import EngineBase


class TorchEngine(EngineBase):
    """One graph of a reference model, computed by the torch modules. Floating inputs
    are cast to the model's dtype on its device; outputs come back as float32 numpy."""

    def __init__(self, model, spec: ExportSpec, compiled: bool = False):
        self.model = model
        self.spec = spec
        self.module = graph_module(model, spec)
        if compiled:
            import torch

            self.module = torch.compile(self.module, dynamic=False)

    def covers(self, dims) -> bool:  # the reference takes any valid shape
        return True

    def check(self, shapes):
        return self.spec.dims_of(shapes)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        param = next(self.model.dit.parameters())
        args = []
        for t in self.spec.inputs:
            value = torch.as_tensor(np.asarray(feeds[t.name])).to(param.device)
            args.append(value.to(param.dtype) if value.is_floating_point() else value)
        with torch.no_grad():
            out = self.module(*args)
        return outputs_of(self.spec, out)
