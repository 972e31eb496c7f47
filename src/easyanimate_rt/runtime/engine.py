"""The Engine protocol (DESIGN.md 4): what the runtime's denoising loop calls, whatever
runs the graph (the torch reference modules, an ONNX Runtime session, a TensorRT plan).

    io_specs()                 -> {"inputs": [TensorSpec...], "outputs": [...]}
    profiles()                 -> the optimisation profiles the engine was built with
    prepare(shapes, cuda_graph=False)   get ready for one set of input shapes
    run(feeds)                 -> {output name: array}, views of engine-owned buffers
    close()
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence

import numpy as np

from ..errors import ShapeError
from ..export.spec import ExportSpec, Profile


def to_host(value: Any) -> np.ndarray:
    """An engine output as a numpy array: itself on the CPU; a device tensor (a GPU
    engine's buffer view) copied back, floating outputs as float32."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach()
        return (value.float() if value.is_floating_point() else value).cpu().numpy()
    return np.asarray(value)


def first_output(engine: "Engine", name: str):
    """feeds -> the engine's output ``name`` as a host array, the engine prepared for the
    feeds' shapes first: what the parity gate runs, through the class generation uses."""

    def run(feeds: Mapping[str, Any]) -> np.ndarray:
        engine.prepare({k: tuple(np.shape(v)) for k, v in feeds.items()})
        return to_host(engine.run(feeds)[name])

    return run


class Engine(Protocol):
    spec: ExportSpec

    def io_specs(self) -> dict[str, Any]: ...

    def covers(self, dims: Mapping[str, int]) -> bool: ...

    def profiles(self) -> Sequence[Profile]: ...

    def prepare(self, shapes: Mapping[str, tuple[int, ...]], cuda_graph: bool = False) -> None: ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def close(self) -> None: ...


class EngineBase:
    """Shared parts: the spec's I/O, profile lookup and input checks."""

    spec: ExportSpec
    _profiles: Sequence[Profile] = ()

    def io_specs(self) -> dict[str, Any]:
        return {"inputs": list(self.spec.inputs), "outputs": list(self.spec.outputs)}

    def profiles(self) -> Sequence[Profile]:
        return tuple(self._profiles) or tuple(self.spec.profiles)

    def covers(self, dims: Mapping[str, int]) -> bool:
        """Whether some profile holds these dimension values (``{"batch": 2, ...}``)."""
        return any(all(lo <= dims[n] <= hi for n, (lo, _, hi) in p.dims.items()) for p in self.profiles())

    def check(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
        """Dimension values of ``shapes``; a ShapeError naming the built shapes when no
        profile holds them."""
        dims = self.spec.dims_of(shapes)
        if self.covers(dims):
            return dims
        built = ", ".join("x".join(str(v[1]) for v in p.dims.values()) for p in self.profiles())
        raise ShapeError(f"{self.spec.key}: shape {dims} is outside every profile this engine was built for "
                         f"({built}); rebuild with those buckets (`easyanimate-rt build --buckets ...`)")

    def prepare(self, shapes: Mapping[str, tuple[int, ...]], cuda_graph: bool = False) -> None:
        self.check(shapes)

    def close(self) -> None:
        pass
