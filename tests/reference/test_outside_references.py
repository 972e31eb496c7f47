"""Building blocks of the DiT motion module and of the Slice VAE against an outside
implementation of the same math: diffusers' AnimateDiff temporal transformer and its
EasyAnimate MagViT VAE (``AutoencoderKLMagvit``).

Every case builds our block, randomises all of its parameters with a fixed
``torch.Generator`` (zero-initialised ones such as the motion module's ``proj_out``
included; norm gains around 1, biases around 0, weights at about unit gain), copies them
by name into the diffusers block (one small ``rename`` per case; the key sets must
match exactly, so an unmapped or extra parameter fails), feeds both the same random
input in the layout each expects, and asserts a max abs difference <= 1e-5 in float32
(``tolerances.check_close(..., "reference_exact")``).

Matched
-------
Motion module, plain temporal attention (``temporal_block_size=1``, not hybrid) vs
``diffusers.models.unets.unet_motion_model.AnimateDiffTransformer3D`` built as diffusers'
motion blocks build it (``positional_embeddings="sinusoidal"``, two self-attentions,
GEGLU, no q/k/v bias). Weight map: ``attention_blocks.{0,1}`` -> ``attn{1,2}``,
``norms.{0,1}`` -> ``norm{1,2}``, ``ff_norm`` -> ``norm3``; ``norm``, ``proj_in``,
``proj_out``, ``ff`` keep their names. The positional tables are not copied: each side
computes its own and the test asserts they are equal. One adaptation: diffusers'
``norm`` is a GroupNorm over (C, F, H, W) jointly, while upstream EasyAnimate (and the
original AnimateDiff) normalise each frame on its own (``"b c f h w -> (b f) c h w"``
before ``self.norm``), as we do. The test wraps diffusers' own GroupNorm module (same
weights) so it is applied per frame; everything after it is diffusers' code as is.

Slice VAE with ``padding_mode="causal"`` vs ``autoencoder_kl_magvit`` with
``spatial_group_norm=False``: PaddedConv3d vs EasyAnimateCausalConv3d; ResBlock (with and
without the 1x1x1 shortcut) vs EasyAnimateResidualBlock3D; both Downsamplers vs
EasyAnimateDownsampler3D; the spatial Upsampler vs EasyAnimateUpsampler3D; MidBlock
without attention vs EasyAnimateMidBlock3d; the whole Encoder (``mid_block_attention``
off, ``layers_per_block=2``) vs EasyAnimateEncoder, on 1 and 8 frames; the Decoder on a
lone latent frame vs EasyAnimateDecoder. Key names are identical (upstream layout).
The space-time Upsampler is matched against diffusers' non-first-chunk path, the VAE
Attention and the attention MidBlock against diffusers' generic VAE attention (see
those tests).

Not matched (no test)
---------------------
- ``padding_mode="slice"`` PaddedConv3d (zero frame on each side): diffusers' conv is always causal.
- ``spatial_group_norm=True`` (AutoencoderKLMagvit's default): per-frame GroupNorm and nearest
  temporal up-sampling; ours normalises over (T, H, W) and up-samples time linearly.
- Decoder on more than one latent frame: diffusers' decoder mid block is built with per-frame
  GroupNorm whatever the config, its space-time up-samplers do not double frames on a first
  call (2 latents -> 2 frames, ours 8), and ours crops the neighbour context after the mid block.
- SliceVAE.encode/decode vs AutoencoderKLMagvit.encode/decode: diffusers streams chunks
  with conv caches across them, ours encodes 8-frame slices independently and decodes with neighbour context.
- VAE mid-block attention as such: AutoencoderKLMagvit has none (tested against diffusers' generic ``Attention``).
- Motion module with Grid Reshape (``temporal_block_size=2``) or hybrid global attention: nothing like it in diffusers.

Shapes in comments: B batch, C channels, T frames, H, W height and width, F frames of the
motion module, D its width, h, w its token grid, L = h*w.
"""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from needs import require
from torch import nn

from easyanimate_rt.reference import vae as ours_vae
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.dit import VideoDiTBlock
from easyanimate_rt.tolerances import check_close

SEED = 20240607

