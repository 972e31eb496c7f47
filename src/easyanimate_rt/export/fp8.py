"""FP8 (E4M3) post-training quantisation of the DiT (DESIGN.md 4, FP8 only through
calibrated Q/DQ).

1. :func:`record_dit_inputs`: the DiT inputs of real denoising steps of the reference
   pipeline (every step of a few prompts, so every timestep range is represented).
2. :func:`calibrate`: per-tensor amax of every quantised Linear's input and weight,
   with NVIDIA ModelOpt's post-training quantisation (``mtq.quantize``, max
   calibration, FP8 E4M3 per-tensor) when ``nvidia-modelopt`` is installed, or the same
   max calibration with forward hooks otherwise (``method="max"``).
3. :func:`insert_fp8_qdq`: the ONNX graph gets QuantizeLinear -> DequantizeLinear
   (float8e4m3fn, scale = amax / 448 (at least 2^-14), zero point 0) on each quantised
   Linear's input,
   and its weight is stored as float8e4m3fn with a DequantizeLinear. This is the
   explicit-quantisation form TensorRT fuses into FP8 GEMMs; ONNX Runtime CPU runs it
   as simulated quantisation.

Quantised: every ``nn.Linear`` of the transformer blocks (attention projections,
feed-forwards, motion modules, U-ViT skips). Kept in higher precision
(``precision.DIT_FP8_EXCLUDE``): the patch embed, the timestep MLP, the caption
projection and the final projection.

Why the Q/DQ graph is written here and not by ModelOpt's ONNX exporter: ModelOpt
exports through the TorchScript exporter with TensorRT-specific custom ops
(``trt::TRT_FP8QuantizeLinear``) that its ``modelopt.onnx`` package then rewrites; that
package pins onnx 1.21 and onnxruntime-gpu, which do not install beside this project's
onnx / onnxruntime (CPU). ModelOpt's calibration (the part that needs the model and
data) runs on CPU and is used as is; the graph rewrite is standard ONNX (opset 19) and
is checked against ModelOpt's own fake quantisation in the tests.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import ExportError, MissingDependencyError
from .precision import DIT_FP8_EXCLUDE, in_scope, node_module
from .spec import dit_input_names

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8e4m3fn
#: Smallest quantisation scale: the smallest normal float16, so a scale survives the
#: fp16 graph (a zero scale, e.g. from an all-zero layer, is rejected by TensorRT and
#: divides by zero in QuantizeLinear). Only tensors with amax < 448 * 2**-14 = 0.027
#: get a coarser grid than amax / 448.
MIN_SCALE = 2.0 ** -14

#: Calibration prompts: the caption style of the synthetic training set, which the
#: small models' tokenizers know; release models take any text.
DEFAULT_PROMPTS = (
    "a red circle moving left on a black background",
    "a small blue square bouncing up and down",
    "a large yellow triangle growing on a white background",
    "in this video a green star is moving right",
)

Amax = dict[str, tuple[float, float]]  # Linear module name -> (input amax, weight amax)


# --- 1. recording real denoising inputs --------------------------------------------------------


@torch.no_grad()
def record_dit_inputs(model, prompts: Sequence[str] = DEFAULT_PROMPTS, *, steps: int | None = None,
                      sampler: str | None = None, height: int | None = None, width: int | None = None,
                      frames: int | None = None, guidance_scale: float | None = None, seed: int = 0
                      ) -> list[dict[str, torch.Tensor]]:
    """The DiT inputs of every denoising step of the reference pipeline, one generation
    per prompt (seed ``seed + i``), batched guidance: a list of feeds with
    ``latents`` (2, C, F, H, W), ``timestep`` (2,) float32, ``text`` (2, S, E) and
    ``text_mask`` (2, S) int64 (and an InP model's ``inpaint_latents``, ``clip_embeds``,
    ``clip_mask``), in step order; the names are ``spec.dit_input_names``."""
    from ..reference.pipeline import ReferencePipeline

    pipe = ReferencePipeline(model)
    names = dit_input_names(model.config)
    records: list[dict[str, torch.Tensor]] = []

    def hook(_module, args, kwargs):
        values = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
        batch = values["latents"].shape[0]
        record = {}
        for name in names:
            v = values[name].detach()
            if name == "timestep":
                v = v.float().reshape(-1).expand(batch)
            record[name] = (v.to(torch.int64) if name.endswith("mask") else v.float()).clone()
        records.append(record)

    handle = model.dit.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, prompt in enumerate(prompts):
            req = pipe.request(prompt, steps=steps, sampler=sampler, height=height, width=width,
                               frames=frames, guidance_scale=guidance_scale, seed=seed + i)
            req.validate(pipe.config)
            emb, mask = pipe.encode_prompt(req.prompt, req.negative_prompt)
            pipe.denoise(req, emb, mask)
    finally:
        handle.remove()
    log.info("recorded %d DiT calls from %d generations", len(records), len(prompts))
    return records


def stack_feeds(records: Sequence[Mapping[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    """Records (same shapes) -> one npz-ready dict with a leading step axis."""
    return {k: np.stack([r[k].numpy() for r in records]) for k in records[0]}


# --- 2. calibration ------------------------------------------------------------------------


def quantized_linears(dit: nn.Module, exclude: Iterable[str] = DIT_FP8_EXCLUDE) -> list[str]:
    """Names of the Linear layers that get FP8 Q/DQ."""
    exclude = tuple(exclude)
    return [name for name, m in dit.named_modules()
            if isinstance(m, nn.Linear) and not in_scope(name, exclude)]


def _max_calibrate(dit: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
                   names: Sequence[str]) -> Amax:
    modules = dict(dit.named_modules())
    seen: dict[str, float] = {n: 0.0 for n in names}
    handles = []
    for name in names:
        def hook(_m, args, name=name):
            seen[name] = max(seen[name], float(args[0].detach().abs().max()))
        handles.append(modules[name].register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for feeds in batches:
                dit(*feeds.values())  # recorded in forward's argument order
    finally:
        for h in handles:
            h.remove()
    return {n: (seen[n], float(modules[n].weight.detach().abs().max())) for n in names}


def modelopt_config(exclude: Iterable[str] = DIT_FP8_EXCLUDE) -> dict[str, Any]:
    """ModelOpt quantisation config: FP8 E4M3 per-tensor on Linear inputs and weights,
    max calibration, excluded scopes off."""
    fp8 = {"num_bits": (4, 3), "axis": None}
    entries: list[dict[str, Any]] = [
        {"quantizer_name": "*", "enable": False},
        {"quantizer_name": "*weight_quantizer", "parent_class": "nn.Linear", "cfg": dict(fp8)},
        {"quantizer_name": "*input_quantizer", "parent_class": "nn.Linear", "cfg": dict(fp8)},
    ]
    for scope in exclude:
        entries.append({"quantizer_name": f"{scope}.*", "enable": False})
    return {"quant_cfg": entries, "algorithm": "max"}


def modelopt_quantize(dit: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
                      exclude: Iterable[str] = DIT_FP8_EXCLUDE) -> nn.Module:
    """A calibrated ModelOpt fake-quantised copy of ``dit`` (the original is untouched)."""
    try:
        with _quiet_modelopt():  # it warns about untested transformers versions on import
            import modelopt.torch.quantization as mtq
    except ImportError:
        raise MissingDependencyError("nvidia-modelopt", "fp8", "FP8 calibration with ModelOpt") from None

    def forward_loop(m):
        for feeds in batches:
            m(*feeds.values())

    quantized = copy.deepcopy(dit).eval()
    with torch.no_grad(), _quiet_modelopt():
        mtq.quantize(quantized, modelopt_config(exclude), forward_loop=forward_loop)
    return quantized


@contextlib.contextmanager
def _quiet_modelopt() -> Iterator[None]:
    import io
    import warnings

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def modelopt_amax(quantized: nn.Module, names: Sequence[str]) -> Amax:
    """(input amax, weight amax) read from ModelOpt's calibrated quantizers."""
    modules = dict(quantized.named_modules())
    out: Amax = {}
    for name in names:
        m = modules[name]
        iq, wq = getattr(m, "input_quantizer", None), getattr(m, "weight_quantizer", None)
        if iq is None or wq is None or iq.amax is None or wq.amax is None:
            raise ExportError(f"ModelOpt did not calibrate {name}")
        out[name] = (float(iq.amax.max()), float(wq.amax.max()))
    return out


