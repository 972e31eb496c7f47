"""easyanimate-rt: a deployment compiler and runtime for EasyAnimate (arXiv 2405.18991).

The public API, imported lazily so that ``import easyanimate_rt`` (and the torch-free
parts: errors, export specs, media) costs nothing until a name is used::

    from easyanimate_rt import Pipeline, ReferencePipeline, load_model
    pipe = Pipeline.from_pretrained("path/to/model")            # the runtime, on engines
    ref = ReferencePipeline.from_pretrained("path/to/model")    # the PyTorch yardstick

Where things live: ``reference`` (the PyTorch model, the definition), ``train``,
``shapes`` (the synthetic world and its evaluation), ``data`` (the data pipeline),
``export`` (ONNX), ``engines`` (TensorRT / ONNX Runtime builds), ``runtime`` (the fast
pipeline), ``validate`` (backends vs the reference).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS = {
    "Pipeline": "easyanimate_rt.runtime.pipeline",
    "Video": "easyanimate_rt.runtime.pipeline",
    "NumericalError": "easyanimate_rt.errors",
    "ReferencePipeline": "easyanimate_rt.reference.pipeline",
    "GenerationRequest": "easyanimate_rt.reference.pipeline",
    "GenerationResult": "easyanimate_rt.reference.pipeline",
    "EasyAnimateModel": "easyanimate_rt.reference.weights",
    "load_model": "easyanimate_rt.reference.weights",
    "load_model_or_preset": "easyanimate_rt.reference.weights",
    "random_model": "easyanimate_rt.reference.weights",
    "save_model": "easyanimate_rt.reference.weights",
    "ModelConfig": "easyanimate_rt.reference.config",
    "PRESETS": "easyanimate_rt.reference.config",
    "from_preset": "easyanimate_rt.reference.config",
    "EasyAnimateError": "easyanimate_rt.errors",
    "ConfigError": "easyanimate_rt.errors",
    "InputError": "easyanimate_rt.errors",
    "ShapeError": "easyanimate_rt.errors",
    "CheckpointError": "easyanimate_rt.errors",
    "ExportError": "easyanimate_rt.errors",
    "EngineError": "easyanimate_rt.errors",
    "MissingDependencyError": "easyanimate_rt.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]

if TYPE_CHECKING:  # for type checkers and editors; at run time __getattr__ imports on first use
    from .errors import (CheckpointError, ConfigError, EasyAnimateError, EngineError,  # noqa: F401
                         ExportError, InputError, MissingDependencyError, NumericalError, ShapeError)
    from .reference.config import PRESETS, ModelConfig, from_preset  # noqa: F401
    from .reference.pipeline import GenerationRequest, GenerationResult, ReferencePipeline  # noqa: F401
    from .reference.weights import (EasyAnimateModel, load_model, load_model_or_preset,  # noqa: F401
                                    random_model, save_model)
    from .runtime.pipeline import Pipeline, Video  # noqa: F401


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'easyanimate_rt' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
