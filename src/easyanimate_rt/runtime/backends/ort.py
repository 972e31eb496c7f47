"""ONNX Runtime engines on a built engine directory (``easyanimate-rt build``)."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ...engines import onnxruntime as ortb
from ...engines.build import check_network
from ...export.spec import ExportSpec, Profile
from ..engine import EngineBase


class OrtEngine(EngineBase):
    """One network of an engine directory, checked against its manifest before loading."""

    def __init__(self, directory: str | Path, spec: ExportSpec, onnx_path: str | Path | None = None,
                 threads: int | None = None, spinning: bool = False, shared_arena: bool = False):
        directory = Path(directory)
        self.manifest = check_network(directory, onnx_path)
        self.spec = spec
        self._profiles = [Profile(p["name"], {k: tuple(v) for k, v in p["dims"].items()})
                          for p in self.manifest.profiles]
        self.session = ortb.load(directory, self.manifest.artifact["file"], self.manifest.backend, threads,
                                 spinning=spinning, shared_arena=shared_arena)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Each input in the graph's own dtype (a float CLIP mask for an int64 input, say).
        outs = self.session.run(None, {t.name: np.ascontiguousarray(feeds[t.name], dtype=t.dtype)
                                       for t in self.spec.inputs})
        return dict(zip(self.spec.output_names, outs))
