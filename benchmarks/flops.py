"""Analytic FLOP model of the video DiT and the Slice VAE decoder.

    python benchmarks/flops.py                      # every preset at its sampling defaults
    python benchmarks/flops.py --preset v3-512 --height 384 --width 672 --frames 144

The counts come from a config and the shapes alone, by formulas; nothing is built, hooked
or traced. They follow the convention of ``torch.utils.flop_counter.FlopCounterMode``:
2 x multiply-accumulates of matrix products, convolutions and attention (Q K^T and
attention x V), and nothing else: norms, activations, softmax, biases, position tables,
modulation and resampling are free. ``tests/benchmarks/test_flops.py`` holds the model
to FlopCounterMode run on the reference modules.

What is modelled is what the reference code computes (``reference/dit.py``,
``reference/vae.py``), which the exported graphs and so the engines compute too:
- ``dit_flops``: one ``VideoDiT.forward`` call (one denoising step for a batch; batched
  classifier-free guidance is batch 2), split into the parts of ``DIT_PARTS``;
- ``vae_slice_decode_flops``: one ``SliceVAE.decode_slice`` call, which is one run of a
  ``vae_decoder/<variant>`` engine (``export/spec.py``);
- ``vae_decode_flops``: every slice of a video's decode, as ``SliceVAE.iter_decode`` and
  the runtime's ``Pipeline.iter_frames`` run them (untiled).

Symbols: B batch, F latent frames, h, w token grid (latent H / P, W / P), L = h*w
tokens per frame, N = F*L tokens per sample, D hidden size, S text tokens (T5 tokens
plus the CLIP tokens of an InP model), E caption channels, s Grid Reshape block.
"""

from __future__ import annotations

import argparse
import sys

from easyanimate_rt.reference.config import PRESETS, DiTConfig, VAEConfig, from_preset

#: Width of the sinusoidal timestep features (``dit.timestep_embedding``'s default).
TIMESTEP_FREQ_DIM = 256
#: Expansion of the motion module's GEGLU feed-forward (``dit.FeedForward``'s default).
MOTION_FF_MULT = 4
#: Keys of :func:`dit_flops` that add up to ``"total"``.
DIT_PARTS = ("spatial_attention", "motion_module", "cross_attention", "mlp", "other")
#: Keys of :func:`vae_slice_decode_parts` that add up to ``"total"``.
VAE_PARTS = ("conv_in", "mid_resblocks", "mid_attention", "up_blocks", "conv_out")


def _linear(rows: int, fan_in: int, fan_out: int) -> float:
    return 2.0 * rows * fan_in * fan_out


def _attention(sequences: int, q_len: int, k_len: int, width: int) -> float:
    """Q K^T and attention x V for ``sequences`` independent sequences; ``width`` is the
    summed width of all heads, so the head count drops out."""
    return 4.0 * sequences * q_len * k_len * width


def _conv(outputs: int, c_in: int, c_out: int, kernel: int) -> float:
    """``outputs`` output positions (batch included), ``kernel`` taps (prod of its sizes)."""
    return 2.0 * outputs * c_in * c_out * kernel


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


# --- DiT ---------------------------------------------------------------------------------

