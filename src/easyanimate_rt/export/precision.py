"""Precision policies and the graph pass that applies them (DESIGN.md 4, precision policy).

A policy names a compute dtype for a network and the parts that stay in float32
("islands"). Graphs are always traced in float32; :func:`convert_precision` then
rewrites the ONNX graph: float32 weights and activations outside the islands become
float16 or bfloat16, and a Cast is inserted wherever a value crosses an island
boundary. Graph inputs and outputs stay float32, so every backend feeds and reads the
same dtypes whatever the precision (the casts cost one pass over a small tensor).

Islands are chosen by what the node computes, read from the metadata the dynamo
exporter attaches to every node (module path and module classes):

- op types: LayerNormalization, InstanceNormalization (GroupNorm), Softmax: statistics
  and exponentials overflow or lose precision in 16 bits;
- module classes: LayerNorm, GroupNorm, T5LayerNorm (their whole subgraph);
- module scopes: the timestep MLP (``adaln_single``), whose sinusoidal input spans
  10^4 and feeds every block's modulation;
- ``after`` scopes: everything downstream of the final norm (``norm_out``: final
  modulation, ``proj_out``, unpatchify), so the noise prediction is computed in fp32;
- data-independent subgraphs (position tables computed from shapes), as the reference
  computes them in float32 before casting.

Per network (``policy_for``):

    precision  text_encoder          dit                          vae
    fp32       fp32                  fp32                         fp32
    fp16       fp32 (T5 overflows)   fp16 + islands               fp32
    bf16       bf16 + islands        bf16 + islands               fp32
    fp8        bf16 + islands        fp16 + islands + FP8 Q/DQ    fp32

The VAE stays float32 until a reduced-precision VAE is validated (DESIGN.md 4);
``policy_for(..., vae="bf16")`` opts in.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from ..errors import ConfigError, ExportError

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "bf16", "fp8")
_COMPUTE = ("float32", "float16", "bfloat16")

# Parts of the DiT kept out of FP8 (DESIGN.md 4): embeddings, patch embed, time MLP,
# final projection.
DIT_FP8_EXCLUDE = ("pos_embed", "adaln_single", "caption_projection", "clip_projection", "proj_out")
_NORM_OPS = ("LayerNormalization", "InstanceNormalization", "GroupNormalization", "Softmax")
_NORM_CLASSES = ("LayerNorm", "GroupNorm", "T5LayerNorm")


@dataclass(frozen=True)
class PrecisionPolicy:
    """How one network is lowered. ``name`` is the user-facing precision it came from."""

    name: str = "fp32"
    compute_dtype: str = "float32"
    fp8: bool = False
    fp32_op_types: tuple[str, ...] = ()
    fp32_classes: tuple[str, ...] = ()
    fp32_scopes: tuple[str, ...] = ()
    fp32_after: tuple[str, ...] = ()
    fp32_static: bool = True
    fp8_exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {self.name!r}")
        if self.compute_dtype not in _COMPUTE:
            raise ConfigError(f"compute_dtype must be one of {list(_COMPUTE)}, got {self.compute_dtype!r}")

    @property
    def tolerance(self) -> str:
        """The row of ``tolerances.TOLERANCES`` a graph of this policy is held to against
        the float32 torch reference."""
        if self.fp8:
            return "fp8"
        if self.compute_dtype == "float32":
            return "onnx_fp32"
        return "onnx_bf16" if self.compute_dtype == "bfloat16" else "onnx_fp16"

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PrecisionPolicy":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def policy_for(network: str, precision: str, vae: str | None = None) -> PrecisionPolicy:
    """The policy of ``network`` when the model is exported at ``precision`` (table above)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    islands = dict(fp32_op_types=_NORM_OPS, fp32_classes=_NORM_CLASSES)
    if network in ("dit", "dit_cache"):  # dit_cache: the DiT's head/tail split (step caching)
        if precision == "fp32":
            return PrecisionPolicy(precision)
        compute = "bfloat16" if precision == "bf16" else "float16"
        return PrecisionPolicy(precision, compute, fp8=precision == "fp8", **islands,
                               fp32_scopes=("adaln_single",), fp32_after=("norm_out",),
                               fp8_exclude=DIT_FP8_EXCLUDE if precision == "fp8" else ())
    if network == "text_encoder":
        if precision in ("fp32", "fp16"):
            # T5 overflows in fp16 (DESIGN.md 4): an fp16 export keeps T5 in fp32.
            return PrecisionPolicy(precision)
        return PrecisionPolicy(precision, "bfloat16", **islands)
    if network in ("vae_encoder", "vae_decoder"):
        if vae in (None, "fp32"):
            return PrecisionPolicy(precision)
        if vae != "bf16":
            raise ConfigError(f"the VAE can be exported in fp32 or bf16, got {vae!r}")
        return PrecisionPolicy(precision, "bfloat16", **islands)
    raise ConfigError(f"unknown network {network!r}")


