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
import functools
import hashlib
import io
import json
import logging
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, MissingDependencyError
from ..reference.io import atomic_write_text, replace_dir
from .passes import (PROTO_PASS_LIMIT, cleanup_ir, fold_and_cleanup, initializer_bytes, node_counts,
                     set_io_shapes)
from .precision import WRAPPER_PREFIX, convert_precision
from .spec import INPUTS_NAME, MODEL_NAME, ExportSpec, make_specs

log = logging.getLogger(__name__)

INDEX_NAME = "export.json"
INDEX_FORMAT = 1


def _require_onnx() -> None:
    for module, package in (("onnx", "onnx"), ("onnxscript", "onnxscript"), ("onnx_ir", "onnxscript")):
        try:
            __import__(module)
        except ImportError:
            raise MissingDependencyError(package, "export", "ONNX export") from None


# --- the torch side of a graph ------------------------------------------------------------


class GraphModule(nn.Module):
    """The function one graph computes, as a module whose only child is ``net`` (so node
    scopes read ``net.<module path>``; see ``precision.WRAPPER_PREFIX``)."""

    def __init__(self, net: nn.Module, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.net = net
        self._fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self._fn(self.net, *args)


def _text(net, input_ids, attention_mask):
    return net(input_ids, attention_mask)                         # (B, S, E)


def _dit(net, latents, timestep, text, text_mask):
    return net(latents, timestep, text, text_mask)                # (B, C', F, H, W)


def _encode(net, frames):
    return net.encode_slice(frames)                               # (B, 4, T', H/8, W/8)


def _decode(net, context, start: int, length: int):
    return net.decode_slice(context, start, length)               # (B, 3, F, 8h, 8w)


def graph_module(model, spec: ExportSpec) -> GraphModule:
    """The torch module computing ``spec``'s graph from a reference ``EasyAnimateModel``."""
    if spec.network == "text_encoder":
        return GraphModule(model.text_encoder, _text).eval()
    if spec.network == "dit":
        return GraphModule(model.dit, _dit).eval()
    if spec.network == "vae_encoder":
        return GraphModule(model.vae, _encode).eval()
    if spec.network == "vae_decoder":
        fn = functools.partial(_decode, start=spec.static["start"], length=spec.static["length"])
        return GraphModule(model.vae, fn).eval()
    raise ExportError(f"unknown network {spec.network!r}")


@torch.no_grad()
def run_torch(model, spec: ExportSpec, feeds: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The reference outputs of ``spec``'s graph for ``feeds`` (numpy or torch), float32."""
    module = graph_module(model, spec)
    args = [torch.as_tensor(np.asarray(feeds[t.name])) for t in spec.inputs]
    out = module(*args)
    return {spec.outputs[0].name: out.float().cpu().numpy()}


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


# --- the exporter's translation of repeat_interleave -----------------------------------------


def _repeat_interleave_self_int(self, repeats, dim=None, output_size=None):
    """``aten.repeat_interleave.self_int`` with a correct symbolic ``repeats``.

    onnxscript's torchlib (0.7) builds the Expand shape as [1]*dim + [r] + [1]*(rank-dim)
    where the repeated axis is dim+1, which is wrong unless B or F is 1; this DiT
    repeats per-sample modulation over frames with a dynamic F. Unsqueeze after the
    repeated axis, expand it to r, merge.
    """
    from onnxscript import opset18 as op

    if dim is None:
        self = op.Reshape(self, op.Constant(value_ints=[-1]))
        dim, rank = 0, 1
    else:
        rank = len(self.shape)
    pos = dim % rank
    unsqueezed = op.Unsqueeze(self, op.Constant(value_ints=[pos + 1]))
    if isinstance(repeats, int):
        tiles = [1] * (rank + 1)
        tiles[pos + 1] = repeats
        expand_shape = op.Constant(value_ints=tiles)
    else:
        parts = [op.Constant(value_ints=[1] * (pos + 1)), op.Reshape(repeats, op.Constant(value_ints=[-1]))]
        if rank - pos - 1:
            parts.append(op.Constant(value_ints=[1] * (rank - pos - 1)))
        expand_shape = op.Concat(*parts, axis=0)
    tiled = op.Expand(unsqueezed, expand_shape)
    parts = [op.Constant(value_ints=[-1])]
    if pos:
        parts.insert(0, op.Shape(self, start=0, end=pos))
    if pos + 1 < rank:
        parts.append(op.Shape(self, start=pos + 1))
    final = op.Concat(*parts, axis=0) if len(parts) > 1 else parts[0]
    return op.Reshape(tiled, final)


def translation_table() -> dict:
    return {torch.ops.aten.repeat_interleave.self_int: _repeat_interleave_self_int}


# --- trace / lower / write ---------------------------------------------------------------------


def _dynamic_shapes(spec: ExportSpec) -> tuple[dict[int, Any], ...]:
    """torch.export dimensions for the inputs (``GraphModule.forward(*args)`` takes them
    as one varargs tuple); a dimension with a multiple m is m * Dim."""
    from torch.export import Dim

    made: dict[str, Any] = {}

    def dim(name: str):
        if name not in made:
            d = spec.dim(name)
            if d.multiple > 1:
                made[name] = d.multiple * Dim(f"{name}_div{d.multiple}", min=d.min // d.multiple,
                                              max=d.max // d.multiple)
            else:
                made[name] = Dim(name, min=d.min, max=d.max)
        return made[name]

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
                optimize=True, verbose=False, report=False)
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


def copy_ir(ir_model):
    """A deep copy of a (small) ``onnx_ir.Model``, e.g. to lower one trace several ways."""
    import onnx_ir as ir

    return ir.from_proto(ir.to_proto(ir_model))


def _sha256(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


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
    tmp = directory.with_name(f".{directory.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
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
            "bytes": sum(f.stat().st_size for f in files), "sha256": _sha256(files),
            "nodes": sum(counts.values()), "nodes_by_op": counts,
            "passes": dict(stats or {}), "versions": _versions(),
        }
        spec = spec.replace(graph=graph)
        spec.save(tmp)
        feeds = dict(inputs if inputs is not None else spec.sample_inputs())
        np.savez(tmp / INPUTS_NAME, **feeds)
        for name, extra in (extra_inputs or {}).items():
            np.savez(tmp / f"{name}.npz", **extra)
        replace_dir(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
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


@dataclass
class ExportIndex:
    """What an export directory holds: ``export.json`` plus every graph's spec."""

    root: Path
    model: str
    source: str | None
    seed: int
    precision: str
    specs: dict[str, ExportSpec]
    config: dict[str, Any]

    def spec(self, network: str, variant: str = "") -> ExportSpec:
        key = f"{network}/{variant}" if variant else network
        if key not in self.specs:
            raise ExportError(f"{self.root} has no graph {key!r}; it has {sorted(self.specs)}")
        return self.specs[key]

    def path(self, key: str) -> Path:
        return self.root / key / MODEL_NAME


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
    out_dir = Path(out_dir)
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
    for spec in specs:
        if progress:
            progress(spec.key)
        extra = recorded if spec.precision.fp8 else None
        written[spec.key] = export_graph(model, spec, out_dir, amax, extra_inputs=extra)
    index = {
        "format": INDEX_FORMAT, "model": model.config.name, "source": source, "seed": seed,
        "precision": precision,
        "graphs": sorted(written), "config": model.config.to_dict(), "versions": _versions(),
    }
    old = _read_index(out_dir) if (out_dir / INDEX_NAME).exists() else None
    if old and old.get("precision") == precision and old.get("model") == model.config.name:
        index["graphs"] = sorted(set(old.get("graphs", [])) | set(written))
    atomic_write_text(out_dir / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return load_export(out_dir)


def _read_index(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / INDEX_NAME).read_text())
    except FileNotFoundError:
        raise ExportError(f"{root} is not an export directory (no {INDEX_NAME})") from None
    if data.get("format") != INDEX_FORMAT:
        raise ExportError(f"{root / INDEX_NAME}: unsupported format {data.get('format')!r}")
    return data


def load_export(root: str | Path) -> ExportIndex:
    """Read ``export.json`` and the spec of every graph it lists."""
    root = Path(root)
    data = _read_index(root)
    specs = {key: ExportSpec.load(root / key) for key in data["graphs"]}
    return ExportIndex(root, data["model"], data.get("source"), int(data.get("seed", 0)), data["precision"],
                       specs, data["config"])


def onnx_path_size(path: str | Path) -> int:
    path = Path(path)
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


__all__ = ["GraphModule", "graph_module", "run_torch", "trace", "lower", "copy_ir", "write_graph",
           "export_graph", "export_model", "load_export", "ExportIndex", "translation_table",
           "INDEX_NAME"]
