"""Video DiT: PixArt-alpha backbone + motion module (Grid Reshape) + U-ViT skips.

DESIGN.md 1.3 / paper section 3.2. Module and parameter names follow the upstream
EasyAnimate checkpoint keys (DESIGN.md 1.6) so weights load without renaming.

Symbols used in shape comments:
    B batch, C latent channels, F latent frames, H, W latent height and width,
    h, w token grid (H / patch, W / patch), L = h*w tokens per frame, D hidden size,
    S text tokens, E caption channels, N attention sequence length, P patch size.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F_
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ShapeError
from .config import DiTConfig

MASK_BIAS = -10000.0  # added to attention logits of padded text tokens (PixArt convention)


# --- embeddings ----------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features, cosine half first (PixArt / diffusers flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                            # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)       # (B, dim)


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float32, device=pos.device) / (dim / 2.0))
    out = pos.reshape(-1, 1) * omega[None]                             # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)          # (M, dim)


def sincos_2d(dim: int, h: int, w: int, base: int, scale: float, device=None) -> torch.Tensor:
    """PixArt 2-D sin-cos table for an h x w grid, positions normalised to a base grid.

    Positions are ``i * base / size / scale`` so any size or aspect ratio maps onto the
    same range the model was trained on. The first half of the channels encodes the
    column, the second half the row; tokens are row-major. Computed in float32 so the
    exported graph has no float64 ops.
    """
    ys = torch.arange(h, dtype=torch.float32, device=device) / (h / base) / scale
    xs = torch.arange(w, dtype=torch.float32, device=device) / (w / base) / scale
    grid_y = ys[:, None].expand(h, w).reshape(-1)                      # (L,)
    grid_x = xs[None, :].expand(h, w).reshape(-1)                      # (L,)
    return torch.cat([_sincos_1d(dim // 2, grid_x), _sincos_1d(dim // 2, grid_y)], dim=1)  # (L, D)


def sincos_1d_interleaved(dim: int, length: int) -> torch.Tensor:
    """AnimateDiff frame positions: sin on even channels, cos on odd channels."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, length, dim)
    pe[0, :, 0::2] = torch.sin(position * div_term)
    pe[0, :, 1::2] = torch.cos(position * div_term)
    return pe                                                          # (1, length, D)


class PatchEmbed(nn.Module):
    """Conv2d k=P s=P per frame; the position table is added by the caller."""

    def __init__(self, in_channels: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)                                               # (B*F, D, h, w)
        return x.flatten(2).transpose(1, 2)                            # (B*F, L, D)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(t_freq)))


class _TimestepEmbeddings(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedder(dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.timestep_embedder(timestep_embedding(t))


class AdaLNSingle(nn.Module):
    """AdaLN-single (PixArt-alpha section 2.3): one MLP for all blocks' modulation."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = _TimestepEmbeddings(dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embedded = self.emb(t)                                         # (B, D)
        return self.linear(self.silu(embedded)), embedded              # (B, 6D), (B, D)


class CaptionProjection(nn.Module):
    def __init__(self, in_features: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, dim)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(x)))


# --- attention and feed-forward --------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention through SDPA; ``to_out.0`` matches the diffusers key layout."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True, context_dim: int | None = None):
        super().__init__()
        self.heads = heads
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim, dim, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, d = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)    # (B, heads, N, D/heads)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        out = F_.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, heads, N, D/heads)
        out = out.transpose(1, 2).reshape(b, n, d)                     # (B, N, D)
        return self.to_out[0](out)


class _Proj(nn.Module):
    """A Linear under the attribute name ``proj`` (diffusers GELU/GEGLU key layout)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)


class FeedForward(nn.Module):
    """``net.0.proj`` -> activation -> ``net.2``; tanh-GELU (PixArt) or GEGLU (AnimateDiff)."""

    def __init__(self, dim: int, mult: int = 4, gated: bool = False):
        super().__init__()
        inner = dim * mult
        self.gated = gated
        self.net = nn.ModuleList([_Proj(dim, inner * 2 if gated else inner), nn.Dropout(0.0),
                                  nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.net[0].proj(x)
        if self.gated:
            h, gate = h.chunk(2, dim=-1)
            h = h * F_.gelu(gate)
        else:
            h = F_.gelu(h, approximate="tanh")
        return self.net[2](h)


# --- motion module ---------------------------------------------------------------------

class TemporalAttention(Attention):
    """Attention over a sequence of frames (or all clip tokens), with frame positions
    added to the attention input only (AnimateDiff VersatileAttention). Without
    ``position_encoding`` there is no table and nothing is added (upstream's
    temporal_position_encoding false: its pos_encoder is None)."""

    def __init__(self, dim: int, heads: int, max_positions: int, position_encoding: bool = True):
        super().__init__(dim, heads, qkv_bias=False)
        self.pos_encoder = _PositionalEncoding(dim, max_positions) if position_encoding else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:  # type: ignore[override]
        if self.pos_encoder is not None and positions is not None:
            pe = self.pos_encoder.pe[0].index_select(0, positions)     # (N, D)
            x = x + pe.to(x.dtype)
        return super().forward(x)


class _PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_positions: int):
        super().__init__()
        # Saved in upstream checkpoints (DESIGN.md 1.6), so persistent.
        self.register_buffer("pe", sincos_1d_interleaved(dim, max_positions), persistent=True)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_positions: int, position_encoding: bool = True):
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalAttention(dim, heads, max_positions, position_encoding)
                                               for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim, gated=True)
        self.ff_norm = nn.LayerNorm(dim)