def calibrate(dit: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
              exclude: Iterable[str] = DIT_FP8_EXCLUDE, method: str = "auto") -> Amax:
    """Per-tensor amax of each quantised Linear over ``batches``.

    ``method``: ``modelopt`` (NVIDIA ModelOpt PTQ), ``max`` (the same max calibration
    with forward hooks) or ``auto`` (ModelOpt when installed).
    """
    if method not in ("auto", "modelopt", "max"):
        raise ExportError(f"calibration method must be auto, modelopt or max, got {method!r}")
    if not batches:
        raise ExportError("calibration needs at least one recorded batch")
    names = quantized_linears(dit, exclude)
    if method == "auto":
        method = "modelopt" if importlib.util.find_spec("modelopt") is not None else "max"
    if method == "modelopt":
        amax = modelopt_amax(modelopt_quantize(dit, batches, exclude), names)
    else:
        amax = _max_calibrate(dit, batches, names)
    log.info("fp8 calibration (%s): %d layers over %d batches", method, len(amax), len(batches))
    return amax


# --- a torch simulation of the Q/DQ graph --------------------------------------------------


def fp8_scale(amax: float) -> float:
    """The quantisation scale of a tensor with absolute maximum ``amax``."""
    return max(float(amax) / FP8_MAX, MIN_SCALE)


def fake_fp8(x: torch.Tensor, amax: float) -> torch.Tensor:
    """Quantise to float8e4m3fn with scale :func:`fp8_scale` and back (round to nearest
    even, saturating), in float32."""
    scale = fp8_scale(amax)
    q = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return (q.float() * scale).to(x.dtype)