# Tiny VAE with causal padding and the two res-blocks per level the diffusers mid block
# needs (its mid block has ``layers_per_block`` res-blocks, ours always two).
VAE_CFG = from_preset("tiny").vae.replace(padding_mode="causal", layers_per_block=2)
GROUPS, EPS = VAE_CFG.norm_num_groups, VAE_CFG.norm_eps  # 4, 1e-6

# Tiny DiT motion module: D = 2 * 32 = 64, 4 temporal heads of 16, 32 GroupNorm groups.
DIT_CFG = from_preset("tiny").dit.replace(attention_head_dim=32, temporal_num_heads=4,
                                          temporal_block_size=1, hybrid_global_attention=False)


# diffusers' block types for our ("spatial", "spacetime", "spacetime", "none"); its last
# block never resamples, whatever its type.
D_TYPES = ("SpatialDownBlock3D", "SpatialTemporalDownBlock3D", "SpatialTemporalDownBlock3D",
           "SpatialTemporalDownBlock3D")
U_TYPES = ("SpatialUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D",
           "SpatialTemporalUpBlock3D")
assert VAE_CFG.down_block_types == ("spatial", "spacetime", "spacetime", "none") == VAE_CFG.up_block_types
# Constructor arguments of diffusers' blocks equivalent to VAE_CFG.
RES_KW = {"norm_num_groups": GROUPS, "norm_eps": EPS, "spatial_group_norm": False}
ENC_KW = {"in_channels": 3, "out_channels": VAE_CFG.latent_channels, "down_block_types": D_TYPES,
          "block_out_channels": VAE_CFG.block_out_channels, "layers_per_block": 2,
          "norm_num_groups": GROUPS, "double_z": True, "spatial_group_norm": False}
DEC_KW = {"in_channels": VAE_CFG.latent_channels, "out_channels": 3, "up_block_types": U_TYPES,
          "block_out_channels": VAE_CFG.block_out_channels, "layers_per_block": 2,
          "norm_num_groups": GROUPS, "spatial_group_norm": False}


def magvit():
    """diffusers' EasyAnimate VAE module (diffusers >= 0.33, what the [dev] extra pins)."""
    require("diffusers")
    return importlib.import_module("diffusers.models.autoencoders.autoencoder_kl_magvit")


# --- helpers -----------------------------------------------------------------------------


def randomise_(module: nn.Module, seed: int = SEED) -> None:
    """Overwrite every parameter with seeded noise: weights ~ N(0, 1/fan_in), 1-D
    weights (norm gains) ~ 1 + N(0, 0.25^2), biases ~ N(0, 0.25^2)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            elif name.endswith("weight"):
                p.copy_(1 + 0.25 * noise)
            else:
                p.copy_(0.25 * noise)


def copy_weights_(ours: nn.Module, theirs: nn.Module, rename=lambda k: k) -> None:
    """Copy our parameters into ``theirs`` under ``rename(our_name)``; the renamed key set
    must equal theirs exactly and every shape must agree."""
    src = {rename(k): v for k, v in ours.named_parameters()}
    dst = dict(theirs.named_parameters())
    assert sorted(src) == sorted(dst), (sorted(set(src) ^ set(dst)))
    with torch.no_grad():
        for k, p in dst.items():
            assert p.shape == src[k].shape, (k, p.shape, src[k].shape)
            p.copy_(src[k])


def clear_caches_(module: nn.Module) -> None:
    """Reset diffusers' streaming caches (causal convs, temporal up-samplers)."""
    for m in module.modules():
        if hasattr(m, "_clear_conv_cache"):
            m._clear_conv_cache()


def compare(actual: torch.Tensor, expected: torch.Tensor, what: str) -> dict:
    stats = check_close(actual, expected, "reference_exact")
    print(f"{what}: max_abs={stats['max_abs']:.3g} (reference max {stats['ref_max_abs']:.3g})")
    # Guard against a vacuous pass: the reference output must be of order one.
    assert stats["ref_max_abs"] > 0.5, stats
    return stats


