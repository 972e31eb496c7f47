"""Reference networks -> ONNX with the dynamo exporter, and export directories.

Each graph is traced once in float32 (:func:`trace`), lowered to its precision policy
(:func:`lower`: FP8 Q/DQ, then fp16/bf16 with fp32 islands) and written with its
spec (:func:`write_graph`). :func:`export_model` does this for every graph of a model:

    DIR/export.json                       index: model, precision, graphs, versions
    DIR/text_encoder/{model.onnx,spec.json,inputs.npz}
    DIR/dit/...
    DIR/vae_encoder/{image,slice}/...
    DIR/vae_decoder/{interior,first,last,single,lone}/...

Every graph directory is assembled under a temporary name and renamed into place, and
``export.json`` is written last, so an interrupted export never looks complete.
``model.onnx`` keeps its weights inside below 1.8 GB and in ``model.onnx.data``
(ONNX external data) above, as protobuf cannot hold more than 2 GB.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch

from ..errors import ExportError, MissingDependencyError
from ..fileio import claim_dir, mark_dir, sha256_files, staged_dir
from .graphs import graph_module, translation_table
from .index import INDEX_NAME, ExportIndex, load_export, write_index
from .passes import (PROTO_PASS_LIMIT, cleanup_ir, fold_and_cleanup, initializer_bytes, node_counts, optimize_ir,
                     set_io_shapes)
from .precision import WRAPPER_PREFIX, convert_precision
from .spec import INPUTS_NAME, MODEL_NAME, ExportSpec, make_specs

log = logging.getLogger(__name__)

def _require_onnx() -> None:
    for module, package in (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnx_ir", "onnxscript")):
        try:
            __import__(module)
        except ImportError:
            raise MissingDependencyError(package, "", "ONNX export") from None


@contextlib.contextmanager
def _export_context(model, spec: ExportSpec) -> Iterator[None]:
    """T5 is traced with eager attention: transformers' SDPA path reshapes a transposed
    tensor, which torch.export cannot decompose with a dynamic batch."""
    if spec.network != "text_encoder":
        yield
        return
    t5 = model.text_encoder.model
    old = t5.config._attn_implementation
    t5.set_attn_implementation("eager")
    try:
        yield
    finally:
        t5.set_attn_implementation(old)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The dynamo exporter prints progress to stdout and warns about things that do not
    concern these graphs (torchvision ops, axis renaming); library code only logs."""
    buffer = io.StringIO()
    noisy = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buffer), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        noisy.setLevel(level)
    for line in buffer.getvalue().splitlines():
        if line.strip():
            log.debug("%s", line)


# --- trace / lower / write ---------------------------------------------------------------------


