"""Slice VAE (reference/vae.py) at the tiny preset: shapes, slicing, neighbour sharing,
causality, tiling, validation and checkpoint key names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from easyanimate_rt.errors import InputError, ShapeError
from easyanimate_rt.reference.config import VAEConfig, from_preset
from easyanimate_rt.reference.vae import SliceVAE, _decode_tiled, double_frames, tile_spans
from easyanimate_rt.tolerances import check_close, error_stats

TINY = from_preset("tiny").vae
EXACT = dict(rtol=1e-5, atol=1e-6)  # same ops in a different order of calls


@pytest.fixture(scope="module")
def vae() -> SliceVAE:
    torch.manual_seed(0)
    return SliceVAE(TINY).eval()


def video(frames: int, height: int = 16, width: int = 16, batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, frames, height, width) * 2 - 1


def strip_group_norms(module: nn.Module) -> None:
    """Replace every GroupNorm by the identity (in place)."""
    for name, child in module.named_children():
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, nn.Identity())
        else:
            strip_group_norms(child)


# --- shapes -----------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [1, 8, 9, 16, 17, 25, 144])
@torch.no_grad()
def test_latent_frames_and_round_trip_shapes(vae, frames):
    x = video(frames)
    z = vae.encode(x)
    assert z.shape == (1, TINY.latent_channels, TINY.latent_frames(frames), 2, 2)
    plan = vae.slice_plan(z.shape[2])
    assert sum(vae.decoded_frames(s.length) for s in plan) == frames
    assert vae.decode(z).shape == x.shape


@torch.no_grad()
def test_non_square_batch_round_trip(vae):
    x = video(9, height=16, width=24, batch=2)
    z = vae.encode(x)
    assert z.shape == (2, 4, 3, 2, 3)
    out = vae.decode(z)
    assert out.shape == x.shape
    # GroupNorm and attention are per sample: each batch entry is what it is alone, up to
    # the rounding of other conv kernels for batch 1 (measured: 4.8e-6 decoded, 9e-8 encoded).
    for i in range(2):
        check_close(z[i:i + 1], vae.encode(x[i:i + 1]), "reference_exact")
        check_close(out[i:i + 1], vae.decode(z[i:i + 1]), "reference_exact")


@torch.no_grad()
def test_encode_scales_posterior_mean_and_samples(vae):
    x = video(9)
    mean, logvar = vae.encode_posterior(x)
    assert mean.shape == logvar.shape == (1, 4, 3, 2, 2)
    assert_close(vae.encode(x), mean * TINY.scaling_factor, **EXACT)
    a = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    b = vae.encode(x, sample=True, generator=torch.Generator().manual_seed(1))
    assert_close(a, b, rtol=0, atol=0)
    # A sample is mean + std * noise, the noise drawn slice by slice from the generator:
    # the lone first frame's latent, then the 8-frame slice's two.
    gen = torch.Generator().manual_seed(1)
    noise = torch.cat([torch.randn(1, 4, 1, 2, 2, generator=gen), torch.randn(1, 4, 2, 2, 2, generator=gen)], 2)
    assert_close(a, (mean + torch.exp(0.5 * logvar) * noise) * TINY.scaling_factor, **EXACT)


def test_training_forward_backward():
    torch.manual_seed(0)
    model = SliceVAE(TINY)
    x = video(9)
    recon, mean, logvar = model(x, generator=torch.Generator().manual_seed(0))
    assert recon.shape == (1, 3, 9, 16, 16) and mean.shape == logvar.shape == (1, 4, 3, 2, 2)
    # The training pass decodes a posterior sample drawn with the generator.
    with torch.no_grad():
        mean0, logvar0 = model.encode_posterior(x)
        noise = torch.randn(mean0.shape, generator=torch.Generator().manual_seed(0))
        expected = model.decode((mean0 + torch.exp(0.5 * logvar0) * noise) * TINY.scaling_factor)
    assert_close(mean, mean0, **EXACT)
    assert_close(logvar, logvar0, **EXACT)
    assert_close(recon, expected, **EXACT)
    (recon.abs().mean() + mean.square().mean() + logvar.exp().mean()).backward()
    # Every parameter is trained: a finite gradient, not zero (e.g. a detached branch).
    dead = [n for n, p in model.named_parameters()
            if p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0]
    assert not dead, dead


def test_double_frames_is_linear_interpolation():
    x = torch.randn(2, 3, 5, 4, 6)
    expected = F.interpolate(x, scale_factor=(2, 1, 1), mode="trilinear")
    assert_close(double_frames(x), expected, **EXACT)


# --- slice decoding ----------------------------------------------------------------------


def explicit_slice_decode(model: SliceVAE, z: torch.Tensor) -> torch.Tensor:
    """DESIGN.md 1.2 written out: a lone first latent when odd, then 2-latent slices,
    each with its previous and next slice concatenated before conv_in and the mid block."""
    dec, s = model.decoder, model.config.scaling_factor

    def run(context, offset):
        x = dec.mid_block(dec.conv_in(model.post_quant_conv(context / s)))
        x = x[:, :, offset:offset + (2 if context.shape[2] > 1 else 1)]
        for block in dec.up_blocks:
            x = block(x)
        return dec.conv_out(F.silu(dec.conv_norm_out(x)))

    first = z.shape[2] % 2
    out = [run(z[:, :, :1], 0)] if first else []
    slices = list(z[:, :, first:].split(2, dim=2))
    for k, cur in enumerate(slices):
        prev = [slices[k - 1]] if k > 0 else []
        nxt = [slices[k + 1]] if k + 1 < len(slices) else []
        out.append(run(torch.cat(prev + [cur] + nxt, dim=2), 2 if prev else 0))
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("latent_frames", [8, 9, 10])
@torch.no_grad()
def test_decode_equals_explicit_neighbour_decode(vae, latent_frames):
    z = torch.randn(1, 4, latent_frames, 2, 3)
    frames = vae.config.video_frames(latent_frames)
    whole = vae.decode(z)
    assert whole.shape == (1, 3, frames, 16, 24)
    assert_close(whole, explicit_slice_decode(vae, z), **EXACT)

    chunks = list(vae.iter_decode(z))
    expected = [1] * (latent_frames % 2) + [8] * (latent_frames // 2)
    assert [c.shape[2] for c in chunks] == expected
    assert_close(torch.cat(chunks, dim=2), whole, rtol=0, atol=0)

    # Neighbours matter: decoding every slice alone gives different frames.
    alone = torch.cat([vae.decode(z[:, :, a:a + n]) for a, n in
                       [(s.ctx_start + s.start, s.length) for s in vae.slice_plan(latent_frames)]], 2)
    assert not torch.allclose(alone, whole, atol=1e-4)


@torch.no_grad()
def test_decoded_slice_depends_only_on_its_neighbours(vae):
    z = torch.randn(1, 4, 8, 2, 2)  # slices 0..3
    z2 = z.clone()
    z2[:, :, 6:8] += 1.0  # slice 3
    a, b = vae.decode(z), vae.decode(z2)
    assert_close(a[:, :, :16], b[:, :, :16], rtol=0, atol=0)  # slices 0, 1
    assert not torch.allclose(a[:, :, 16:24], b[:, :, 16:24])  # slice 2 sees slice 3


def test_slice_plan():
    model = SliceVAE(TINY)
    assert model.slice_plan(1) == [(0, 1, 0, 1)]
    assert model.slice_plan(2) == [(0, 2, 0, 2)]
    assert model.slice_plan(7) == [(0, 1, 0, 1), (1, 5, 0, 2), (1, 7, 2, 2), (3, 7, 2, 2)]
    assert model.slice_plan(36)[5] == (8, 14, 2, 2)


# --- encoder slicing and causality ---------------------------------------------------------


@pytest.mark.parametrize("frames", [24, 25])
@torch.no_grad()
def test_encoder_slices_are_independent(vae, frames):
    x = video(frames)
    first = frames % 2
    x2 = x.clone()
    x2[:, :, first + 8:first + 16] = video(8)  # replace slice 2 (of 3)
    a, b = vae.encode(x), vae.encode(x2)
    cur = slice(first + 2, first + 4)
    assert_close(a[:, :, :first + 2], b[:, :, :first + 2], rtol=0, atol=0)
    assert_close(a[:, :, first + 4:], b[:, :, first + 4:], rtol=0, atol=0)
    assert not torch.allclose(a[:, :, cur], b[:, :, cur])


@torch.no_grad()
def test_causal_padding_makes_encoder_causal_within_a_slice():
    # GroupNorm pools statistics over time (DESIGN.md 1.2) and the mid-block attention
    # is global, so no encoder with them is causal whatever the padding. What the
    # padding mode decides is the conv/resampling skeleton: test it with attention off
    # and GroupNorm replaced by the identity. Latent k of a slice covers frames
    # 4k..4k+3; in causal mode it may only depend on frames <= 4k.
    def skeleton(mode):
        torch.manual_seed(0)
        model = SliceVAE(TINY.replace(padding_mode=mode, mid_block_attention=False)).eval()
        strip_group_norms(model)
        return model

    causal = skeleton("causal")
    x = video(8)
    z = causal.encode(x)
    for t in range(7):
        x2 = x.clone()
        x2[:, :, t + 1] += 1.0
        z2 = causal.encode(x2)
        keep = t // 4 + 1
        assert_close(z2[:, :, :keep], z[:, :, :keep], rtol=0, atol=0)
    x2 = x.clone()
    x2[:, :, 4] += 1.0
    assert not torch.allclose(causal.encode(x2)[:, :, 1], z[:, :, 1])
    # Control: with slice padding the same change reaches latent 0.
    sliced = skeleton("slice")
    assert not torch.allclose(sliced.encode(x2)[:, :, 0], sliced.encode(x)[:, :, 0])


# --- tiling ------------------------------------------------------------------------------


def test_tile_spans_cover_with_overlap():
    for size, tile, overlap in [(10, 4, 1), (12, 8, 2), (9, 4, 0), (3, 4, 1), (17, 6, 3)]:
        spans = tile_spans(size, tile, overlap)
        assert spans[0][0] == 0 and spans[-1][1] == size
        assert all(b - a == min(tile, size) for a, b in spans)
        assert all(b0 - a1 >= overlap for (_, b0), (a1, _) in zip(spans, spans[1:]))


def test_tile_blend_is_exact_for_a_pixelwise_map():
    # For a map with no spatial context every tile agrees with the untiled result, so the
    # blend (placement plus weights summing to one) must reproduce it.
    torch.manual_seed(0)
    proj = torch.randn(3, 4)

    def local(z):
        x = torch.einsum("oc,bcthw->bothw", proj, z)
        return x.repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)

    z = torch.randn(2, 4, 3, 7, 10)
    assert_close(_decode_tiled(local, z, (3, 4), (1, 2), scale=8), local(z), **EXACT)


def ramp(n: int, up: int, down: int) -> torch.Tensor:
    """Blend weight of one tile along one axis, written out independently of ``_ramps``:
    pixel centres k + 0.5 rise linearly over the ``up`` pixels shared with the previous
    tile, fall over the ``down`` pixels shared with the next one, and are 1 elsewhere."""
    w = torch.ones(n)
    if up:
        w[:up] = (torch.arange(up) + 0.5) / up
    if down:
        w[n - down:] = torch.minimum(w[n - down:], ((torch.arange(down) + 0.5) / down).flip(0))
    return w


def explicit_tiled_decode(model: SliceVAE, z: torch.Tensor, rows, cols) -> torch.Tensor:
    """Decode every latent tile untiled (all slices, with their neighbours) and blend the
    pixel tiles with the ramp weights, normalised by the weight sum."""
    s = model.config.spatial_compression
    out, total = 0, torch.zeros(z.shape[-2] * s, z.shape[-1] * s)
    for i, (r0, r1) in enumerate(rows):
        wr = ramp((r1 - r0) * s, (rows[i - 1][1] - r0) * s if i else 0,
                  (r1 - rows[i + 1][0]) * s if i + 1 < len(rows) else 0)
        for j, (c0, c1) in enumerate(cols):
            wc = ramp((c1 - c0) * s, (cols[j - 1][1] - c0) * s if j else 0,
                      (c1 - cols[j + 1][0]) * s if j + 1 < len(cols) else 0)
            weight = torch.zeros_like(total)
            weight[r0 * s:r1 * s, c0 * s:c1 * s] = wr[:, None] * wc[None, :]
            piece = F.pad(model.decode(z[..., r0:r1, c0:c1]),
                          (c0 * s, (z.shape[-1] - c1) * s, r0 * s, (z.shape[-2] - r1) * s))
            out = out + piece * weight
            total += weight
    return out / total


@torch.no_grad()
def test_tiled_decode_is_the_ramp_blend_of_untiled_tiles(vae):
    z = torch.randn(1, 4, 3, 6, 9)
    whole = vae.decode(z)
    # A latent no larger than one tile is decoded untiled.
    assert_close(vae.decode(z, tile_size=(6, 9)), whole, rtol=0, atol=0)
    # tile 4, overlap (2, 1): rows [0, 4) [2, 6); columns [0, 4) [3, 7) [5, 9), so the
    # middle column tile ramps on both sides, over 8 pixels on the left and 16 on the right.
    tiled = vae.decode(z, tile_size=4, tile_overlap=(2, 1))
    expected = explicit_tiled_decode(vae, z, [(0, 4), (2, 6)], [(0, 4), (3, 7), (5, 9)])
    assert_close(tiled, expected, **EXACT)  # measured: bit-identical
    # Where one tile has weight 1 and no other tile reaches, it is that tile's decode.
    assert_close(tiled[..., :16, :24], vae.decode(z[..., :4, :4])[..., :16, :24], rtol=0, atol=0)
    assert_close(torch.cat(list(vae.iter_decode(z, tile_size=4, tile_overlap=(2, 1))), 2), tiled,
                 rtol=0, atol=0)


@torch.no_grad()
def test_tiled_decode_is_close_to_the_untiled_decode(vae):
    # Not exact, for two reasons: every GroupNorm and the mid-block attention see only
    # their tile (statistics and attention are global over the input), and the decoder's
    # receptive field (about 14 latents each way, measured) is wider than any tile, so
    # the zero padding at a tile's border reaches its whole interior. Measured at this
    # seed, 16 x 16 latents in tiles of 12 overlapping by 8: cosine 0.9928, mean |diff|
    # 0.023 (0.9928..0.9937 and 0.021..0.023 over seeds 0-2); a blend with flat weights
    # gives 0.965, reversed ramps 0.948, and the 4-latent tiles of the test above 0.74.
    z = torch.randn(1, 4, 3, 16, 16)
    stats = error_stats(vae.decode(z, tile_size=12, tile_overlap=4), vae.decode(z))
    assert stats["cosine"] >= 0.99 and stats["mean_abs"] <= 0.03, stats
    # Without GroupNorm and attention only the border padding is left: cosine 0.99995
    # (0.99993..0.99995 over seeds; flat weights 0.9979, reversed ramps 0.9965).
    torch.manual_seed(0)
    skeleton = SliceVAE(TINY.replace(mid_block_attention=False)).eval()
    strip_group_norms(skeleton)
    stats = error_stats(skeleton.decode(z, tile_size=12, tile_overlap=4), skeleton.decode(z))
    assert stats["cosine"] >= 0.9999, stats


# --- validation and keys ---------------------------------------------------------------------


@pytest.mark.parametrize("shape, error, message", [
    ((1, 3, 10, 16, 16), InputError, "frames must be 1, a multiple of 8"),
    ((1, 3, 9, 20, 16), ShapeError, "height must be a multiple of 8, got 20"),
    ((1, 3, 9, 16, 12), ShapeError, "width must be a multiple of 8, got 12"),
    ((3, 9, 16, 16), ShapeError, "video must have shape"),
    ((1, 4, 9, 16, 16), ShapeError, "video must have shape"),
])
def test_encode_rejects_bad_video(vae, shape, error, message):
    with pytest.raises(error, match=message):
        vae.encode(torch.zeros(shape))


def test_decode_rejects_bad_latents_and_tiling(vae):
    with pytest.raises(ShapeError, match="latents must have shape"):
        vae.decode(torch.zeros(1, 3, 2, 2, 2))
    with pytest.raises(InputError, match="tile_overlap must be >= 0 and smaller than tile_size"):
        vae.decode(torch.zeros(1, 4, 2, 4, 4), tile_size=2, tile_overlap=2)
    with pytest.raises(InputError, match="tile_size must be an int or a pair"):
        vae.decode(torch.zeros(1, 4, 2, 4, 4), tile_size=(2, 2, 2))
    with pytest.raises(ShapeError, match="must lie inside the context"):
        vae.decode_slice(torch.zeros(1, 4, 4, 2, 2), 3, 2)
    with pytest.raises(ShapeError, match="latent frames must be a positive multiple of 2"):
        vae.slice_plan(0)


def test_state_dict_keys_follow_upstream(vae):
    keys = set(vae.state_dict())
    for key in [
        "encoder.conv_in.weight",
        "encoder.down_blocks.0.convs.0.conv1.weight",
        "encoder.down_blocks.1.convs.0.shortcut.weight",
        "encoder.down_blocks.0.downsampler.conv.weight",
        "encoder.mid_block.convs.1.norm2.weight",
        "encoder.mid_block.attentions.0.group_norm.weight",
        "encoder.mid_block.attentions.0.to_out.weight",
        "encoder.conv_norm_out.weight",
        "encoder.conv_out.weight",
        "decoder.up_blocks.0.upsampler.conv.weight",
        "decoder.up_blocks.3.convs.1.conv2.bias",
        "decoder.mid_block.attentions.0.to_q.bias",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]:
        assert key in keys, key
    assert not any("downsampler" in k for k in keys if k.startswith("encoder.down_blocks.3."))
    assert not any("upsampler" in k for k in keys if k.startswith("decoder.up_blocks.3."))
    no_attention = SliceVAE(TINY.replace(mid_block_attention=False)).state_dict()
    assert not any("attentions" in k for k in no_attention)


def test_release_size_builds_on_meta_device():
    with torch.device("meta"):
        model = SliceVAE(VAEConfig())
    assert model.encoder.conv_out.weight.shape == (8, 512, 3, 3, 3)
    assert model.decoder.conv_out.weight.shape == (3, 128, 3, 3, 3)
    assert len(model.decoder.up_blocks[0].convs) == 3
    assert 200e6 < sum(p.numel() for p in model.parameters()) < 300e6
