"""The Slice VAE of EasyAnimate (DESIGN.md 1.2): a MagViT-style 3-D convolutional VAE
that encodes and decodes long videos slice by slice, so peak memory is set by one
slice and not by the video length.

Compression: spatial x8 (``config.spatial_compression``), temporal x4
(``config.temporal_compression``), ``config.latent_channels`` latent channels; latents
outside this module are scaled by ``config.scaling_factor``.

Slicing (``slice_frames`` = 8 pixel frames = 2 latent frames per slice):
- encode: an odd video's frame 0 is encoded alone (-> 1 latent frame); the rest is cut
  into 8-frame slices encoded independently (-> 2 latent frames each).
- decode: an odd latent's frame 0 is decoded alone (-> 1 frame); the rest is cut into
  2-latent slices. Each slice is decoded with its previous and next slices concatenated
  in time for ``conv_in`` and the mid block (up to 6 latent frames, the "context"),
  then cropped to its own 2 latents before the up-blocks (-> 8 frames). The lone first
  latent is nobody's neighbour. :meth:`SliceVAE.slice_plan` lists the contexts and
  :meth:`SliceVAE.decode_slice` decodes one; :meth:`SliceVAE.iter_decode` streams.

Upstream facts this follows (EasyAnimate ``vae/ldm``): down-sampling convs pad the
right and bottom by one pixel (not both sides); the space-time up-sampler doubles frames
by linear interpolation (``align_corners=False``) after its conv; the mid block is
``mid_block_layers`` res-blocks with an attention between each pair (upstream:
``layers_per_block`` of them).

Shapes in comments: B batch; C channels of the current layer; T, H, W frames, height
and width of the tensor at hand (pixel sizes at the top of the network, latent sizes
at the bottom), a prime marking a size after resampling; F pixel frames of a video;
h, w latent height and width (H/8, W/8); Tc latent frames of a decoder context;
L = T*H*W attention tokens; Ht, Wt the pixel size of a spatial tile.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError, ShapeError
from .config import SliceSpec, VAEConfig

__all__ = ["SliceVAE", "SliceSpec"]

# Upstream DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)


# --- building blocks ------------------------------------------------------------------


class PaddedConv3d(nn.Conv3d):
    """Conv3d with kernel 3 and the temporal padding of ``padding_mode``.

    "slice": zero-pad 1 frame on each side; "causal": replicate the first frame twice in
    front, so output frame t sees input frames <= t (with stride 2: <= 2t). Spatially
    zero-pad 1 on each side, or, for a spatial stride of 2, 1 on the right and bottom
    only (as upstream), so H -> H/2 for even H.
    """

    def __init__(self, in_channels: int, out_channels: int, padding_mode: str,
                 stride: tuple[int, int, int] = (1, 1, 1)):
        causal = padding_mode == "causal"
        halve = stride[1] > 1
        super().__init__(in_channels, out_channels, kernel_size=3, stride=stride,
                         padding=(0 if causal else 1, 0 if halve else 1, 0 if halve else 1))
        self.causal = causal
        self.halve = halve

    def forward(self, x: Tensor) -> Tensor:
        if self.halve:
            x = F.pad(x, (0, 1, 0, 1))                                      # (B, C, T, H+1, W+1)
        if self.causal:
            x = torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2)            # (B, C, T+2, H, W)
        return super().forward(x)


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, plus a 1x1x1 shortcut when channels change."""

    def __init__(self, in_channels: int, out_channels: int, config: VAEConfig):
        super().__init__()
        groups, eps, mode = config.norm_num_groups, config.norm_eps, config.padding_mode
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = PaddedConv3d(in_channels, out_channels, mode)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = PaddedConv3d(out_channels, out_channels, mode)
        self.shortcut = (nn.Conv3d(in_channels, out_channels, kernel_size=1)
                         if in_channels != out_channels else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                                # (B, C_out, T, H, W)
        h = self.conv2(F.silu(self.norm2(h)))
        return self.shortcut(x) + h


class Attention(nn.Module):
    """Single-head self-attention over all T*H*W positions, GroupNorm first, residual."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        self.group_norm = nn.GroupNorm(config.norm_num_groups, channels, eps=config.norm_eps)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        h = self.group_norm(x).flatten(2).transpose(1, 2)                   # (B, L, C)
        q = self.to_q(h).unsqueeze(1)                                       # (B, 1, L, C)
        k = self.to_k(h).unsqueeze(1)
        v = self.to_v(h).unsqueeze(1)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)              # (B, L, C)
        h = self.to_out(h).transpose(1, 2).reshape_as(x)                    # (B, C, T, H, W)
        return x + h


class MidBlock(nn.Module):
    """``mid_block_layers`` res-blocks with one attention between each pair (unless
    ``mid_block_attention`` is off): res, attn, res for the release value 2. Upstream
    builds ``layers_per_block`` res-blocks this way; our own small models keep 2."""

    def __init__(self, channels: int, config: VAEConfig):
        super().__init__()
        n = config.mid_block_layers
        self.convs = nn.ModuleList([ResBlock(channels, channels, config) for _ in range(n)])
        self.attentions = nn.ModuleList(
            [Attention(channels, config) for _ in range(n - 1)] if config.mid_block_attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.convs[0](x)
        for i, conv in enumerate(self.convs[1:]):
            if self.attentions:
                x = self.attentions[i](x)
            x = conv(x)
        return x


class Downsampler(nn.Module):
    """Strided conv: "spatial" stride (1, 2, 2); "spacetime" stride (2, 2, 2), T -> floor((T-1)/2)+1."""

    def __init__(self, channels: int, kind: str, config: VAEConfig):
        super().__init__()
        stride = (2, 2, 2) if kind == "spacetime" else (1, 2, 2)
        self.conv = PaddedConv3d(channels, channels, config.padding_mode, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)                                                 # (B, C, T', H/2, W/2)


def double_frames(x: Tensor) -> Tensor:
    """x2 in time by linear interpolation, ``align_corners=False`` (what
    ``F.interpolate(mode="trilinear", scale_factor=(2, 1, 1))`` computes), written with
    slices so it exports to ONNX without a 5-D Resize."""
    prev = torch.cat([x[:, :, :1], x[:, :, :-1]], dim=2)                    # (B, C, T, H, W)
    nxt = torch.cat([x[:, :, 1:], x[:, :, -1:]], dim=2)
    even = 0.75 * x + 0.25 * prev
    odd = 0.75 * x + 0.25 * nxt
    return torch.stack([even, odd], dim=3).flatten(2, 3)                    # (B, C, 2T, H, W)


class Upsampler(nn.Module):
    """Nearest x2 in space, conv, then ("spacetime") x2 in time; a single frame stays one.
    In causal mode (V2) the first frame is kept as it is and only the others are
    doubled (T -> 1 + 2(T-1)), as upstream's causal up-sampler does."""

    def __init__(self, channels: int, kind: str, config: VAEConfig):
        super().__init__()
        self.temporal = kind == "spacetime"
        self.keep_first = config.padding_mode == "causal"
        self.conv = PaddedConv3d(channels, channels, config.padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")  # (B, C, T, 2H, 2W)
        x = self.conv(x)
        if self.temporal and x.shape[2] > 1:
            if self.keep_first:
                x = torch.cat([x[:, :, :1], double_frames(x[:, :, 1:])], dim=2)  # (B, C, 2T-1, 2H, 2W)
            else:
                x = double_frames(x)                                        # (B, C, 2T, 2H, 2W)
        return x


class _Level(nn.Module):
    """One level of the encoder or decoder: ``num_layers`` res-blocks, then an optional
    resampler stored under ``resampler_name`` (upstream's key: ``downsampler`` or
    ``upsampler``)."""

    resampler_name = ""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, config: VAEConfig,
                 resampler: nn.Module | None):
        super().__init__()
        self.convs = nn.ModuleList(
            [ResBlock(in_channels if i == 0 else out_channels, out_channels, config)
             for i in range(num_layers)])
        setattr(self, self.resampler_name, resampler)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = conv(x)                                                     # (B, C_out, T, H, W)
        resampler = getattr(self, self.resampler_name)
        return x if resampler is None else resampler(x)


class DownBlock(_Level):
    resampler_name = "downsampler"

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, kind: str,
                 config: VAEConfig):
        super().__init__(in_channels, out_channels, num_layers, config,
                         Downsampler(out_channels, kind, config) if kind != "none" else None)