def _dynamic_shapes(spec: ExportSpec) -> tuple[dict[int, Any], ...]:
    """torch.export dimensions for the inputs (``GraphModule.forward(*args)`` takes them
    as one varargs tuple); a dimension with a multiple m is m * Dim, and an input entry
    ``name/k`` (or ``k*name``) is the same Dim times m / k (times k m): derived, not new."""
    from torch.export import Dim

    from .spec import _EXPR

    symbols: dict[str, tuple[Any, int]] = {}  # name -> (Dim, multiple)

    def dim(entry: str):
        mul, name, div = _EXPR.match(entry).groups()  # type: ignore[union-attr]
        if name not in symbols:
            d = spec.dim(name)
            m = d.multiple
            symbols[name] = (Dim(f"{name}_div{m}" if m > 1 else name, min=d.min // m, max=d.max // m), m)
        sym, m = symbols[name]
        factor, rest = divmod(m * int(mul or 1), int(div or 1))
        if rest or factor < 1:
            raise ExportError(f"{spec.key}: input dimension {entry!r} is not a whole multiple of {name}'s "
                              f"multiple {m}")
        return sym if factor == 1 else factor * sym

    return tuple({axis: dim(e) for axis, e in enumerate(t.shape) if isinstance(e, str)}
                 for t in spec.inputs)


def trace(model, spec: ExportSpec):
    """Trace ``spec``'s graph in float32 with the dynamo exporter; an ``onnx_ir.Model``."""
    _require_onnx()
    module = graph_module(model, spec)
    for p in module.parameters():
        if p.dtype != torch.float32:
            raise ExportError(f"{spec.key}: export traces float32 weights, got {p.dtype}; "
                              f"precision is applied to the graph afterwards")
    args = tuple(torch.from_numpy(v) for v in spec.sample_inputs().values())
    t0 = time.perf_counter()
    try:
        with _export_context(model, spec), torch.no_grad(), _quiet():
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=spec.opset,
                input_names=spec.input_names, output_names=spec.output_names,
                dynamic_shapes=(_dynamic_shapes(spec),), custom_translation_table=translation_table(),
                optimize=False, verbose=False, report=False)
            optimize_ir(program.model)
    except Exception as exc:
        raise ExportError(f"{spec.key}: torch.onnx.export failed: {type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    ir_model = program.model
    del program
    # Weights keep their checkpoint names (``transformer_blocks.0.attn1.to_q.bias``).
    graph = ir_model.graph
    for name in [n for n in graph.initializers if n.startswith(WRAPPER_PREFIX)]:
        short = name[len(WRAPPER_PREFIX):]
        if short not in graph.initializers:
            value = graph.initializers.pop(name)
            value.name = short
            graph.initializers[short] = value
    set_io_shapes(ir_model, spec)
    ir_model.producer_name, ir_model.producer_version = "easyanimate-rt", _version()
    log.info("%s: traced %d nodes in %.1fs", spec.key, len(ir_model.graph), time.perf_counter() - t0)
    return ir_model


def lower(ir_model, spec: ExportSpec, amax: Mapping[str, tuple[float, float]] | None = None) -> dict[str, int]:
    """Apply ``spec.precision`` in place: FP8 Q/DQ (needs calibrated ``amax``), then the
    compute dtype with its fp32 islands. Returns pass statistics."""
    stats: dict[str, int] = {}
    if spec.precision.fp8:
        from .fp8 import insert_fp8_qdq

        if amax is None:
            raise ExportError(f"{spec.key}: an fp8 export needs calibration (amax per layer)")
        stats["fp8_layers"] = insert_fp8_qdq(ir_model, amax, spec.precision.fp8_exclude)
    stats.update(convert_precision(ir_model, spec.precision))
    cleanup_ir(ir_model)
    set_io_shapes(ir_model, spec)
    return stats


def _versions() -> dict[str, str]:
    import onnx
    import onnxscript

    return {"easyanimate_rt": _version(), "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__}


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("easyanimate-rt")
    except Exception:
        return "0+unknown"


def write_graph(ir_model, spec: ExportSpec, directory: str | Path,
                inputs: Mapping[str, np.ndarray] | None = None, stats: Mapping[str, int] | None = None,
                extra_inputs: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> ExportSpec:
    """Run the graph passes and write ``directory``/{model.onnx, spec.json, inputs.npz}
    atomically. ``extra_inputs`` are more saved inputs (``name`` -> feeds, written as
    ``name.npz``; arrays may carry a leading iteration axis). Returns the spec with its
    ``graph`` section (file, hash, node counts)."""
    import onnx
    import onnx_ir as ir

    directory = Path(directory)
    with staged_dir(directory) as tmp:
        path = tmp / MODEL_NAME
        size = initializer_bytes(ir_model)
        external = None
        if size < PROTO_PASS_LIMIT:
            proto = fold_and_cleanup(ir.to_proto(ir_model))
            onnx.checker.check_model(proto)
            onnx.save(proto, path)
            counts = node_counts(proto)
            del proto
        else:
            # Release sizes: rewrite nothing more, stream weights into external data.
            cleanup_ir(ir_model)
            external = MODEL_NAME + ".data"
            ir.save(ir_model, path, external_data=external)
            onnx.checker.check_model(str(path))
            counts = node_counts(ir_model)
        files = [path] + ([tmp / external] if external else [])
        graph = {
            "file": MODEL_NAME, "external_data": external,
            "bytes": sum(f.stat().st_size for f in files), "sha256": sha256_files(files),
            "nodes": sum(counts.values()), "nodes_by_op": counts,
            "passes": dict(stats or {}), "versions": _versions(),
        }
        spec = spec.replace(graph=graph)
        spec.save(tmp)
        feeds = dict(inputs if inputs is not None else spec.sample_inputs())
        np.savez(tmp / INPUTS_NAME, **feeds)
        for name, extra in (extra_inputs or {}).items():
            np.savez(tmp / f"{name}.npz", **extra)
    log.info("%s: wrote %s (%d nodes, %.1f MB)", spec.key, directory, graph["nodes"], graph["bytes"] / 1e6)
    return spec


def export_graph(model, spec: ExportSpec, out_dir: str | Path,
                 amax: Mapping[str, tuple[float, float]] | None = None,
                 extra_inputs: Mapping[str, Mapping[str, np.ndarray]] | None = None) -> ExportSpec:
    """Trace, lower and write one graph under ``out_dir / spec.key``."""
    ir_model = trace(model, spec)
    stats = lower(ir_model, spec, amax)
    return write_graph(ir_model, spec, Path(out_dir) / spec.key, stats=stats, extra_inputs=extra_inputs)


# --- whole models ----------------------------------------------------------------------------


def export_model(model, out_dir: str | Path, precision: str = "fp32", networks: Iterable[str] | None = None,
                 *, source: str | None = None, seed: int = 0, vae_precision: str | None = None,
                 calibration: Mapping[str, Any] | None = None,
                 progress: Callable[[str], None] | None = None) -> ExportIndex:
    """Export the graphs of ``networks`` (default all) of a reference model at ``precision``.

    ``source`` (a model directory, or a preset name whose random weights came from
    ``seed``) is recorded so ``verify`` can rebuild the reference. An fp8 export
    calibrates the DiT first on inputs recorded from real denoising steps
    (``calibration``: ``fp8.record_dit_inputs`` options such as ``prompts`` and
    ``steps``, and ``method``), saved as ``dit/calibration.npz``.
    """
    from .precision import policy_for

    _require_onnx()
    out_dir = claim_dir(out_dir, (INDEX_NAME,), "export directory")  # never into a folder of the user's
    model.eval()
    specs = make_specs(model.config, precision, networks)
    if vae_precision is not None:
        specs = [s.replace(precision=policy_for(s.network, precision, vae=vae_precision))
                 if s.network.startswith("vae") else s for s in specs]
    amax, recorded = None, None
    if any(s.precision.fp8 for s in specs):
        from . import fp8

        if progress:
            progress("calibrating dit (fp8)")
        options = dict(calibration or {})
        method = options.pop("method", "auto")
        batches = fp8.record_dit_inputs(model, **options)
        amax = fp8.calibrate(model.dit, batches, method=method)
        # The recorded steps are kept beside the graph: `verify` checks them too.
        recorded = {"calibration": fp8.stack_feeds(batches)}
    written: dict[str, ExportSpec] = {}
    mark_dir(out_dir, "export directory")
    for spec in specs:
        if progress:
            progress(spec.key)
        extra = recorded if spec.precision.fp8 else None
        written[spec.key] = export_graph(model, spec, out_dir, amax, extra_inputs=extra)
    write_index(out_dir, model=model.config.name, source=source, seed=seed, precision=precision,
                graphs=written, config=model.config.to_dict(), versions=_versions())
    return load_export(out_dir)


__all__ = ["trace", "lower", "write_graph", "export_graph", "export_model"]
