"""The torch backend: the reference modules behind the Engine protocol (eager)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from ...export.graphs import run_torch
from ...export.spec import ExportSpec
from ..engine import EngineBase


class TorchEngine(EngineBase):
    """One graph of a reference model, computed by the torch modules (float32)."""

    def __init__(self, model, spec: ExportSpec):
        self.model = model
        self.spec = spec

    def covers(self, dims) -> bool:  # the reference takes any valid shape
        return True

    def check(self, shapes):
        return self.spec.dims_of(shapes)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return run_torch(self.model, self.spec, feeds)
