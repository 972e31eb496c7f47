"""The analytic FLOP model (benchmarks/flops.py) against torch's FlopCounterMode run on
the reference modules with random weights: the total and every part it can isolate by
module, within TOL. Small models run on CPU; release widths run on the meta device
(no compute, and SDPA there decomposes into bmm, which FlopCounterMode counts).
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from easyanimate_rt.export.graphs import graph_module
from easyanimate_rt.export.spec import decoder_variants, vae_decoder_spec
from easyanimate_rt.reference.config import PRESETS, VAEConfig, from_preset
from easyanimate_rt.reference.dit import VideoDiT
from easyanimate_rt.reference.vae import SliceVAE

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import flops  # noqa: E402

TOL = 0.05
aten = torch.ops.aten
TINY = from_preset("tiny").dit


def _cpu_flash_sdpa(q, k, v, *args, out_shape=None, **kwargs) -> int:
    """FlopCounterMode has no formula for the kernel SDPA runs on CPU tensors
    (``_scaled_dot_product_flash_attention_for_cpu``) and would count its attention as 0:
    Q K^T and attention x V, as its own ``sdpa_flop_count``."""
    b, h, s_q, d_q = q
    s_k, d_v = k[-2], v[-1]
    return 2 * b * h * s_q * s_k * d_q + 2 * b * h * s_q * s_k * d_v


CUSTOM = ({aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_sdpa}
          if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu") else {})


def count(fn, *args) -> dict[str, int]:
    """FLOPs counted while ``fn(*args)`` runs, per module name ("Global": all)."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CUSTOM) as counter:
        fn(*args)
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


def _sum(counts: dict[str, int], pattern: str) -> int:
    return sum(v for k, v in counts.items() if re.fullmatch(pattern, k))


def _close(analytic: float, counted: float, what: str) -> None:
    assert counted > 0 or analytic == 0, what
    ratio = analytic / counted if counted else 1.0
    assert abs(ratio - 1) <= TOL, f"{what}: analytic {analytic:.4g} / counted {counted:.4g} = {ratio:.4f}"


# --- DiT -----------------------------------------------------------------------------------

BLOCK = r"VideoDiT\.transformer_blocks\.\d+"
MOTION_FF = BLOCK + r"\.attn_temporal\.temporal_transformer\.transformer_blocks\.0\.ff"
OTHER = r"VideoDiT\.(pos_embed|adaln_single|caption_projection|clip_projection|long_connect_fc\.\d+|proj_out)"


def counted_dit_parts(counts: dict[str, int]) -> dict[str, int]:
    """flops.DIT_PARTS from the per-module counts of one VideoDiT forward."""
    motion_ff = _sum(counts, MOTION_FF)
    return {
        "spatial_attention": _sum(counts, BLOCK + r"\.attn1"),
        "motion_module": _sum(counts, BLOCK + r"\.attn_temporal") - motion_ff,
        "cross_attention": _sum(counts, BLOCK + r"\.attn2"),
        "mlp": _sum(counts, BLOCK + r"\.ff") + motion_ff,
        "other": _sum(counts, OTHER),
        "total": counts["Global"],
    }