def rand(*shape: int, seed: int = SEED + 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --- motion module -----------------------------------------------------------------------


class PerFrameGroupNorm(nn.Module):
    """diffusers' GroupNorm module applied to each frame separately: (B, C, F, H, W) in
    and out, normalised over (C/groups, H, W) per frame as upstream EasyAnimate does."""

    def __init__(self, norm: nn.GroupNorm):
        super().__init__()
        self.inner = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        y = self.inner(x.transpose(1, 2).flatten(0, 1))                    # (B*F, C, H, W)
        return y.unflatten(0, (b, -1)).transpose(1, 2)                     # (B, C, F, H, W)


_MOTION_RENAMES = [
    (r"^temporal_transformer\.", ""),
    (r"attention_blocks\.0\.", "attn1."),
    (r"attention_blocks\.1\.", "attn2."),
    (r"norms\.0\.", "norm1."),
    (r"norms\.1\.", "norm2."),
    (r"ff_norm\.", "norm3."),
]


def motion_rename(key: str) -> str:
    """Our MotionModule key -> AnimateDiffTransformer3D key."""
    for pattern, repl in _MOTION_RENAMES:
        key = re.sub(pattern, repl, key)
    return key


@torch.no_grad()
def test_motion_module_matches_diffusers_animatediff():
    """Plain motion module (block size 1, not hybrid) == diffusers' AnimateDiff temporal
    transformer (norm applied per frame, see the module docstring), residual included."""
    require("diffusers")
    from diffusers.models.unets.unet_motion_model import AnimateDiffTransformer3D

    cfg = DIT_CFG
    d, heads = cfg.hidden_size, cfg.temporal_num_heads
    # Index 1 would be a global-attention block in a hybrid model: here it must be plain.
    ours = VideoDiTBlock(cfg, index=1).attn_temporal.eval()
    assert ours.block_size == 1 and not ours.global_second
    randomise_(ours)
    assert ours.temporal_transformer.proj_out.weight.abs().min() > 0  # zero init overwritten

    theirs = AnimateDiffTransformer3D(
        num_attention_heads=heads, attention_head_dim=d // heads, in_channels=d,
        norm_num_groups=cfg.motion_norm_groups, cross_attention_dim=None, attention_bias=False,
        activation_fn="geglu", positional_embeddings="sinusoidal",
        num_positional_embeddings=cfg.temporal_max_positions, double_self_attention=True).eval()
    copy_weights_(ours, theirs, motion_rename)
    # Frame positions: computed independently on each side, identical tables.
    their_pe = theirs.transformer_blocks[0].pos_embed.pe                  # (1, max_pos, D)
    for attn in ours.temporal_transformer.transformer_blocks[0].attention_blocks:
        assert torch.equal(attn.pos_encoder.pe, their_pe)
    assert isinstance(theirs.norm, nn.GroupNorm) and theirs.norm.eps == 1e-6
    theirs.norm = PerFrameGroupNorm(theirs.norm)

    b, frames, h, w = 2, 7, 4, 6
    x = rand(b * frames, d, h, w)                                         # (B*F, D, h, w)
    expected = theirs(x, num_frames=frames)                               # (B*F, D, h, w)
    tokens = x.flatten(2).transpose(1, 2)                                 # (B*F, L, D)
    actual = ours(tokens, frames, h, w).transpose(1, 2).reshape_as(x)     # (B*F, D, h, w)
    compare(actual, expected, "motion module")
    # The temporal branch itself (output minus residual) is of order one, not negligible.
    assert (expected - x).abs().max() > 0.5


# --- Slice VAE: blocks with a one-to-one diffusers counterpart --------------------------


def _cases():
    """name -> (our block, diffusers block from the magvit module, input shape)."""
    c = VAE_CFG                                                           # channels (8, 16, 16, 16)
    no_attn = c.replace(mid_block_attention=False)
    res_kw, enc_kw = RES_KW, ENC_KW
    return {
        "causal_conv": (lambda: ours_vae.PaddedConv3d(8, 16, "causal"),
                        lambda m: m.EasyAnimateCausalConv3d(8, 16, kernel_size=3),
                        (2, 8, 6, 12, 10)),
        "res_block_shortcut": (lambda: ours_vae.ResBlock(8, 16, c),
                               lambda m: m.EasyAnimateResidualBlock3D(8, 16, **res_kw),
                               (2, 8, 6, 12, 10)),
        "res_block": (lambda: ours_vae.ResBlock(16, 16, c),
                      lambda m: m.EasyAnimateResidualBlock3D(16, 16, **res_kw),
                      (2, 16, 5, 10, 12)),
        "downsampler_spatial": (lambda: ours_vae.Downsampler(16, "spatial", c),
                                lambda m: m.EasyAnimateDownsampler3D(16, 16, stride=(1, 2, 2)),
                                (2, 16, 5, 12, 10)),
        "downsampler_spacetime_even": (lambda: ours_vae.Downsampler(16, "spacetime", c),
                                       lambda m: m.EasyAnimateDownsampler3D(16, 16, stride=(2, 2, 2)),
                                       (2, 16, 8, 12, 10)),
        "downsampler_spacetime_odd": (lambda: ours_vae.Downsampler(16, "spacetime", c),
                                      lambda m: m.EasyAnimateDownsampler3D(16, 16, stride=(2, 2, 2)),
                                      (2, 16, 5, 12, 10)),
        "upsampler_spatial": (lambda: ours_vae.Upsampler(16, "spatial", c),
                              lambda m: m.EasyAnimateUpsampler3D(16, 16, temporal_upsample=False,
                                                                 spatial_group_norm=False),
                              (2, 16, 4, 6, 5)),
        "mid_block": (lambda: ours_vae.MidBlock(16, no_attn),
                      lambda m: m.EasyAnimateMidBlock3d(16, num_layers=2, **res_kw),
                      (2, 16, 6, 8, 6)),
        "encoder_8_frames": (lambda: ours_vae.Encoder(no_attn),
                             lambda m: m.EasyAnimateEncoder(**enc_kw),
                             (1, 3, 8, 16, 24)),
        "encoder_1_frame": (lambda: ours_vae.Encoder(no_attn),
                            lambda m: m.EasyAnimateEncoder(**enc_kw),
                            (2, 3, 1, 32, 24)),
    }


CASES = _cases()


@torch.no_grad()
@pytest.mark.parametrize("name", list(CASES))
def test_vae_block_matches_diffusers_magvit(name):
    """Same weights, same input (B, C, T, H, W) in both: identical outputs."""
    m = magvit()
    make_ours, make_theirs, shape = CASES[name]
    ours, theirs = make_ours().eval(), make_theirs(m).eval()
    randomise_(ours)
    copy_weights_(ours, theirs)
    x = rand(*shape)                                                      # (B, C, T, H, W)
    clear_caches_(theirs)
    expected = theirs(x)                                                  # (B, C', T', H', W')
    actual = ours(x)
    compare(actual, expected, name)
    if name.startswith("encoder"):  # (B, 2*4, T', H/8, W/8): 8 frames -> 2 latents, 1 -> 1
        assert actual.shape == (shape[0], 8, 1 if shape[2] == 1 else 2, shape[3] // 8, shape[4] // 8)


@torch.no_grad()
def test_vae_decoder_on_a_lone_latent_matches_diffusers_magvit():
    """The lone first latent of an odd video (slice plan entry (0, 1, 0, 1)): with one
    frame per-frame and joint GroupNorm coincide and neither up-sampler doubles it, so
    our Decoder equals diffusers' EasyAnimateDecoder there (and only there, see "Not
    matched"). Covers conv_in, the mid block, every up-block and conv_out."""
    m = magvit()
    c = VAE_CFG.replace(mid_block_attention=False)
    ours = ours_vae.Decoder(c).eval()
    theirs = m.EasyAnimateDecoder(**DEC_KW).eval()
    randomise_(ours)
    copy_weights_(ours, theirs)
    z = rand(2, c.latent_channels, 1, 4, 3)                               # (B, 4, 1, h, w)
    clear_caches_(theirs)
    expected = theirs(z)                                                  # (B, 3, 1, 8h, 8w)
    actual = ours(z, 0, 1)
    assert actual.shape == (2, 3, 1, 32, 24)
    compare(actual, expected, "decoder lone latent")


@torch.no_grad()
def test_vae_spacetime_upsampler_matches_diffusers_magvit():
    """Space-time Upsampler (nearest x2 in space, causal conv, linear x2 in time) vs
    EasyAnimateUpsampler3D(temporal_upsample=True, spatial_group_norm=False) on a chunk
    after the first. diffusers doubles frames only once its ``prev_features`` is set (its
    first call is the lone first latent), so the test makes that first call on a
    one-frame chunk, then clears the conv's cache (as between independent clips) so the
    conv pads causally as ours does; the doubling is diffusers' trilinear F.interpolate.

    Ours in causal mode is upstream V2's: the chunk's first frame is kept and only the
    others are doubled (T -> 2T - 1), where diffusers doubles all T. So our frame 0 is
    diffusers' conv output at frame 0 (diffusers' frames 0 and 1 average it with itself),
    our frame 1 blends no frame 0, and from our frame 2 on the two agree frame for frame,
    shifted by one."""
    m = magvit()
    ours = ours_vae.Upsampler(16, "spacetime", VAE_CFG).eval()
    theirs = m.EasyAnimateUpsampler3D(16, 16, temporal_upsample=True, spatial_group_norm=False).eval()
    randomise_(ours)
    copy_weights_(ours, theirs)
    clear_caches_(theirs)
    first = theirs(rand(2, 16, 1, 6, 5, seed=SEED + 2))
    assert first.shape[2] == 1  # the first call does not double
    theirs.conv._clear_conv_cache()
    x = rand(2, 16, 4, 6, 5)                                              # (B, C, T, H, W)
    expected = theirs(x)                                                  # (B, C, 2T, 2H, 2W)
    actual = ours(x)                                                      # (B, C, 2T-1, 2H, 2W)
    assert actual.shape == (2, 16, 7, 12, 10)
    compare(actual[:, :, 2:], expected[:, :, 3:], "upsampler spacetime, doubled frames")
    compare(actual[:, :, :1], expected[:, :, :1], "upsampler spacetime, kept first frame")
    assert (actual[:, :, 1] - expected[:, :, 2]).abs().max() > 1e-3  # the boundary frame differs


def _their_attention(channels: int):
    """diffusers' VAE attention as its UNetMidBlock2D builds it (one head)."""
    from diffusers.models.attention_processor import Attention

    return Attention(channels, heads=1, dim_head=channels, rescale_output_factor=1.0, eps=EPS,
                     norm_num_groups=GROUPS, residual_connection=True, bias=True,
                     upcast_softmax=True, _from_deprecated_attn_block=True)


def _attend(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a 4-D diffusers attention over all T*H*W positions of (B, C, T, H, W)."""
    b, c, t, h, w = x.shape
    return attn(x.reshape(b, c, t * h, w)).reshape(b, c, t, h, w)         # tokens row-major (T, H, W)


def _attn_rename(key: str) -> str:
    return re.sub(r"^to_out\.", "to_out.0.", key)


@torch.no_grad()
def test_vae_attention_matches_diffusers_attention():
    """Our VAE Attention (GroupNorm, one head over T*H*W tokens, residual) == diffusers'
    ``Attention`` with group norm and residual connection (AutoencoderKLMagvit has no
    attention of its own). Map: ``to_out`` -> ``to_out.0``."""
    require("diffusers")
    ours = ours_vae.Attention(16, VAE_CFG).eval()
    theirs = _their_attention(16).eval()
    randomise_(ours)
    copy_weights_(ours, theirs, _attn_rename)
    x = rand(2, 16, 3, 6, 5)                                              # (B, C, T, H, W)
    compare(ours(x), _attend(theirs, x), "vae attention")


class _TheirMidWithAttention(nn.Module):
    """EasyAnimateMidBlock3d's two res-blocks with diffusers' attention between them."""

    def __init__(self, mid: nn.Module, attn: nn.Module):
        super().__init__()
        self.mid, self.attn = mid, attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid.convs[0](x)
        return self.mid.convs[1](_attend(self.attn, x))


def _mid_rename(key: str) -> str:
    if key.startswith("attentions.0."):
        return "attn." + _attn_rename(key[len("attentions.0."):])
    return "mid." + key


@torch.no_grad()
def test_vae_mid_block_with_attention_matches_diffusers_parts():
    """Our MidBlock with attention (res, attn, res) == diffusers' res-blocks and attention
    composed in that order."""
    m = magvit()
    ours = ours_vae.MidBlock(16, VAE_CFG).eval()
    assert len(ours.attentions) == 1
    theirs = _TheirMidWithAttention(
        m.EasyAnimateMidBlock3d(16, num_layers=2, **RES_KW), _their_attention(16)).eval()
    randomise_(ours)
    copy_weights_(ours, theirs, _mid_rename)
    x = rand(2, 16, 4, 6, 5)                                              # (B, C, T, H, W)
    clear_caches_(theirs)
    compare(ours(x), theirs(x), "mid block with attention")