# --- node scopes (dynamo exporter metadata) -------------------------------------------------

#: Exported networks are wrapped in a module whose attribute is ``net``.
WRAPPER_PREFIX = "net."


def node_modules(node) -> list[tuple[str, str]]:
    """(module path, short class name) of every module enclosing ``node``, outermost
    first, the wrapper prefix removed; empty for nodes added after export."""
    props = node.metadata_props
    names = props.get("pkg.torch.onnx.name_scopes")
    classes = props.get("pkg.torch.onnx.class_hierarchy")
    if not names or not classes:
        return []
    try:
        names, classes = ast.literal_eval(names), ast.literal_eval(classes)
    except (ValueError, SyntaxError):
        return []
    out = []
    for name, cls in zip(names[:-1], classes[:-1]):  # the last entry is the aten op
        if name.startswith(WRAPPER_PREFIX):
            name = name[len(WRAPPER_PREFIX):]
        elif name == WRAPPER_PREFIX[:-1]:
            name = ""
        out.append((name, cls.rsplit(".", 1)[-1]))
    return out


def in_scope(module: str, scopes: Iterable[str]) -> bool:
    """Whether module path ``module`` is one of ``scopes`` or inside one."""
    return any(module == s or module.startswith(s + ".") for s in scopes)


def node_module(node) -> tuple[str, str] | None:
    """The innermost (module path, class) of ``node``."""
    mods = node_modules(node)
    return mods[-1] if mods else None


# --- the pass ---------------------------------------------------------------------------------

_QDQ = ("QuantizeLinear", "DequantizeLinear")
#: Initializers above this size are converted lazily (at save time).
LAZY_BYTES = 1 << 20
_SHAPE_OPS = ("Shape", "Size")
# Inputs that keep their type whatever the compute dtype.
_FIXED_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}


def _dtype(name: str):
    import onnx_ir as ir

    return {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16,
            "bfloat16": ir.DataType.BFLOAT16}[name]


def select_fp32_nodes(graph, policy: PrecisionPolicy) -> set:
    """Nodes that compute in float32 under ``policy`` (the islands)."""
    keep = set()
    after_seeds = []
    for node in graph:
        if node.op_type in _QDQ:
            continue
        mods = node_modules(node)
        if node.op_type in policy.fp32_op_types:
            keep.add(node)
        elif any(cls in policy.fp32_classes for _, cls in mods[1:]):
            keep.add(node)
        elif any(in_scope(m, policy.fp32_scopes) for m, _ in mods[1:]):
            keep.add(node)
        if any(in_scope(m, policy.fp32_after) for m, _ in mods[1:]):
            after_seeds.append(node)
    # Everything downstream of an ``after`` scope.
    queue = deque(after_seeds)
    while queue:
        node = queue.popleft()
        keep.add(node)
        for out in node.outputs:
            for user, _ in out.uses():
                if user not in keep:
                    queue.append(user)
    if policy.fp32_static:
        keep |= _static_nodes(graph)
    return keep


