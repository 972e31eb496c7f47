"""Datacenter TensorRT (the ``tensorrt`` module, GPU only): the one place that turns an
exported graph into a TensorRT engine. Strongly typed networks parsed from the ONNX
file, one optimisation profile per ``ExportSpec`` profile, through polygraphy's
loaders. ``tensorrt`` and polygraphy are imported lazily; neither is needed to import
this module.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import MissingDependencyError


def has_tensorrt_gpu() -> bool:
    """Whether ``tensorrt`` imports and a CUDA device is visible (TensorRT runs there)."""
    try:
        import tensorrt  # noqa: F401
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


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