class UpBlock(_Level):
    resampler_name = "upsampler"

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, kind: str,
                 config: VAEConfig):
        super().__init__(in_channels, out_channels, num_layers, config,
                         Upsampler(out_channels, kind, config) if kind != "none" else None)


# --- encoder and decoder --------------------------------------------------------------


class Encoder(nn.Module):
    """One slice of pixels -> (mean, logvar) stacked on channels, before ``quant_conv``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = config.block_out_channels
        self.conv_in = PaddedConv3d(config.in_channels, channels[0], config.padding_mode)
        self.down_blocks = nn.ModuleList()
        prev = channels[0]
        for c, kind in zip(channels, config.down_block_types):
            self.down_blocks.append(DownBlock(prev, c, config.layers_per_block, kind, config))
            prev = c
        self.mid_block = MidBlock(prev, config)
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, prev, eps=config.norm_eps)
        self.conv_out = PaddedConv3d(prev, 2 * config.latent_channels, config.padding_mode)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)                                                 # (B, C, F, H, W)
        for block in self.down_blocks:
            x = block(x)                                                    # (B, C, T, H', W')
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))                 # (B, 2*4, T, h, w)


class Decoder(nn.Module):
    """A latent context -> the pixels of its slice ``[start, start + length)``."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        channels = tuple(reversed(config.block_out_channels))
        self.conv_in = PaddedConv3d(config.latent_channels, channels[0], config.padding_mode)
        self.mid_block = MidBlock(channels[0], config)
        self.up_blocks = nn.ModuleList()
        prev = channels[0]
        for c, kind in zip(channels, config.up_block_types):
            self.up_blocks.append(UpBlock(prev, c, config.layers_per_block + 1, kind, config))
            prev = c
        self.conv_norm_out = nn.GroupNorm(config.norm_num_groups, prev, eps=config.norm_eps)
        self.conv_out = PaddedConv3d(prev, config.out_channels, config.padding_mode)

    def forward(self, z: Tensor, start: int, length: int) -> Tensor:
        # Neighbour sharing (DESIGN.md 1.2): conv_in and the mid block see the whole
        # context; the up-blocks only the current slice.
        x = self.conv_in(z)                                                 # (B, C, Tc, h, w)
        x = self.mid_block(x)
        x = x[:, :, start:start + length]                                   # (B, C, T, h, w)
        for block in self.up_blocks:
            x = block(x)                                                    # (B, C', T', H', W')
        return self.conv_out(F.silu(self.conv_norm_out(x)))                 # (B, 3, F, H, W)