def _static_nodes(graph) -> set:
    """Nodes whose float outputs do not depend on input data (only on shapes/weights):
    position tables and the like, computed in fp32 as the reference does."""
    import onnx_ir as ir

    dynamic: set = set(id(v) for v in graph.inputs)
    static = set()
    for node in graph:  # topological order
        if node.op_type in _SHAPE_OPS:
            continue
        if any(v is not None and id(v) in dynamic for v in node.inputs):
            for out in node.outputs:
                dynamic.add(id(out))
        elif node.op_type not in _QDQ and any(o.dtype == ir.DataType.FLOAT for o in node.outputs) \
                and not all(v is None or v.is_initializer() for v in node.inputs):
            static.add(node)
    return static


def convert_precision(model, policy: PrecisionPolicy) -> dict[str, int]:
    """Lower ``model`` (an ``onnx_ir.Model`` traced in float32) to ``policy`` in place.

    Returns counts: nodes kept in fp32, casts inserted, initializers converted.
    """
    import numpy as np
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass, RemoveUnusedNodesPass

    if policy.compute_dtype == "float32":
        return {"fp32_nodes": len(model.graph), "casts": 0, "converted_initializers": 0}
    low = _dtype(policy.compute_dtype)
    FLOAT = ir.DataType.FLOAT
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    graph = model.graph
    if any(out.dtype is None for node in graph for out in node.outputs):
        from onnx_ir.passes.common import ShapeInferencePass

        ShapeInferencePass()(model)  # every float value's dtype must be known
    keep = select_fp32_nodes(graph, policy)
    opset = model.opset_imports.get("", 19)
    unsupported = {n for n in graph if n not in keep and not _schema_allows(n, low, opset)}
    if unsupported:
        log.info("precision %s: %d nodes stay fp32, their ONNX opset-%d schema has no %s (%s)",
                 policy.name, len(unsupported), opset, policy.compute_dtype,
                 ", ".join(sorted({n.op_type for n in unsupported})))
    keep |= unsupported
    nodes = list(graph)

    # 1. Outputs of low-precision nodes become low.
    for node in nodes:
        if node in keep:
            continue
        if node.op_type == "Cast":
            if node.attributes["to"].value == FLOAT:
                node.attributes["to"] = ir.AttrInt64("to", low)
                node.outputs[0].dtype = low
            continue
        if node.op_type == "ConstantOfShape":
            # Without a ``value`` it fills float32 zeros.
            attr = node.attributes.get("value")
            array = attr.value.numpy() if attr is not None else np.zeros((1,), np.float32)
            if array.dtype == np.float32:
                node.attributes["value"] = ir.AttrTensor("value", _convert_array(array, low))
                node.outputs[0].dtype = low
            continue
        for out in node.outputs:
            if out.dtype == FLOAT:
                out.dtype = low

    # 2. Each float input gets the dtype of its consumer's side of the boundary.
    converted: dict[tuple[int, Any], Any] = {}
    stats = {"casts": 0, "converted_initializers": 0}

    def as_dtype(value, dtype):
        key = (id(value), dtype)
        if key in converted:
            return converted[key]
        if value.is_initializer() and value.const_value is not None:
            source = value.const_value
            if source.nbytes > LAZY_BYTES:
                # Converted when the graph is saved, one tensor at a time: a release-size
                # export never holds a second copy of all its weights.
                tensor = ir.LazyTensor(lambda source=source: _convert_array(source.numpy(), dtype),
                                       dtype, source.shape)
            else:
                tensor = _convert_array(source.numpy(), dtype)
            new = ir.Value(name=f"{value.name}__{dtype.name.lower()}", shape=value.shape,
                           type=ir.TensorType(dtype), const_value=tensor)
            graph.register_initializer(new)
            stats["converted_initializers"] += 1
        else:
            cast = ir.Node("", "Cast", [value], [ir.AttrInt64("to", dtype)],
                           name=f"cast_{dtype.name.lower()}_{value.name}")
            new = cast.outputs[0]
            new.name = f"{value.name}__{dtype.name.lower()}"
            new.dtype = dtype
            new.shape = value.shape
            if value.producer() is not None:
                graph.insert_after(value.producer(), cast)
            else:
                graph.insert_before(graph.node(0), cast)
            stats["casts"] += 1
        converted[key] = new
        return new

    for node in nodes:
        want = FLOAT if node in keep else low
        if node.op_type == "Cast":
            continue
        fixed = _FIXED_INPUTS.get(node.op_type, ())
        for i, value in enumerate(list(node.inputs)):
            if value is None or i in fixed or value.dtype not in (FLOAT, low) or value.dtype == want:
                continue
            node.replace_input_with(i, as_dtype(value, want))

    # 3. Graph outputs stay float32.
    for i, out in enumerate(list(graph.outputs)):
        if out.dtype == low:
            cast = ir.Node("", "Cast", [out], [ir.AttrInt64("to", FLOAT)], name=f"cast_output_{out.name}")
            new = cast.outputs[0]
            new.dtype, new.shape = FLOAT, out.shape
            name = out.name
            out.name = f"{name}__{low.name.lower()}"
            new.name = name
            graph.insert_after(out.producer(), cast)
            graph.outputs[i] = new
            stats["casts"] += 1

    RemoveUnusedNodesPass()(model)
    _restore_initializer_names(graph)
    graph.sort()
    stats["fp32_nodes"] = sum(1 for n in graph if n in keep)
    log.info("precision %s (%s): %d nodes kept in fp32, %d casts, %d initializers converted",
             policy.name, policy.compute_dtype, stats["fp32_nodes"], stats["casts"],
             stats["converted_initializers"])
    return stats