def dit_inputs(cfg, batch, frames, height, width, text_len, device="cpu") -> list[torch.Tensor]:
    kw = {"device": device}
    mask = torch.ones(batch, text_len, **kw)
    mask[:, text_len // 2:] = 0                            # padded keys still cost FLOPs
    args = [torch.randn(batch, cfg.in_channels, frames, height, width, **kw),
            torch.full((batch,), 500.0, **kw), torch.randn(batch, text_len, cfg.caption_channels, **kw), mask]
    if cfg.inpaint:
        args.append(torch.randn(batch, cfg.inpaint_channels, frames, height, width, **kw))
    if cfg.clip_channels:
        args += [torch.randn(batch, cfg.clip_channels, **kw), torch.ones(batch, cfg.clip_tokens, **kw)]
    return args


def measure_dit(cfg, device: str, **shape: int) -> tuple[dict[str, float], dict[str, int]]:
    """(analytic parts, counted parts) of one forward at latent ``shape``."""
    with torch.device(device):
        model = VideoDiT(cfg).eval()
    counts = count(model, *dit_inputs(cfg, device=device, **shape))
    return flops.dit_flops(cfg, **shape), counted_dit_parts(counts)


_RELEASE_VAE = VAEConfig()
_VIDEO = (16, 256, 256)  # pixel frames, height, width of the compute-bound case
_RELEASE_LATENT = {"frames": _VIDEO[0] // _RELEASE_VAE.temporal_compression,
                   "height": _VIDEO[1] // _RELEASE_VAE.spatial_compression,
                   "width": _VIDEO[2] // _RELEASE_VAE.spatial_compression}

#: name -> (config, device, latent shape)
DIT_CASES = {
    "tiny-1frame": (TINY, "cpu", dict(batch=1, frames=1, height=8, width=12, text_len=6)),
    "tiny-5frames": (TINY, "cpu", dict(batch=2, frames=5, height=8, width=8, text_len=6)),
    "tiny-grid-reshape": (TINY.replace(temporal_block_size=2), "cpu",
                          dict(batch=2, frames=9, height=8, width=8, text_len=6)),
    "shapes-grid-reshape": (from_preset("shapes").dit, "cpu",
                            dict(batch=2, frames=5, height=8, width=8, text_len=24)),
    "tiny-image-model": (TINY.replace(motion_module=False, long_skips=False, learn_sigma=False), "cpu",
                         dict(batch=1, frames=2, height=6, width=4, text_len=3)),
    "tiny-hybrid-inp": (TINY.replace(hybrid_global_attention=True, inpaint_channels=8, clip_channels=24,
                                     clip_tokens=4), "cpu",
                        dict(batch=2, frames=3, height=8, width=8, text_len=6)),
    "v3-512-2blocks": (from_preset("v3-512").dit.replace(num_layers=2), "meta",
                       dict(batch=2, frames=3, height=16, width=16, text_len=120)),
    # The compute-bound case: release width, Grid Reshape, 2 blocks, 256x256 x 16 frames.
    "release-width-grid": (from_preset("v2-512").dit.replace(num_layers=2, temporal_block_size=2), "meta",
                           dict(batch=2, text_len=120, **_RELEASE_LATENT)),
    "release-width-5blocks": (from_preset("v2-512").dit.replace(num_layers=5), "meta",
                              dict(batch=1, frames=2, height=16, width=16, text_len=120)),
}


@pytest.mark.parametrize("name", list(DIT_CASES))
def test_dit_flops_match_flop_counter(name):
    cfg, device, shape = DIT_CASES[name]
    analytic, counted = measure_dit(cfg, device, **shape)
    # Every counted FLOP lies in one of the isolated parts, and the model's parts add up.
    assert sum(counted[k] for k in flops.DIT_PARTS) == counted["total"]
    assert sum(analytic[k] for k in flops.DIT_PARTS) == pytest.approx(analytic["total"], rel=1e-12)
    for key in (*flops.DIT_PARTS, "total"):
        _close(analytic[key], counted[key], f"{name} {key}")
    assert analytic["tokens"] == flops.dit_tokens(cfg, shape["frames"], shape["height"], shape["width"])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset(preset):
    """Each preset's DiT (3 blocks: a hybrid model's odd block included) at a small size."""
    config = from_preset(preset)
    cfg, mult = config.dit.replace(num_layers=3), config.dit.latent_multiple
    shape = dict(batch=2, frames=2, height=2 * mult, width=3 * mult, text_len=config.text_encoder.max_length)
    analytic, counted = measure_dit(cfg, "meta", **shape)
    for key in (*flops.DIT_PARTS, "total"):
        _close(analytic[key], counted[key], f"{preset} {key}")


def test_compute_bound_case_sees_every_part():
    """At the release width each part is more than TOL of the total, so a model that
    dropped any of them would fail the total's check above."""
    cfg, _, shape = DIT_CASES["release-width-grid"]
    analytic = flops.dit_flops(cfg, **shape)
    assert analytic["tokens"] == 4 * 16 * 16
    for key in ("spatial_attention", "motion_module", "cross_attention", "mlp"):
        assert analytic[key] > TOL * analytic["total"], key


def test_grid_reshape_and_hybrid_change_the_count():
    """The grouping of temporal tokens matters at the shapes tested: counting plain
    temporal attention for a Grid Reshape or hybrid model would miss by more than TOL."""
    grid_cfg, _, shape = DIT_CASES["tiny-grid-reshape"]
    grid = flops.dit_flops(grid_cfg, **shape)["motion_module"]
    plain = flops.dit_flops(grid_cfg.replace(temporal_block_size=1), **shape)["motion_module"]
    assert grid > (1 + TOL) * plain
    hybrid_cfg, _, shape = DIT_CASES["tiny-hybrid-inp"]
    hybrid = flops.dit_flops(hybrid_cfg, **shape)["motion_module"]
    plain = flops.dit_flops(hybrid_cfg.replace(hybrid_global_attention=False), **shape)["motion_module"]
    assert hybrid > (1 + TOL) * plain


def test_tokens_and_shape_rules():
    v3 = from_preset("v3-512").dit
    assert flops.dit_tokens(v3, 36, 64, 64) == 36_864          # DESIGN.md 1.3: 512x512x144
    assert flops.dit_tokens(v3, 36, 96, 96) == 82_944          # 768x768x144
    with pytest.raises(ValueError, match="latent height must be a multiple of 4"):
        flops.dit_tokens(TINY.replace(temporal_block_size=2), 1, 6, 8)
    with pytest.raises(ValueError, match="text_len"):
        flops.dit_flops(TINY, 1, 1, 8, 8, 0)


# --- VAE decoder -------------------------------------------------------------------------------

NET = r"GraphModule\.net\."


def counted_vae_parts(counts: dict[str, int]) -> dict[str, int]:
    """flops.VAE_PARTS from the per-module counts of one decoder graph."""
    attention = _sum(counts, NET + r"decoder\.mid_block\.attentions\.\d+")
    return {
        "conv_in": _sum(counts, NET + r"(post_quant_conv|decoder\.conv_in)"),
        "mid_resblocks": _sum(counts, NET + r"decoder\.mid_block") - attention,
        "mid_attention": attention,
        "up_blocks": _sum(counts, NET + r"decoder\.up_blocks\.\d+"),
        "conv_out": _sum(counts, NET + r"decoder\.conv_out"),
        "total": counts["Global"],
    }


#: name -> (preset, device, latent height, latent width, batch)
VAE_CASES = {
    "tiny": ("tiny", "cpu", 4, 6, 1),
    "v3-release": ("v3-512", "meta", 32, 32, 1),
    "v2-release": ("v2-512", "meta", 32, 24, 2),
}


@pytest.mark.parametrize("name", list(VAE_CASES))
def test_vae_slice_decode_matches_flop_counter(name):
    """Every decoder engine variant: the graph the exporter exports for it."""
    preset, device, h, w, batch = VAE_CASES[name]
    config = from_preset(preset)
    with torch.device(device):
        model = types.SimpleNamespace(vae=SliceVAE(config.vae))
    for variant, (ctx, start, length) in decoder_variants(config).items():
        spec = vae_decoder_spec(config, variant)
        context = torch.randn(batch, config.vae.latent_channels, ctx, h, w, device=device)
        counted = counted_vae_parts(count(graph_module(model, spec), context))
        analytic = flops.vae_slice_decode_parts(config.vae, ctx, start, length, h, w, batch)
        assert sum(counted[k] for k in flops.VAE_PARTS) == counted["total"]
        assert analytic["total"] == flops.vae_slice_decode_flops(config.vae, ctx, start, length, h, w, batch)
        for key in (*flops.VAE_PARTS, "total"):
            _close(analytic[key], counted[key], f"{name}/{variant} {key}")


@pytest.mark.parametrize("preset, device, frames, height, width", [
    ("tiny", "cpu", 25, 32, 24),         # lone first latent, then first, interior, last slices
    ("tiny", "cpu", 1, 16, 16),          # an image
    ("v3-512", "meta", 33, 64, 64),
    ("v2-512", "meta", 27, 64, 48),      # chunk mode: three 3-latent chunks
])
def test_vae_decode_matches_flop_counter(preset, device, frames, height, width):
    vae_cfg = from_preset(preset).vae
    with torch.device(device):
        vae = SliceVAE(vae_cfg)
    sc = vae_cfg.spatial_compression
    latents = torch.randn(1, vae_cfg.latent_channels, vae_cfg.latent_frames(frames), height // sc,
                          width // sc, device=device)
    counted = count(vae.decode, latents)["Global"]
    _close(flops.vae_decode_flops(vae_cfg, frames, height, width), counted, f"{preset} decode")


def test_vae_shape_rules():
    vae = from_preset("tiny").vae
    with pytest.raises(ValueError, match="height must be a multiple of 8"):
        flops.vae_decode_flops(vae, 9, 20, 16)
    with pytest.raises(ValueError, match="inside the context"):
        flops.vae_slice_decode_flops(vae, 2, 1, 2, 4, 4)