@contextlib.contextmanager
def simulate_fp8(dit: nn.Module, amax: Mapping[str, tuple[float, float]]) -> Iterator[nn.Module]:
    """Run ``dit`` with the FP8 Q/DQ of :func:`insert_fp8_qdq` simulated in torch
    (inputs and weights of the quantised Linears fake-quantised); restores on exit."""
    modules = dict(dit.named_modules())
    saved, handles = {}, []
    try:
        for name, (a_in, a_w) in amax.items():
            m = modules[name]
            saved[name] = m.weight.data
            m.weight.data = fake_fp8(m.weight.data, a_w)
            handles.append(m.register_forward_pre_hook(
                lambda _m, args, a=a_in: (fake_fp8(args[0], a),) + tuple(args[1:])))
        yield dit
    finally:
        for h in handles:
            h.remove()
        for name, w in saved.items():
            modules[name].weight.data = w


# --- 3. the graph rewrite ---------------------------------------------------------------------


def _fp8_weight(weight: np.ndarray, amax: float):
    """float8e4m3fn ``weight`` / scale (round to nearest even, saturating)."""
    t = torch.from_numpy(np.array(weight, dtype=np.float32)) / fp8_scale(amax)  # a writable copy
    return t.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def insert_fp8_qdq(model, amax: Mapping[str, tuple[float, float]],
                   exclude: Iterable[str] = DIT_FP8_EXCLUDE) -> int:
    """Insert FP8 Q/DQ for every MatMul/Gemm that implements a calibrated Linear of
    ``amax`` (found through the exporter's module-scope metadata) in an
    ``onnx_ir.Model`` traced in float32. Returns the number of layers quantised."""
    import ml_dtypes
    import onnx_ir as ir

    exclude = tuple(exclude)
    graph = model.graph
    zero = ir.Value(name="fp8_zero_point", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT8E4M3FN),
                    const_value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn),
                                          dtype=ir.DataType.FLOAT8E4M3FN))
    graph.register_initializer(zero)
    done = set()
    for node in list(graph):
        if node.op_type not in ("MatMul", "Gemm"):
            continue
        mod = node_module(node)
        if mod is None or mod[1] != "Linear" or mod[0] not in amax or in_scope(mod[0], exclude):
            continue
        name = mod[0]
        if name in done:
            raise ExportError(f"fp8: Linear {name} maps to more than one MatMul/Gemm")
        weight = node.inputs[1]
        if weight is None or not weight.is_initializer() or weight.const_value is None:
            raise ExportError(f"fp8: the weight of {name} is not a constant in the graph")
        a_in, a_w = amax[name]
        meta = dict(node.metadata_props)

        def scale_value(suffix: str, a: float, name: str = name):
            v = ir.Value(name=f"{name}.{suffix}", shape=ir.Shape([]), type=ir.TensorType(ir.DataType.FLOAT),
                         const_value=ir.tensor(np.array(fp8_scale(a), dtype=np.float32)))
            graph.register_initializer(v)
            return v

        s_in, s_w = scale_value("input_scale", a_in), scale_value("weight_scale", a_w)
        q = ir.Node("", "QuantizeLinear", [node.inputs[0], s_in, zero], [ir.AttrInt64("saturate", 1)],
                    name=f"{name}.input_quantize", metadata_props=meta)
        dq = ir.Node("", "DequantizeLinear", [q.outputs[0], s_in, zero], name=f"{name}.input_dequantize",
                     metadata_props=dict(meta))
        q.outputs[0].name, dq.outputs[0].name = f"{name}.input_fp8", f"{name}.input_qdq"
        q.outputs[0].dtype, dq.outputs[0].dtype = ir.DataType.FLOAT8E4M3FN, ir.DataType.FLOAT
        q.outputs[0].shape = dq.outputs[0].shape = node.inputs[0].shape
        w8 = _fp8_weight(weight.const_value.numpy(), a_w)
        w_value = ir.Value(name=f"{name}.weight_fp8", shape=ir.Shape(list(w8.shape)),
                           type=ir.TensorType(ir.DataType.FLOAT8E4M3FN),
                           const_value=ir.tensor(w8.view(torch.uint8).numpy().view(ml_dtypes.float8_e4m3fn),
                                                 dtype=ir.DataType.FLOAT8E4M3FN))
        graph.register_initializer(w_value)
        dq_w = ir.Node("", "DequantizeLinear", [w_value, s_w, zero], name=f"{name}.weight_dequantize",
                       metadata_props=dict(meta))
        dq_w.outputs[0].name, dq_w.outputs[0].dtype = f"{name}.weight_qdq", ir.DataType.FLOAT
        dq_w.outputs[0].shape = weight.shape
        graph.insert_before(node, [q, dq, dq_w])
        node.replace_input_with(0, dq.outputs[0])
        node.replace_input_with(1, dq_w.outputs[0])
        done.add(name)
    missing = sorted(set(n for n in amax if not in_scope(n, exclude)) - done)
    if missing:
        raise ExportError(f"fp8: {len(missing)} calibrated Linear layers were not found in the graph, "
                          f"e.g. {missing[:3]}")
    log.info("fp8: Q/DQ on %d Linear layers", len(done))
    return len(done)