def _schema_allows(node, dtype, opset: int) -> bool:
    """Whether the ONNX schema of ``node`` accepts ``dtype`` for its float inputs and
    outputs (e.g. Conv has no bfloat16 before opset 22)."""
    import onnx.defs
    import onnx_ir as ir

    if node.domain not in ("", "ai.onnx") or node.op_type in ("Cast", "CastLike"):
        return True
    try:
        schema = onnx.defs.get_schema(node.op_type, opset)
    except onnx.defs.SchemaError:
        return True
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    want = "tensor(float16)" if dtype == ir.DataType.FLOAT16 else "tensor(bfloat16)"
    for formals, values in ((schema.inputs, node.inputs), (schema.outputs, node.outputs)):
        for i, value in enumerate(values):
            if value is None or value.dtype != ir.DataType.FLOAT or not formals:
                continue
            type_str = formals[min(i, len(formals) - 1)].type_str
            types = allowed.get(type_str, {type_str})
            if want not in types:
                return False
    return True


def _convert_array(array, dtype):
    """A numpy array rounded to ``dtype`` (round to nearest even), as an ir tensor."""
    import ml_dtypes
    import numpy as np
    import onnx_ir as ir

    target = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16,
              ir.DataType.BFLOAT16: ml_dtypes.bfloat16}[dtype]
    array = np.asarray(array)
    if dtype != ir.DataType.FLOAT and array.size:
        limit = float(np.finfo(np.float16).max if dtype == ir.DataType.FLOAT16
                      else ml_dtypes.finfo(ml_dtypes.bfloat16).max)
        # "Minus infinity" sentinels (torch.finfo(float32).min in attention masks) map to
        # the lowest finite value of the target type, as torch does in that dtype.
        sentinel = np.abs(array) >= _SENTINEL
        if sentinel.any():
            array = np.where(sentinel, np.sign(array) * limit, array)
        finite = np.abs(array[np.isfinite(array)])
        if finite.size and finite.max() > limit:
            raise ExportError(f"a constant of magnitude {finite.max():.3g} does not fit "
                              f"{dtype.name.lower()}")
    return ir.tensor(array.astype(target), dtype=dtype)


_SENTINEL = 1e38


def _restore_initializer_names(graph) -> None:
    """``w__float16`` -> ``w`` when the float32 ``w`` is gone, so weights keep the names
    of the parameters they came from."""
    for name in list(graph.initializers):
        base, sep, _ = name.rpartition("__")
        if sep and base and base not in graph.initializers:
            value = graph.initializers.pop(name)
            value.name = base
            graph.initializers[base] = value