class TemporalTransformer(nn.Module):
    def __init__(self, dim: int, heads: int, groups: int, max_positions: int, position_encoding: bool = True):
        super().__init__()
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(dim, heads, max_positions,
                                                                          position_encoding)])
        self.proj_out = nn.Linear(dim, dim)


class MotionModule(nn.Module):
    """GroupNorm -> Linear -> temporal block (2 attentions + GEGLU FF) -> Linear, residual.

    ``block_size`` 2 is the paper's Grid Reshape: each 2x2 token neighbourhood is
    folded into the temporal sequence (4F tokens, frame-major, the 4 tokens of a frame
    share its position). ``global_second`` replaces the second temporal attention by
    attention over all F*L tokens of the clip (V3 hybrid motion module).
    ``photo_without_positions``: a single frame gets no position in the temporal
    attentions (upstream's remove_time_embedding_in_photo, motion_module.py:396-401 at
    f9eeabe); the global attention adds its table regardless (motion_module.py:416-417).
    """

    def __init__(self, dim: int, heads: int, groups: int, max_positions: int,
                 block_size: int, global_second: bool, position_encoding: bool = True,
                 photo_without_positions: bool = False):
        super().__init__()
        self.block_size = block_size
        self.global_second = global_second
        self.photo_without_positions = photo_without_positions
        self.temporal_transformer = TemporalTransformer(dim, heads, groups, max_positions, position_encoding)

    def forward(self, x: torch.Tensor, frames: int, h: int, w: int) -> torch.Tensor:
        tt = self.temporal_transformer
        block = tt.transformer_blocks[0]
        bf, l, d = x.shape
        b, s = bf // frames, self.block_size
        residual = x
        y = x.transpose(1, 2).reshape(bf, d, h, w)                     # (B*F, D, h, w)
        y = tt.norm(y).flatten(2).transpose(1, 2)                      # (B*F, L, D)
        y = tt.proj_in(y)
        # Sequences for temporal attention.
        y = y.reshape(b, frames, h // s, s, w // s, s, d)              # (B, F, h/s, s, w/s, s, D)
        y = y.permute(0, 2, 4, 1, 3, 5, 6)                             # (B, h/s, w/s, F, s, s, D)
        y = y.reshape(b * (h // s) * (w // s), frames * s * s, d)      # (B*L/s^2, F*s^2, D)
        positions = torch.arange(frames, device=x.device).repeat_interleave(s * s)  # (F*s^2,)
        temporal_positions = None if self.photo_without_positions and frames == 1 else positions
        for j, (attn, norm) in enumerate(zip(block.attention_blocks, block.norms)):
            if j == 1 and self.global_second:
                g = self._to_clip(y, b, frames, h, w)                  # (B, F*L, D)
                g_pos = torch.arange(frames, device=x.device).repeat_interleave(l)  # (F*L,)
                g = attn(norm(g), g_pos) + g
                y = self._from_clip(g, b, frames, h, w)                # (B*L/s^2, F*s^2, D)
            else:
                y = attn(norm(y), temporal_positions) + y
        y = block.ff(block.ff_norm(y)) + y
        y = self._to_clip(y, b, frames, h, w).reshape(bf, l, d)        # (B*F, L, D)
        return tt.proj_out(y) + residual

    def _to_clip(self, y: torch.Tensor, b: int, frames: int, h: int, w: int) -> torch.Tensor:
        s, d = self.block_size, y.shape[-1]
        y = y.reshape(b, h // s, w // s, frames, s, s, d)
        y = y.permute(0, 3, 1, 4, 2, 5, 6)                             # (B, F, h/s, s, w/s, s, D)
        return y.reshape(b, frames * h * w, d)                         # (B, F*L, D)

    def _from_clip(self, g: torch.Tensor, b: int, frames: int, h: int, w: int) -> torch.Tensor:
        s, d = self.block_size, g.shape[-1]
        g = g.reshape(b, frames, h // s, s, w // s, s, d).permute(0, 2, 4, 1, 3, 5, 6)
        return g.reshape(b * (h // s) * (w // s), frames * s * s, d)   # (B*L/s^2, F*s^2, D)


# --- transformer block -------------------------------------------------------------------

class VideoDiTBlock(nn.Module):
    """Spatial self-attn -> motion module -> cross-attn (un-normalised) -> FF (DESIGN.md 1.3)."""

    def __init__(self, cfg: DiTConfig, index: int):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn1 = Attention(d, cfg.num_attention_heads)
        self.attn2 = Attention(d, cfg.num_attention_heads)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.ff = FeedForward(d, cfg.mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, d))
        self.attn_temporal = None
        if cfg.motion_module:
            # upstream builds block d from motion_module_kwargs_even if d % 2 == 0 else _odd
            # (transformer3d.py:306 at f9eeabe): the odd blocks' heads may differ
            self.attn_temporal = MotionModule(
                d, cfg.motion_heads(index), cfg.motion_norm_groups, cfg.temporal_max_positions,
                cfg.temporal_block_size, global_second=cfg.hybrid_global_attention and index % 2 == 1,
                position_encoding=cfg.temporal_position_encoding,
                photo_without_positions=cfg.remove_time_embedding_in_photo)

    def modulation(self, t6: torch.Tensor, frames: int) -> tuple[torch.Tensor, ...]:
        """AdaLN-single: (shift, scale, gate) for attention and for the MLP, (B*F, 1, D) each."""
        d = self.scale_shift_table.shape[1]
        mod = self.scale_shift_table[None] + t6.reshape(-1, 6, d)      # (B, 6, D)
        mod = mod.repeat_interleave(frames, dim=0)                     # (B*F, 6, D)
        return mod.chunk(6, dim=1)

    def modulated_input(self, x: torch.Tensor, t6: torch.Tensor, frames: int) -> torch.Tensor:
        """What the spatial attention sees: the timestep-modulated norm of ``x`` (TeaCache's signal)."""
        shift_msa, scale_msa = self.modulation(t6, frames)[:2]
        return self.norm1(x) * (1 + scale_msa) + shift_msa

    def forward(self, x: torch.Tensor, t6: torch.Tensor, text: torch.Tensor,
                text_bias: torch.Tensor | None, frames: int, h: int, w: int) -> torch.Tensor:
        bf, l, d = x.shape
        b = bf // frames
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation(t6, frames)
        # 1. spatial self-attention per frame
        y = self.norm1(x) * (1 + scale_msa) + shift_msa
        x = x + gate_msa * self.attn1(y)
        # 2. motion module (its own residual)
        if self.attn_temporal is not None:
            x = self.attn_temporal(x, frames, h, w)
        # 3. cross-attention of every clip token to the text, on the un-normalised stream
        xc = x.reshape(b, frames * l, d)                               # (B, F*L, D)
        x = (xc + self.attn2(xc, text, text_bias)).reshape(bf, l, d)   # (B*F, L, D)
        # 4. feed-forward
        y = self.norm2(x) * (1 + scale_mlp) + shift_mlp
        return x + gate_mlp * self.ff(y)


# --- the model ---------------------------------------------------------------------------

class StepContext(NamedTuple):
    """What every block and the final layer read besides the tokens (VideoDiT.embed)."""

    t6: torch.Tensor                 # (B, 6D) AdaLN-single modulation
    t_emb: torch.Tensor              # (B, D) embedded timestep (final layer)
    text: torch.Tensor               # (B, S[+T], D) projected caption [+ CLIP tokens]
    text_bias: torch.Tensor | None   # (B, 1, 1, S[+T]) additive attention mask
    frames: int
    h: int                           # token grid
    w: int


class VideoDiT(nn.Module):
    """EasyAnimate video DiT.

    forward(latents (B, C, F, H, W), timestep (B,), text (B, S, E), text_mask (B, S))
        -> (B, 2C or C, F, H, W): noise prediction (+ learned-variance channels).

    InP models (``config.inpaint``) also take ``inpaint_latents`` (B, 2C, F, H, W): mask
    latents and masked-video latents, concatenated to the noisy latents on channels; and,
    with ``config.clip_channels``, ``clip_embeds`` (B, K) with ``clip_mask`` (B, T): a CLIP
    image embedding projected to T extra text tokens. Missing ones are zeros, and a zero
    CLIP mask hides the CLIP tokens (upstream's text-to-video and negative branch).
    """

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        d, p = config.hidden_size, config.patch_size
        self.gradient_checkpointing = False
        self.pos_embed = PatchEmbed(config.patch_in_channels, d, p)
        self.adaln_single = AdaLNSingle(d)
        self.caption_projection = CaptionProjection(config.caption_channels, d)
        # InP: the CLIP image embedding becomes clip_tokens tokens of width D (upstream
        # CLIPProjection: Linear -> tanh-GELU -> Linear, the second zero-initialised).
        self.clip_projection = (CaptionProjection(config.clip_channels, d * config.clip_tokens)
                                if config.clip_channels else None)
        self.transformer_blocks = nn.ModuleList([VideoDiTBlock(config, i) for i in range(config.num_layers)])
        self.long_connect_fc = nn.ModuleList([nn.Linear(d, d) for _ in range(config.num_skips)])
        self.norm_out = nn.LayerNorm(d, eps=1e-6, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, d))
        self.proj_out = nn.Linear(d, p * p * config.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PixArt init for the backbone; zero init for skips and motion-module outputs so a
        freshly initialised video model equals the image model (DESIGN.md 1.3)."""
        d = self.config.hidden_size

        def _basic(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic)
        w = self.pos_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        te = self.adaln_single.emb.timestep_embedder
        nn.init.normal_(te.linear_1.weight, std=0.02)
        nn.init.normal_(te.linear_2.weight, std=0.02)
        nn.init.normal_(self.adaln_single.linear.weight, std=0.02)
        nn.init.normal_(self.caption_projection.linear_1.weight, std=0.02)
        nn.init.normal_(self.caption_projection.linear_2.weight, std=0.02)
        if self.clip_projection is not None:
            nn.init.zeros_(self.clip_projection.linear_2.weight)
            nn.init.zeros_(self.clip_projection.linear_2.bias)
        with torch.no_grad():
            self.scale_shift_table.copy_(torch.randn(2, d) / d ** 0.5)
            for blk in self.transformer_blocks:
                blk.scale_shift_table.copy_(torch.randn(6, d) / d ** 0.5)
        for blk in self.transformer_blocks:
            # PixArt zero-inits the cross-attention output so text enters gradually.
            nn.init.zeros_(blk.attn2.to_out[0].weight)
            nn.init.zeros_(blk.attn2.to_out[0].bias)
            if blk.attn_temporal is not None:
                out = blk.attn_temporal.temporal_transformer.proj_out
                nn.init.zeros_(out.weight)
                nn.init.zeros_(out.bias)
        for fc in self.long_connect_fc:
            nn.init.zeros_(fc.weight)
            nn.init.zeros_(fc.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def check_input_shape(self, latents_shape: tuple[int, ...]) -> None:
        """Raise ShapeError unless the latents can be patched (and grid-reshaped)."""
        cfg = self.config
        if len(latents_shape) != 5 or latents_shape[1] != cfg.in_channels:
            raise ShapeError(
                f"latents must have shape (B, {cfg.in_channels}, F, H, W), got {tuple(latents_shape)}")
        mult = cfg.latent_multiple
        for name, size in (("height", latents_shape[3]), ("width", latents_shape[4])):
            if size % mult:
                raise ShapeError(f"latent {name} must be a multiple of {mult}, got {size}")

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
                text_mask: torch.Tensor | None = None, inpaint_latents: torch.Tensor | None = None,
                clip_embeds: torch.Tensor | None = None, clip_mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        x, ctx = self.embed(latents, timestep, text, text_mask, inpaint_latents, clip_embeds, clip_mask)
        x = self.run_blocks(x, ctx, 0, self.config.num_layers, [])
        return self.final_layer(x, ctx)

    # The forward pass in three parts, so that step caching (runtime/step_cache.py) can
    # run the first block every step and the rest only when its cache says so:
    #   embed -> run_blocks(0, 1) = head, run_blocks(1, depth) -> final_layer = tail.

    def embed(self, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor,
              text_mask: torch.Tensor | None = None, inpaint_latents: torch.Tensor | None = None,
              clip_embeds: torch.Tensor | None = None, clip_mask: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, "StepContext"]:
        """Patch, timestep and caption embeddings: (tokens (B*F, L, D), the context every
        block and the final layer read)."""
        cfg = self.config
        b, c, frames, hh, ww = latents.shape
        p = cfg.patch_size
        h, w = hh // p, ww // p
        if timestep.ndim == 0:
            timestep = timestep.expand(b)
        # 0. InP: mask + masked-video latents on channels (zeros = nothing given)
        if cfg.inpaint:
            if inpaint_latents is None:
                inpaint_latents = latents.new_zeros(b, cfg.inpaint_channels, frames, hh, ww)
            latents = torch.cat([latents, inpaint_latents.to(latents.dtype)], dim=1)  # (B, 3C, F, H, W)
            c = latents.shape[1]
        # 1. patch embed every frame, add the (frame-independent) 2-D positions
        x = latents.permute(0, 2, 1, 3, 4).reshape(b * frames, c, hh, ww)  # (B*F, C, H, W)
        x = self.pos_embed(x)                                          # (B*F, L, D)
        pos = sincos_2d(cfg.hidden_size, h, w, cfg.base_grid, cfg.interpolation_scale, x.device)
        x = x + pos.to(x.dtype)[None]
        # 2. timestep (AdaLN-single) and caption
        t6, t_emb = self.adaln_single(timestep)                        # (B, 6D), (B, D)
        t6, t_emb = t6.to(x.dtype), t_emb.to(x.dtype)
        text = self.caption_projection(text.to(x.dtype))               # (B, S, D)
        if self.clip_projection is not None:
            # CLIP tokens follow the text tokens; a zero clip_mask hides them.
            if clip_embeds is None:
                clip_embeds = text.new_zeros(b, cfg.clip_channels)
            if clip_mask is None:
                clip_mask = text.new_zeros(b, cfg.clip_tokens)
            clip = self.clip_projection(clip_embeds.to(x.dtype)).reshape(b, cfg.clip_tokens, -1)  # (B, T, D)
            text = torch.cat([text, clip], dim=1)                      # (B, S+T, D)
            if text_mask is None:
                text_mask = text.new_ones(b, text.shape[1] - cfg.clip_tokens)
            text_mask = torch.cat([text_mask.to(clip_mask.dtype), clip_mask], dim=1)  # (B, S+T)
        text_bias = None
        if text_mask is not None:
            text_bias = ((1 - text_mask.to(x.dtype)) * MASK_BIAS)[:, None, None, :]  # (B, 1, 1, S)
        return x, StepContext(t6, t_emb, text, text_bias, frames, h, w)

    def run_blocks(self, x: torch.Tensor, ctx: "StepContext", start: int, stop: int,
                   skips: list[torch.Tensor]) -> torch.Tensor:
        """Blocks ``start`` .. ``stop - 1`` with the U-ViT long skips (DiTConfig.skip_plan:
        the first ``sources`` blocks keep their outputs, block ``first + k`` adds
        ``long_connect_fc[k]`` of the one kept last); ``skips`` holds those run so far."""
        sources, first, takers = self.config.skip_plan
        for i in range(start, stop):
            blk = self.transformer_blocks[i]
            if first <= i < first + takers:
                x = x + self.long_connect_fc[i - first](skips.pop())
            if self.gradient_checkpointing and self.training:
                x = checkpoint(blk, x, ctx.t6, ctx.text, ctx.text_bias, ctx.frames, ctx.h, ctx.w,
                               use_reentrant=False)
            else:
                x = blk(x, ctx.t6, ctx.text, ctx.text_bias, ctx.frames, ctx.h, ctx.w)
            if i < sources:
                skips.append(x)
        return x

    def final_layer(self, x: torch.Tensor, ctx: "StepContext") -> torch.Tensor:
        """Tokens after the last block -> (B, C', F, H, W)."""
        cfg = self.config
        frames, h, w, p = ctx.frames, ctx.h, ctx.w, cfg.patch_size
        b = x.shape[0] // frames
        shift, scale = (self.scale_shift_table[None] + ctx.t_emb[:, None]).chunk(2, dim=1)  # (B, 1, D) x2
        shift = shift.repeat_interleave(frames, dim=0)
        scale = scale.repeat_interleave(frames, dim=0)
        x = self.norm_out(x) * (1 + scale) + shift
        x = self.proj_out(x)                                           # (B*F, L, P*P*C')
        co = cfg.out_channels
        x = x.reshape(b, frames, h, w, p, p, co)
        x = x.permute(0, 6, 1, 2, 4, 3, 5)                             # (B, C', F, h, P, w, P)
        return x.reshape(b, co, frames, h * p, w * p)                  # (B, C', F, H, W)