# --- the VAE --------------------------------------------------------------------------


class SliceVAE(nn.Module):
    """Slice VAE built from a :class:`VAEConfig`. Key names follow the upstream
    checkpoint (DESIGN.md 1.6), so ``load_state_dict`` takes upstream weights."""

    def __init__(self, config: VAEConfig | None = None):
        super().__init__()
        self.config = config = config if config is not None else VAEConfig()
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv3d(2 * config.latent_channels, 2 * config.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(config.latent_channels, config.latent_channels, 1)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """PyTorch's default init everywhere (convs and linears kaiming-uniform, GroupNorm
        weight 1 and bias 0). Nothing is zeroed: no branch of the VAE has to start as the
        identity (unlike the DiT's motion modules and skips), and upstream trains it from
        this init."""
        for module in self.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear, nn.GroupNorm)):
                module.reset_parameters()

    # -- slicing plans ------------------------------------------------------------------

    def frame_slices(self, frames: int) -> list[tuple[int, int]]:
        """Pixel frame ranges the encoder sees independently (:meth:`VAEConfig.frame_slices`)."""
        return self.config.frame_slices(frames)

    def slice_plan(self, latent_frames: int) -> list[SliceSpec]:
        """What :meth:`decode` does for ``latent_frames`` latents (:meth:`VAEConfig.slice_plan`)."""
        return self.config.slice_plan(latent_frames)

    def decoded_frames(self, length: int) -> int:
        """Pixel frames a slice of ``length`` latents decodes to (a lone latent -> 1)."""
        return self.config.decoded_frames(length)

    # -- encoding -----------------------------------------------------------------------

    def _check_video(self, video: Tensor) -> None:
        c = self.config
        if video.ndim != 5 or video.shape[1] != c.in_channels:
            raise ShapeError(f"video must have shape (batch, {c.in_channels}, frames, height, "
                             f"width), got {tuple(video.shape)}")
        c.frame_slices(video.shape[2])  # raises where this VAE cannot take the length
        s = c.spatial_compression
        for name, size in (("height", video.shape[3]), ("width", video.shape[4])):
            if size % s:
                raise ShapeError(f"video {name} must be a multiple of {s}, got {size}")

    def _moments(self, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled posterior (mean, logvar) of one independent slice."""
        moments = self.quant_conv(self.encoder(frames))                     # (B, 2*4, T, h, w)
        mean, logvar = moments.chunk(2, dim=1)                              # (B, 4, T, h, w)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def encode_slice(self, frames: Tensor, sample: bool = False,
                     generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of one slice encoded on its own (1 or ``slice_frames`` frames);
        the per-slice graph the exporter exports. No input validation here."""
        mean, logvar = self._moments(frames)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype,
                                device=mean.device)
            z = mean + torch.exp(0.5 * logvar) * noise
        return z * self.config.scaling_factor                               # (B, 4, T, h, w)

    def encode(self, video: Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> Tensor:
        """Video (B, 3, F, H, W) in [-1, 1] -> scaled latents (B, 4, F', H/8, W/8), the
        posterior mean, or a sample from it when ``sample``."""
        self._check_video(video)
        parts = [self.encode_slice(video[:, :, a:b], sample, generator)
                 for a, b in self.frame_slices(video.shape[2])]
        return torch.cat(parts, dim=2)                                      # (B, 4, F', h, w)

    def encode_posterior(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Unscaled posterior (mean, logvar), each (B, 4, F', H/8, W/8), for the KL term."""
        self._check_video(video)
        means, logvars = zip(*(self._moments(video[:, :, a:b])
                               for a, b in self.frame_slices(video.shape[2])))
        return torch.cat(means, dim=2), torch.cat(logvars, dim=2)

    # -- decoding -----------------------------------------------------------------------

    def decode_slice(self, context: Tensor, start: int, length: int) -> Tensor:
        """Decode one slice with neighbour sharing; the per-slice graph the exporter exports.

        ``context`` (B, 4, Tc, h, w) holds scaled latents [previous, current, next];
        the current slice is ``context[:, :, start:start + length]``. Returns (B, 3, F, H, W)
        with F = ``decoded_frames(length)``, in about [-1, 1] and not clamped (the
        pipeline clamps). ``start`` and ``length`` are Python ints: every distinct
        (Tc, start, length) is a distinct graph (see :meth:`slice_plan`).
        """
        if context.ndim != 5 or context.shape[1] != self.config.latent_channels:
            raise ShapeError(f"latents must have shape (batch, {self.config.latent_channels}, "
                             f"frames, height, width), got {tuple(context.shape)}")
        if not (0 <= start and 1 <= length and start + length <= context.shape[2]):
            raise ShapeError(f"slice [{start}, {start + length}) must lie inside the context "
                             f"of {context.shape[2]} latent frames")
        z = self.post_quant_conv(context / self.config.scaling_factor)      # (B, 4, Tc, h, w)
        return self.decoder(z, start, length)                               # (B, 3, F, H, W)

    def iter_decode(self, latents: Tensor, tile_size: int | tuple[int, int] | None = None,
                    tile_overlap: int | tuple[int, int] | None = None) -> Iterator[Tensor]:
        """Yield the decoded frames of each slice in turn (memory of one slice).

        With ``tile_size`` (latent units) each slice is decoded in overlapping spatial
        tiles blended with linear ramps; ``tile_overlap`` defaults to a quarter tile.
        A latent no larger than one tile is decoded untiled.
        """
        self._check_latents(latents)
        tiles = _tiling(latents.shape[-2:], tile_size, tile_overlap)
        for spec in self.slice_plan(latents.shape[2]):
            context = latents[:, :, spec.ctx_start:spec.ctx_end]            # (B, 4, Tc, h, w)
            if tiles is None:
                yield self.decode_slice(context, spec.start, spec.length)
            else:
                yield _decode_tiled(
                    lambda z, s=spec: self.decode_slice(z, s.start, s.length), context,
                    *tiles, scale=self.config.spatial_compression)

    def decode(self, latents: Tensor, tile_size: int | tuple[int, int] | None = None,
               tile_overlap: int | tuple[int, int] | None = None) -> Tensor:
        """Scaled latents (B, 4, T, h, w) -> video (B, 3, F, 8h, 8w), not clamped.
        The concatenation of :meth:`iter_decode`."""
        return torch.cat(list(self.iter_decode(latents, tile_size, tile_overlap)), dim=2)

    def _check_latents(self, latents: Tensor) -> None:
        if latents.ndim != 5 or latents.shape[1] != self.config.latent_channels:
            raise ShapeError(f"latents must have shape (batch, {self.config.latent_channels}, "
                             f"frames, height, width), got {tuple(latents.shape)}")

    def forward(self, video: Tensor, generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """Training pass: (reconstruction, mean, logvar), decoding a posterior sample."""
        mean, logvar = self.encode_posterior(video)
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        z = mean + torch.exp(0.5 * logvar) * noise
        return self.decode(z * self.config.scaling_factor), mean, logvar


# --- spatial tiling -------------------------------------------------------------------


def _pair(value: int | tuple[int, int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise InputError(f"{name} must be an int or a pair of ints, got {value!r}")
    return pair  # type: ignore[return-value]


def _tiling(latent_hw: tuple[int, int], tile_size, tile_overlap):
    """Validated (tile, overlap) pairs, or None when no tiling is wanted or needed."""
    if tile_size is None:
        if tile_overlap is not None:
            raise InputError("tile_overlap needs tile_size")
        return None
    tile = _pair(tile_size, "tile_size")
    overlap = (tile[0] // 4, tile[1] // 4) if tile_overlap is None else _pair(tile_overlap,
                                                                                "tile_overlap")
    for t, o in zip(tile, overlap):
        if t < 1:
            raise InputError(f"tile_size must be positive, got {tile_size!r}")
        if not 0 <= o < t:
            raise InputError(f"tile_overlap must be >= 0 and smaller than tile_size {tile}, "
                             f"got {overlap}")
    if latent_hw[0] <= tile[0] and latent_hw[1] <= tile[1]:
        return None
    return tile, overlap


def tile_spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """Cover ``[0, size)`` with tiles of ``tile`` that overlap by at least ``overlap``;
    the last tile is shifted back to end at ``size``."""
    if size <= tile:
        return [(0, size)]
    starts = list(range(0, size - tile, tile - overlap)) + [size - tile]
    return [(s, s + tile) for s in starts]


def _ramps(spans: list[tuple[int, int]], scale: int, device, dtype) -> list[Tensor]:
    """Per-tile 1-D blend weights in pixels: linear ramps over the overlaps with the
    previous and next tile, 1 elsewhere; strictly positive."""
    weights = []
    for i, (a, b) in enumerate(spans):
        n = (b - a) * scale
        p = torch.arange(n, device=device, dtype=dtype) + 0.5
        w = torch.ones(n, device=device, dtype=dtype)
        if i > 0:
            ramp = (spans[i - 1][1] - a) * scale
            w = torch.minimum(w, p / ramp)
        if i + 1 < len(spans):
            ramp = (b - spans[i + 1][0]) * scale
            w = torch.minimum(w, (n - p) / ramp)
        weights.append(w.clamp(max=1.0))
    return weights


def _decode_tiled(fn: Callable[[Tensor], Tensor], z: Tensor, tile: tuple[int, int],
                  overlap: tuple[int, int], scale: int) -> Tensor:
    """Apply ``fn`` (latent tile -> pixel tile, x``scale`` in space) to overlapping tiles
    of ``z`` (B, C, T, h, w) and blend the results, normalised by the summed weights."""
    rows = tile_spans(z.shape[-2], tile[0], overlap[0])
    cols = tile_spans(z.shape[-1], tile[1], overlap[1])
    out = total = None
    row_w = col_w = None
    for i, (r0, r1) in enumerate(rows):
        for j, (c0, c1) in enumerate(cols):
            piece = fn(z[..., r0:r1, c0:c1])                                # (B, 3, F, Ht, Wt)
            if out is None:
                out = piece.new_zeros(*piece.shape[:3], z.shape[-2] * scale, z.shape[-1] * scale)
                total = piece.new_zeros(z.shape[-2] * scale, z.shape[-1] * scale)
                row_w = _ramps(rows, scale, piece.device, piece.dtype)
                col_w = _ramps(cols, scale, piece.device, piece.dtype)
            weight = row_w[i][:, None] * col_w[j][None, :]                  # (Ht, Wt)
            ys, xs = slice(r0 * scale, r1 * scale), slice(c0 * scale, c1 * scale)
            out[..., ys, xs] += piece * weight
            total[ys, xs] += weight
    return out / total                                                      # (B, 3, F, H, W)