def dit_tokens(config: DiTConfig, frames: int, height: int, width: int) -> int:
    """Tokens of one sample, N = F * (H / P) * (W / P), for latent sizes F, H, W."""
    _check_positive(frames=frames, height=height, width=width)
    mult = config.latent_multiple
    for name, size in (("height", height), ("width", width)):
        if size % mult:
            raise ValueError(f"latent {name} must be a multiple of {mult}, got {size}")
    p = config.patch_size
    return frames * (height // p) * (width // p)


def dit_flops(config: DiTConfig, batch: int, frames: int, height: int, width: int,
              text_len: int) -> dict[str, float]:
    """FLOPs of one ``VideoDiT.forward`` on (batch, C, frames, height, width) latents and
    ``text_len`` T5 tokens, by part:

    - ``spatial_attention``: every block's ``attn1``, q/k/v/out projections and the
      scores and attention x V of each frame's L tokens over themselves;
    - ``motion_module``: every block's motion module but its feed-forward: ``proj_in``,
      ``proj_out``, and both attentions' q/k/v/out projections and scores. Temporal
      attention runs over sequences of F*s^2 tokens (one per s x s Grid Reshape
      neighbourhood, B*L/s^2 of them); in the odd blocks of a hybrid model the second
      attention runs over all N tokens of the clip instead;
    - ``cross_attention``: every block's ``attn2``: q/out projections of the N clip
      tokens, k/v projections of the S text tokens (``text_len`` plus ``clip_tokens``
      for a model with a CLIP projection), scores and attention x V of N queries over S
      keys;
    - ``mlp``: every feed-forward: the block's tanh-GELU one (D -> mlp_ratio*D -> D) and
      the motion module's GEGLU one (D -> 2*4D, gate, 4D -> D);
    - ``other``: patch embedding, timestep MLP and AdaLN-single linear, caption
      projection, CLIP projection (InP), U-ViT skip linears, final projection.

    ``total`` is their sum and ``tokens`` is N (not a FLOP count, not in the total).
    Sizes are latent sizes; height and width must be multiples of
    ``config.latent_multiple``.
    """
    _check_positive(batch=batch, text_len=text_len)
    n = dit_tokens(config, frames, height, width)
    d, p = config.hidden_size, config.patch_size
    l = n // frames
    rows = batch * n                                       # token rows of every linear
    keys = text_len + (config.clip_tokens if config.clip_channels else 0)

    spatial = 4 * _linear(rows, d, d) + _attention(batch * frames, l, l, d)
    cross = 2 * _linear(rows, d, d) + 2 * _linear(batch * keys, d, d) + _attention(batch, n, keys, d)
    mlp = _linear(rows, d, config.mlp_ratio * d) + _linear(rows, config.mlp_ratio * d, d)
    parts = dict.fromkeys(DIT_PARTS, 0.0)
    for i in range(config.num_layers):
        parts["spatial_attention"] += spatial
        parts["cross_attention"] += cross
        parts["mlp"] += mlp
        if not config.motion_module:
            continue
        s2 = config.temporal_block_size ** 2
        temporal = 4 * _linear(rows, d, d) + _attention(batch * l // s2, frames * s2, frames * s2, d)
        second = temporal
        if config.hybrid_global_attention and i % 2 == 1:
            second = 4 * _linear(rows, d, d) + _attention(batch, n, n, d)
        parts["motion_module"] += 2 * _linear(rows, d, d) + temporal + second  # + proj_in, proj_out
        inner = MOTION_FF_MULT * d
        parts["mlp"] += _linear(rows, d, 2 * inner) + _linear(rows, inner, d)

    other = _conv(batch * n, config.patch_in_channels, d, p * p)
    other += _linear(batch, TIMESTEP_FREQ_DIM, d) + _linear(batch, d, d) + _linear(batch, d, 6 * d)
    other += _linear(batch * text_len, config.caption_channels, d) + _linear(batch * text_len, d, d)
    if config.clip_channels:
        # One row per sample, widened to clip_tokens tokens at once (a (T*D)^2 second linear).
        wide = config.clip_tokens * d
        other += _linear(batch, config.clip_channels, wide) + _linear(batch, wide, wide)
    other += config.skip_plan[2] * _linear(rows, d, d)  # the skips that are taken (upstream keeps 13 fc)
    other += _linear(rows, d, p * p * config.out_channels)
    parts["other"] = other
    return {**parts, "total": sum(parts.values()), "tokens": float(n)}


# --- VAE decoder -----------------------------------------------------------------------------

def _resblock(outputs: int, c_in: int, c_out: int) -> float:
    shortcut = _conv(outputs, c_in, c_out, 1) if c_in != c_out else 0.0
    return _conv(outputs, c_in, c_out, 27) + _conv(outputs, c_out, c_out, 27) + shortcut


def vae_slice_decode_parts(vae: VAEConfig, context_frames: int, start: int, length: int,
                           latent_height: int, latent_width: int, batch: int = 1) -> dict[str, float]:
    """FLOPs of one ``SliceVAE.decode_slice(context, start, length)``: a context of
    ``context_frames`` latents of latent_height x latent_width, of which
    ``[start, start + length)`` is decoded. By part:

    - ``conv_in``: ``post_quant_conv`` (1x1x1) and ``decoder.conv_in`` (3x3x3) over the
      whole context;
    - ``mid_resblocks`` and ``mid_attention``: the mid block over the whole context, its
      res-blocks and its single-head attentions over all context_frames*h*w positions
      (q/k/v/out linears, scores, attention x V);
    - ``up_blocks``: the up-blocks on the cropped slice, res-blocks (shortcut convs
      included) and each up-sampler's conv after the nearest x2 in space (the x2 in time
      that follows is interpolation and free);
    - ``conv_out``: the last conv, at the output size.

    Every 3-D conv keeps its input's frames, height and width (temporal padding and
    the causal front frames included), so its outputs are the positions of its input.
    """
    _check_positive(context_frames=context_frames, length=length, latent_height=latent_height,
                    latent_width=latent_width, batch=batch)
    if not (isinstance(start, int) and 0 <= start and start + length <= context_frames):
        raise ValueError(f"slice [{start}, {start} + {length}) must lie inside the context "
                         f"of {context_frames} latent frames")
    channels = tuple(reversed(vae.block_out_channels))
    c0, z = channels[0], vae.latent_channels
    ctx = batch * context_frames * latent_height * latent_width
    parts = dict.fromkeys(VAE_PARTS, 0.0)
    parts["conv_in"] = _conv(ctx, z, z, 1) + _conv(ctx, z, c0, 27)
    parts["mid_resblocks"] = vae.mid_block_layers * _resblock(ctx, c0, c0)
    if vae.mid_block_attention:
        tokens = context_frames * latent_height * latent_width
        attention = 4 * _linear(ctx, c0, c0) + _attention(batch, tokens, tokens, c0)
        parts["mid_attention"] = (vae.mid_block_layers - 1) * attention

    t, hh, ww, prev = length, latent_height, latent_width, c0
    for c, kind in zip(channels, vae.up_block_types):
        outputs = batch * t * hh * ww
        parts["up_blocks"] += _resblock(outputs, prev, c) + vae.layers_per_block * _resblock(outputs, c, c)
        prev = c
        if kind == "none":
            continue
        hh, ww = 2 * hh, 2 * ww
        parts["up_blocks"] += _conv(batch * t * hh * ww, c, c, 27)
        if kind == "spacetime" and t > 1:
            t = 2 * t - 1 if vae.padding_mode == "causal" else 2 * t
    assert t == vae.decoded_frames(length), (t, length)
    parts["conv_out"] = _conv(batch * t * hh * ww, prev, vae.out_channels, 27)
    return {**parts, "total": sum(parts.values())}


def vae_slice_decode_flops(vae: VAEConfig, context_frames: int, start: int, length: int,
                           latent_height: int, latent_width: int, batch: int = 1) -> float:
    """Total of :func:`vae_slice_decode_parts`: one run of a ``vae_decoder`` engine, whose
    variant fixes (context_frames, start, length) (``export.spec.decoder_variants``)."""
    return vae_slice_decode_parts(vae, context_frames, start, length, latent_height,
                                  latent_width, batch)["total"]


def vae_decode_flops(vae: VAEConfig, frames: int, height: int, width: int, batch: int = 1) -> float:
    """FLOPs of decoding a whole video of ``frames`` pixel frames of height x width pixels:
    one :func:`vae_slice_decode_flops` per entry of ``vae.slice_plan`` (neighbouring
    slices' latents are re-run through ``conv_in`` and the mid block of each context)."""
    _check_positive(frames=frames, height=height, width=width)
    sc = vae.spatial_compression
    for name, size in (("height", height), ("width", width)):
        if size % sc:
            raise ValueError(f"{name} must be a multiple of {sc}, got {size}")
    return sum(vae_slice_decode_flops(vae, s.ctx_end - s.ctx_start, s.start, s.length,
                                      height // sc, width // sc, batch)
               for s in vae.slice_plan(vae.latent_frames(frames)))


# --- script ------------------------------------------------------------------------------------

def _fmt(flops: float) -> str:
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if flops >= scale:
            return f"{flops / scale:8.2f} {unit}"
    return f"{flops / 1e6:8.2f} MFLOP"


def _table(preset: str, height: int | None, width: int | None, frames: int | None) -> list[str]:
    cfg = from_preset(preset)
    sd = cfg.sampling
    height, width, frames = height or sd.height, width or sd.width, frames or sd.frames
    sc = cfg.vae.spatial_compression
    latent = (cfg.vae.latent_frames(frames), height // sc, width // sc)
    step = dit_flops(cfg.dit, 2, *latent, cfg.text_encoder.max_length)  # batched guidance
    decode = vae_decode_flops(cfg.vae, frames, height, width)
    share = "  ".join(f"{k} {step[k] / step['total']:.0%}" for k in DIT_PARTS)
    head = f"{preset}: {frames} frames {height}x{width} -> latents {latent}, {step['tokens']:.0f} tokens each"
    return [head,
            f"  DiT step (batch 2)  {_fmt(step['total'])}   {share}",
            f"  {sd.steps:2d} steps            {_fmt(sd.steps * step['total'])}",
            f"  VAE decode          {_fmt(decode)}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), action="append",
                        help="preset to report (repeatable; default: all)")
    parser.add_argument("--height", type=int, help="pixel height (default: the preset's)")
    parser.add_argument("--width", type=int, help="pixel width (default: the preset's)")
    parser.add_argument("--frames", type=int, help="pixel frames (default: the preset's)")
    args = parser.parse_args(argv)
    for preset in args.preset or sorted(PRESETS):
        print("\n".join(_table(preset, args.height, args.width, args.frames)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
