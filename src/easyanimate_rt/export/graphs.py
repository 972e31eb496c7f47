"""The torch side of every exported graph: the function one graph computes, as a module
wrapping the reference network, and the float32 reference outputs for a feed. The
exporter traces these modules; the validation ladder runs them as the reference.

Symbols: B batch, S text tokens, E text width, C latent channels, F frames, H, W size.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

from ..errors import ExportError
from .spec import ExportSpec


class GraphModule(nn.Module):
    """The function one graph computes, as a module whose only child is ``net`` (so node
    scopes read ``net.<module path>``; see ``precision.WRAPPER_PREFIX``)."""

    def __init__(self, net: nn.Module, fn: Callable[..., torch.Tensor]):
        super().__init__()
        self.net = net
        self._fn = fn

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        return self._fn(self.net, *args)


def _text(net, input_ids, attention_mask):
    return net(input_ids, attention_mask)                         # (B, S, E)


def _dit(net, latents, timestep, text, text_mask, *inp):
    # inp: inpaint_latents [, clip_embeds, clip_mask] of an InP model (spec.dit_input_names)
    return net(latents, timestep, text, text_mask, *inp)          # (B, C', F, H, W)


def _grid(x, frames: int, h: int, w: int):
    return x.reshape(-1, frames, h, w, x.shape[-1])              # (B*F, L, D) -> (B, F, h, w, D)


def _dit_head(net, latents, timestep, text, text_mask, *rest):
    # rest: the InP inputs of an InP model, then cached_residual (spec.dit_cache_specs)
    *inp, cached = rest
    x0, ctx = net.embed(latents, timestep, text, text_mask, *inp)
    skips: list = []
    x1 = net.run_blocks(x0, ctx, 0, 1, skips)
    modulated = net.transformer_blocks[0].modulated_input(x0, ctx.t6, ctx.frames)
    f, h, w = ctx.frames, ctx.h, ctx.w
    skip_pred = net.final_layer(x1 + cached.reshape(x1.shape), ctx)
    return (_grid(x1, f, h, w), _grid(x1 - x0, f, h, w), _grid(modulated, f, h, w), skip_pred,
            ctx.t6, ctx.t_emb, ctx.text, ctx.text_bias)


def _dit_tail(net, x1, t6, t_emb, text_proj, text_bias):
    from ..reference.dit import StepContext

    b, f, h, w, d = x1.shape
    ctx = StepContext(t6, t_emb, text_proj, text_bias, f, h, w)
    x1 = x1.reshape(b * f, h * w, d)
    skips = [x1] if net.config.skip_plan[0] > 0 else []          # block 0 is the first skip source
    x = net.run_blocks(x1, ctx, 1, net.config.num_layers, skips)
    return net.final_layer(x, ctx), _grid(x - x1, f, h, w)


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
    if spec.network == "dit_cache":  # step caching's split (spec.dit_cache_specs)
        return GraphModule(model.dit, {"head": _dit_head, "tail": _dit_tail}[spec.variant]).eval()
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
    return outputs_of(spec, module(*args))


def outputs_of(spec: ExportSpec, out) -> dict[str, np.ndarray]:
    """A graph module's output (a tensor, or a tuple for multi-output graphs) by name."""
    outs = out if isinstance(out, tuple) else (out,)
    return {t.name: o.float().cpu().numpy() for t, o in zip(spec.outputs, outs)}


def translation_table() -> dict:
    """Custom translations the dynamo exporter needs for these graphs (see below)."""
    return {torch.ops.aten.repeat_interleave.self_int: _repeat_interleave_self_int}


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

