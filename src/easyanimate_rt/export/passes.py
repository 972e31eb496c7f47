"""Graph passes run on every exported graph, and graph statistics.

Two representations are used, for memory: the ``onnx_ir`` model the dynamo exporter
returns (its weights are views of the torch parameters, so release-size graphs are
rewritten without copying them) and, for graphs under :data:`PROTO_PASS_LIMIT`, the
ONNX protobuf, where onnx-graphsurgeon folds constants and removes dead nodes and ONNX
shape inference checks every type.

- :func:`set_io_shapes`: graph inputs/outputs named and shaped as the ExportSpec says.
- :func:`cleanup_ir`: dead nodes and initializers removed, topological order.
- :func:`fold_and_cleanup`: graphsurgeon constant folding (Q/DQ nodes are never folded,
  so FP8 weights stay FP8), cleanup, toposort, repeated until nothing changes; then
  strict ONNX shape inference.
- :func:`node_counts`: nodes by op type (reported in spec.json and by the CLI).
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from ..errors import ExportError
from .spec import ExportSpec

log = logging.getLogger(__name__)

#: Protobuf passes and single-file ONNX only below this size (protobuf's 2 GB limit,
#: with room for the graph itself).
PROTO_PASS_LIMIT = 1_800_000_000

_ONNX_DTYPES = {"float32": 1, "int64": 7, "int32": 6, "float16": 10, "bool": 9, "bfloat16": 16}


def set_io_shapes(model, spec: ExportSpec) -> None:
    """Name the symbolic dimensions of the graph inputs and outputs as in ``spec`` and
    check names, ranks and dtypes against it."""
    import onnx_ir as ir

    graph = model.graph
    for values, tensors, what in ((graph.inputs, spec.inputs, "input"), (graph.outputs, spec.outputs, "output")):
        if [v.name for v in values] != [t.name for t in tensors]:
            raise ExportError(f"{spec.key}: graph {what}s {[v.name for v in values]} do not match the "
                              f"spec's {[t.name for t in tensors]}")
        for value, t in zip(values, tensors):
            if value.dtype is not None and int(value.dtype) != _ONNX_DTYPES[t.dtype]:
                raise ExportError(f"{spec.key}: {what} {t.name} has dtype {value.dtype}, spec says {t.dtype}")
            if value.shape is not None and len(value.shape) != len(t.shape):
                raise ExportError(f"{spec.key}: {what} {t.name} has rank {len(value.shape)}, "
                                  f"spec says {len(t.shape)}")
            if value.shape is not None:
                for axis, (have, want) in enumerate(zip(value.shape, t.shape)):
                    if isinstance(want, int) and isinstance(have, int) and have != want:
                        raise ExportError(f"{spec.key}: {what} {t.name} axis {axis} is {have}, "
                                          f"spec says {want}")
            value.shape = ir.Shape([w if isinstance(w, int) else ir.SymbolicDim(w) for w in t.shape])


def optimize_ir(model) -> None:
    """The exporter's own clean-up (``torch.onnx.export(optimize=True)``) without its
    pattern rewriter, in place: inline, constant folding, unused-node removal,
    constants lifted to initializers, deduplication, common subexpressions. The
    rewriter's rules (cast and reshape simplifications) took half of the DiT's export
    time (23 of 42 s for the shipped model) for 11 nodes that ONNX Runtime and
    TensorRT fold at load time anyway; graphsurgeon folds again in ``fold_and_cleanup``."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding as folding

    ir.passes.Sequential(
        common.InlinePass(),
        folding.FoldConstantsPass(shape_inference=True, input_size_limit=folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                                  output_size_limit=folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT),
        common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(), common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
        common.OutputFixPass(), common.NameFixPass(),
    )(model)


def cleanup_ir(model) -> None:
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    RemoveUnusedNodesPass()(model)
    model.graph.sort()


def initializer_bytes(model) -> int:
    total = 0
    for value in model.graph.initializers.values():
        t = value.const_value
        if t is not None:
            total += t.nbytes
    return total


def fold_and_cleanup(proto, max_passes: int = 3):
    """Constant folding + cleanup with onnx-graphsurgeon, then strict shape inference.
    Returns a new ``onnx.ModelProto``."""
    import onnx

    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        from ..errors import MissingDependencyError

        raise MissingDependencyError("onnx-graphsurgeon", "", "graph passes") from None
    gs_logger = gs.logger.G_LOGGER
    old_severity = gs_logger.severity
    gs_logger.severity = gs_logger.ERROR
    try:
        graph = gs.import_onnx(proto)
        before = len(graph.nodes)
        for _ in range(max_passes):
            n = len(graph.nodes)
            graph.fold_constants(should_exclude_node=lambda node: node.op in ("QuantizeLinear", "DequantizeLinear"),
                                 error_ok=True)
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            if len(graph.nodes) == n:
                break
        out = gs.export_onnx(graph, do_type_check=True)
    finally:
        gs_logger.severity = old_severity
    out.ir_version = proto.ir_version
    del out.opset_import[:]
    out.opset_import.extend(proto.opset_import)
    out.producer_name, out.producer_version = proto.producer_name, proto.producer_version
    try:
        out = onnx.shape_inference.infer_shapes(out, check_type=True, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError and friends
        raise ExportError(f"ONNX shape inference rejected the graph: {exc}") from exc
    log.info("graphsurgeon: %d -> %d nodes", before, len(out.graph.node))
    return out


def node_counts(model: Any) -> dict[str, int]:
    """Nodes by op type (``onnx.ModelProto`` or ``onnx_ir.Model``), most frequent first."""
    nodes = model.graph if callable(getattr(model.graph, "node", None)) else model.graph.node
    counts = Counter(n.op_type for n in nodes)
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def format_counts(counts: dict[str, int], width: int = 100) -> str:
    """``Reshape 162, Add 151, ...`` wrapped at ``width``."""
    parts = [f"{op} {n}" for op, n in counts.items()]
    lines, line = [], ""
    for p in parts:
        if line and len(line) + len(p) + 2 > width:
            lines.append(line + ",")
            line = p
        else:
            line = f"{line}, {p}" if line else p
    lines.append(line)
    return "\n".join(lines)
