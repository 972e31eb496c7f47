"""A LoRA switch for TensorRT and TensorRT-RTX engines built refittable (issue 27): the
merged weights refitted into the base model's plan instead of a new build.

TensorRT's ONNX parser names a refittable weight after the ONNX initializer it came from,
so the refit needs, per weight the adapters change, the initializer of the exported graph
(the one TensorRT parsed) that holds it: found by content as for the ONNX Runtime swap
(engines/ort_swap.py :func:`initializer_map`: exported Linear weights are stored transposed
under generated names), with the merged value laid out and typed as that initializer.
:func:`refit_values` computes them without TensorRT; :func:`refit_plan` applies them to a
serialized plan with ``trt.Refitter`` (``set_named_weights``, ``refit_cuda_engine``:
TensorRT's documented refit API; it deserializes the plan, so it needs the GPU the plan
was built for). TensorRT documents numerical differences in refittable engines, so a
refitted engine goes through the parity gate like a built one before it is used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import EngineError
from .ort_swap import _as_numpy, _inits, _read_graph, _replacement, initializer_map


def refit_values(onnx_path: str | Path, merged: Mapping[str, Any], base: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """``{initializer name: value}`` to refit: each of ``merged`` (``{param: merged weight}``)
    laid out as the initializer of the exported graph at ``onnx_path`` that holds its
    ``base`` value. A weight found nowhere (or not uniquely) is an EngineError naming it:
    the caller builds the engine instead."""
    slots = initializer_map(onnx_path, base)
    missing = sorted(set(merged) - set(slots))
    if missing:
        raise EngineError(f"{onnx_path}: {len(missing)} weight(s) the LoRA changes are not initializers of the "
                          f"exported graph (e.g. {missing[0]}); the engine cannot be refitted")
    inits = {i.name: i for i in _inits(_read_graph(Path(onnx_path)))}
    return {slots[p][0]: _replacement(slots[p], inits[slots[p][0]], _as_numpy(w)) for p, w in merged.items()}


def refit_plan(trt, plan: bytes, values: Mapping[str, np.ndarray], logger=None) -> bytes:
    """A refittable ``plan`` with ``values`` (``{weight name: array}``) refitted, serialized
    again. Every name must be a refittable weight of the plan; TensorRT must accept them all."""
    logger = logger or trt.Logger(trt.Logger.WARNING)
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineError("the plan could not be deserialized for a refit")
    refitter = trt.Refitter(engine, logger)
    known = set(refitter.get_all_weights())
    unknown = sorted(set(values) - known)
    if unknown:
        raise EngineError(f"the plan has no refittable weight {unknown[0]!r} ({len(unknown)} unknown; was it built "
                          f"with --refit?)")
    kept = []  # TensorRT reads the host arrays during refit_cuda_engine: keep them alive until then
    for name, value in values.items():
        array = np.ascontiguousarray(value)
        kept.append(array)
        if not refitter.set_named_weights(name, trt.Weights(array)):
            raise EngineError(f"TensorRT refused the refit of {name!r} ({array.dtype} {array.shape})")
    missing = list(refitter.get_missing_weights())
    if missing:
        raise EngineError(f"the refit still lacks {len(missing)} weight(s), e.g. {missing[0]!r}")
    if not refitter.refit_cuda_engine():
        raise EngineError("TensorRT could not refit the engine")
    return bytes(engine.serialize())

