"""Configurations of the three networks and named presets (DESIGN.md 1.5).

One frozen dataclass per network, a bundle for a whole model, and ``PRESETS`` keyed by
name. ``__post_init__`` validates every field and raises :class:`ConfigError` naming
the field and the bad value. Configs round-trip through ``config.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Sequence

from ..errors import CheckpointError, ConfigError, ShapeError

DTYPES = ("float32", "float16", "bfloat16")
PADDING_MODES = ("slice", "causal")
#: "slice" (V3): a lone first frame, then slice_frames-frame slices encoded independently
#: and decoded with their neighbours; "chunk" (V2): slice_frames-frame chunks (9) each
#: encoded whole (-> 3 latents) and 3-latent chunks each decoded whole (-> 9 frames).
SLICINGS = ("slice", "chunk")
RESAMPLE_TYPES = ("spatial", "spacetime", "none")
PREDICTION_TYPES = ("epsilon", "v_prediction")
SKIP_WIRINGS = ("symmetric", "upstream")
UPSTREAM_SKIPS = 13  # upstream builds 13 long_connect_fc whatever the depth


class SliceSpec(NamedTuple):
    """One step of slice decoding: latents ``[ctx_start, ctx_end)`` form the context,
    of which ``[start, start + length)`` (relative to ``ctx_start``) is decoded."""

    ctx_start: int
    ctx_end: int
    start: int
    length: int


def _positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{type(obj).__name__}.{name} must be a positive integer, got {value!r}")


def _choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in choices:
        raise ConfigError(f"{type(obj).__name__}.{name} must be one of {list(choices)}, got {value!r}")


class _Serialisable:
    """Mixin: dict/JSON round trip that turns JSON lists back into tuples."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - set(known) - {"_class_name", "_easyanimate_rt_version"})
        if unknown:
            raise ConfigError(f"{cls.__name__} got unknown fields {unknown}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known}
        return cls(**kwargs)

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]


@dataclass(frozen=True)
class TextEncoderConfig(_Serialisable):
    """A T5 encoder (transformers ``T5EncoderModel``) and its tokenizer settings."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    max_length: int = 120
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _positive(self, "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "max_length")
        _choice(self, "dtype", DTYPES)
        _choice(self, "feed_forward_proj", ("relu", "gated-gelu"))

    def t5_config(self):
        """The equivalent ``transformers.T5Config``."""
        from transformers import T5Config

        return T5Config(
            vocab_size=self.vocab_size, d_model=self.d_model, d_kv=self.d_kv, d_ff=self.d_ff,
            num_layers=self.num_layers, num_heads=self.num_heads,
            relative_attention_num_buckets=self.relative_attention_num_buckets,
            relative_attention_max_distance=self.relative_attention_max_distance,
            feed_forward_proj=self.feed_forward_proj, dropout_rate=0.0,
            is_encoder_decoder=False, use_cache=False, pad_token_id=0, eos_token_id=1,
        )


@dataclass(frozen=True)
class VAEConfig(_Serialisable):
    """Slice VAE (DESIGN.md 1.2). Resample types are listed per level, in execution order."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2  # encoder; the decoder uses one more
    down_block_types: tuple[str, ...] = ("spatial", "spacetime", "spacetime", "none")
    up_block_types: tuple[str, ...] = ("spatial", "spacetime", "spacetime", "none")
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    mid_block_attention: bool = True
    # res-blocks in each mid block, an attention between each pair; upstream builds
    # layers_per_block of them (2 at release), our small models were trained with 2.
    mid_block_layers: int = 2
    padding_mode: str = "slice"
    slicing: str = "slice"
    slice_frames: int = 8  # pixel frames per encoder slice (or chunk: 9 for V2)
    scaling_factor: float = 0.18215
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _positive(self, "in_channels", "out_channels", "latent_channels", "layers_per_block",
                  "norm_num_groups", "slice_frames", "mid_block_layers")
        _choice(self, "padding_mode", PADDING_MODES)
        _choice(self, "slicing", SLICINGS)
        _choice(self, "dtype", DTYPES)
        if self.slicing == "chunk" and self.padding_mode != "causal":
            raise ConfigError(f"VAEConfig.slicing 'chunk' (V2) needs padding_mode 'causal', got {self.padding_mode!r}")
        if not self.block_out_channels:
            raise ConfigError("VAEConfig.block_out_channels must not be empty")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(
                    f"VAEConfig.block_out_channels entries must be divisible by norm_num_groups="
                    f"{self.norm_num_groups}, got {c}")
        for name in ("down_block_types", "up_block_types"):
            types = getattr(self, name)
            if len(types) != len(self.block_out_channels):
                raise ConfigError(
                    f"VAEConfig.{name} needs one entry per level ({len(self.block_out_channels)}), "
                    f"got {len(types)}")
            for t in types:
                if t not in RESAMPLE_TYPES:
                    raise ConfigError(f"VAEConfig.{name} entries must be in {list(RESAMPLE_TYPES)}, got {t!r}")
        if self.spatial_compression != self._up_spatial:
            raise ConfigError("VAEConfig.up_block_types must undo the spatial compression of down_block_types")
        if self.temporal_compression != self._up_temporal:
            raise ConfigError("VAEConfig.up_block_types must undo the temporal compression of down_block_types")
        if self.slicing == "slice" and self.slice_frames % self.temporal_compression:
            raise ConfigError(
                f"VAEConfig.slice_frames must be a multiple of the temporal compression "
                f"{self.temporal_compression}, got {self.slice_frames}")
        if self.slicing == "chunk" and (self.slice_frames - 1) % self.temporal_compression:
            raise ConfigError(
                f"VAEConfig.slice_frames of a chunked VAE must be a multiple of the temporal "
                f"compression {self.temporal_compression} plus 1, got {self.slice_frames}")

    @property
    def spatial_compression(self) -> int:
        return 2 ** sum(1 for t in self.down_block_types if t != "none")

    @property
    def temporal_compression(self) -> int:
        return 2 ** sum(1 for t in self.down_block_types if t == "spacetime")

    @property
    def _up_spatial(self) -> int:
        return 2 ** sum(1 for t in self.up_block_types if t != "none")

    @property
    def _up_temporal(self) -> int:
        return 2 ** sum(1 for t in self.up_block_types if t == "spacetime")

    @property
    def latents_per_slice(self) -> int:
        """Latent frames one encoder slice (chunk) gives: 8 -> 2 (slice), 9 -> 3 (chunk)."""
        if self.slicing == "chunk":
            return 1 + (self.slice_frames - 1) // self.temporal_compression
        return self.slice_frames // self.temporal_compression

    def check_frames(self, frames: int) -> None:
        """The frame counts this VAE encodes and decodes back to the same count."""
        if self.slicing == "chunk":
            n = self.slice_frames
            if isinstance(frames, int) and frames >= 1 and (frames == 1 or frames % n == 0):
                return
            from ..errors import InputError

            raise InputError(f"frames must be 1 or a multiple of {n} (this VAE encodes {n}-frame chunks), "
                             f"got {frames!r}")
        check_frames(frames, self.slice_frames)

    def latent_frames(self, frames: int) -> int:
        """Latent frames for a video of ``frames`` frames (DESIGN.md 1.2, slicing)."""
        self.check_frames(frames)
        if self.slicing == "chunk":
            return 1 if frames == 1 else frames // self.slice_frames * self.latents_per_slice
        if frames % 2:
            return 1 + (frames - 1) // self.slice_frames * self.latents_per_slice
        return frames // self.slice_frames * self.latents_per_slice

    def video_frames(self, latent_frames: int) -> int:
        """Inverse of :meth:`latent_frames`."""
        if latent_frames <= 0:
            raise ConfigError(f"latent_frames must be positive, got {latent_frames}")
        n = self.latents_per_slice
        if self.slicing == "chunk":
            if latent_frames == 1:
                return 1
            if latent_frames % n == 0:
                return latent_frames // n * self.slice_frames
            raise ConfigError(f"latent_frames must be 1 or a multiple of {n}, got {latent_frames}")
        if latent_frames % n == 0:
            return latent_frames // n * self.slice_frames
        if (latent_frames - 1) % n == 0:
            return 1 + (latent_frames - 1) // n * self.slice_frames
        raise ConfigError(f"latent_frames must be a multiple of {n} or one more, got {latent_frames}")

    def frame_slices(self, frames: int) -> list[tuple[int, int]]:
        """Pixel frame ranges the encoder sees independently: slice mode, ``[0, 1)`` for
        an odd video's first frame, then ``slice_frames``-frame slices; chunk mode,
        ``slice_frames``-frame chunks, the last one shorter where the video is (as
        upstream V2 encodes any length; only 1 and multiples of 9 decode back to the same
        count, which is the request rule :meth:`check_frames`)."""
        n = self.slice_frames
        if self.slicing == "chunk":
            if not isinstance(frames, int) or frames < 1:
                raise ShapeError(f"frames must be a positive integer, got {frames!r}")
            return [(i, min(i + n, frames)) for i in range(0, frames, n)]
        self.check_frames(frames)
        first = frames % 2
        return [(0, 1)] * first + [(i, i + n) for i in range(first, frames, n)]

    def slice_plan(self, latent_frames: int) -> list[SliceSpec]:
        """What the VAE's decode does for ``latent_frames`` latents, one entry per slice.

        Slice mode: if ``latent_frames % latents_per_slice == 1`` the first latent is
        decoded alone (context of 1); the others are ``latents_per_slice``-latent slices
        whose context adds the previous and the next slice where they exist (DESIGN.md
        1.2). Chunk mode: ``latents_per_slice``-latent chunks, each its own context.
        """
        n = self.latents_per_slice
        if self.slicing == "chunk":  # upstream V2: 3-latent chunks, the last one shorter
            if not isinstance(latent_frames, int) or latent_frames < 1:
                raise ShapeError(f"latent frames must be a positive integer, got {latent_frames!r}")
            return [SliceSpec(s, min(s + n, latent_frames), 0, min(n, latent_frames - s))
                    for s in range(0, latent_frames, n)]
        if not isinstance(latent_frames, int) or latent_frames < 1 or latent_frames % n > 1:
            raise ShapeError(f"latent frames must be a positive multiple of {n} or a multiple "
                             f"of {n} plus 1, got {latent_frames!r}")
        first = 1 if n > 1 and latent_frames % n == 1 else 0
        plan = [SliceSpec(0, 1, 0, 1)] * first
        starts = list(range(first, latent_frames, n))
        for i, s in enumerate(starts):
            ctx_start = starts[i - 1] if i > 0 else s
            ctx_end = min(s + 2 * n, latent_frames) if i + 1 < len(starts) else s + n
            plan.append(SliceSpec(ctx_start, ctx_end, s - ctx_start, n))
        return plan

    def decoded_frames(self, length: int) -> int:
        """Pixel frames a slice of ``length`` latents decodes to: a lone latent -> 1; in
        causal mode the first frame is not doubled in time (3 -> 9), else 2 -> 8."""
        if length == 1:
            return 1
        if self.padding_mode == "causal":
            return 1 + (length - 1) * self.temporal_compression
        return length * self.temporal_compression


def check_frames(frames: int, slice_frames: int = 8) -> None:
    """Frames must be 1, a multiple of the slice (8) or a multiple plus one (8k+1)."""
    from ..errors import InputError

    if not isinstance(frames, int) or frames < 1 or not (
        frames == 1 or frames % slice_frames == 0 or (frames - 1) % slice_frames == 0
    ):
        raise InputError(
            f"frames must be 1, a multiple of {slice_frames} or a multiple of {slice_frames} "
            f"plus 1, got {frames!r}")


@dataclass(frozen=True)
class DiTConfig(_Serialisable):
    """Video DiT: PixArt-alpha backbone + motion module + U-ViT skips (DESIGN.md 1.3)."""

    in_channels: int = 4
    learn_sigma: bool = True
    num_layers: int = 28
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    patch_size: int = 2
    caption_channels: int = 4096
    sample_size: int = 64  # latent size the position table is normalised to
    mlp_ratio: int = 4
    norm_eps: float = 1e-6
    motion_module: bool = True
    motion_norm_groups: int = 32
    temporal_num_heads: int = 8
    temporal_block_size: int = 1  # 2 = Grid Reshape
    temporal_max_positions: int = 4096
    hybrid_global_attention: bool = False  # V3: odd blocks use global attention
    # The odd blocks' temporal heads where they differ from the even blocks' (upstream's
    # motion_module_kwargs_odd.num_attention_heads); None: temporal_num_heads.
    temporal_num_heads_odd: int | None = None
    # Frame positions (sin/cos table) added to every motion-module attention's input
    # (upstream's temporal_position_encoding); False: no position table at all.
    temporal_position_encoding: bool = True
    # Upstream's remove_time_embedding_in_photo: for a single frame the temporal attentions
    # add no position (the global attention of hybrid blocks still does).
    remove_time_embedding_in_photo: bool = False
    long_skips: bool = True
    # How the U-ViT skips are wired (skip_plan): "symmetric" (ours: the first
    # floor((D-2)/2) blocks feed the last ones in reverse) or "upstream" (EasyAnimate's own
    # code: always 13 long_connect_fc, blocks 0-12 feed blocks 15 onward in reverse, so at
    # depth 28 the two agree and an upstream checkpoint of another depth loads as it runs).
    skip_wiring: str = "symmetric"
    # InP models (the released V3 checkpoints): mask latents + masked-video latents
    # (each in_channels wide) are concatenated to the noisy latents on channels before
    # the patch embedding (upstream in_channels 12 = 3 x 4), and a CLIP image embedding
    # (clip_channels, 768 for ViT-L/14) is projected to clip_tokens extra text tokens.
    inpaint_channels: int = 0
    clip_channels: int = 0
    clip_tokens: int = 8
    # What the first in_channels outputs mean: the noise (EasyAnimate's releases) or
    # v = sqrt(abar) eps - sqrt(1 - abar) x0 (the shipped shapes model; samplers.Sampler.epsilon).
    prediction_type: str = "epsilon"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _choice(self, "prediction_type", PREDICTION_TYPES)
        _positive(self, "in_channels", "num_layers", "num_attention_heads", "attention_head_dim",
                  "patch_size", "caption_channels", "sample_size", "mlp_ratio",
                  "temporal_num_heads", "temporal_block_size", "temporal_max_positions",
                  "motion_norm_groups")
        _choice(self, "dtype", DTYPES)
        _choice(self, "skip_wiring", SKIP_WIRINGS)
        if self.long_skips and self.skip_wiring == "upstream" and self.num_layers > UPSTREAM_SKIPS + 15:
            raise ConfigError(f"DiTConfig.num_layers must be at most {UPSTREAM_SKIPS + 15} with upstream's skip "
                              f"wiring (blocks 15 onward take one of its {UPSTREAM_SKIPS} skips each), got "
                              f"{self.num_layers}")
        if self.temporal_block_size not in (1, 2):
            raise ConfigError(f"DiTConfig.temporal_block_size must be 1 or 2, got {self.temporal_block_size}")
        if self.temporal_num_heads_odd is not None:
            _positive(self, "temporal_num_heads_odd")
        for name in ("temporal_num_heads", "temporal_num_heads_odd"):
            heads = getattr(self, name)
            if self.motion_module and heads is not None and self.hidden_size % heads:
                raise ConfigError(f"DiTConfig.{name} must divide hidden_size={self.hidden_size}, got {heads}")
        if self.motion_module and self.hidden_size % self.motion_norm_groups:
            raise ConfigError(
                f"DiTConfig.motion_norm_groups must divide hidden_size={self.hidden_size}, "
                f"got {self.motion_norm_groups}")
        if self.hidden_size % 2:
            raise ConfigError(f"DiTConfig hidden size must be even, got {self.hidden_size}")
        if self.sample_size % self.patch_size:
            raise ConfigError(
                f"DiTConfig.sample_size must be a multiple of patch_size={self.patch_size}, "
                f"got {self.sample_size}")
        if self.inpaint_channels not in (0, 2 * self.in_channels):
            raise ConfigError(
                f"DiTConfig.inpaint_channels must be 0 or 2 x in_channels ({2 * self.in_channels}: mask + "
                f"masked-video latents), got {self.inpaint_channels}")
        if self.clip_channels < 0 or self.clip_tokens < 1:
            raise ConfigError(f"DiTConfig needs clip_channels >= 0 and clip_tokens >= 1, got "
                              f"{self.clip_channels}, {self.clip_tokens}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def latent_multiple(self) -> int:
        """Latent height and width must be multiples of this: the patch, times the Grid
        Reshape block where a motion module folds 2x2 neighbourhoods into time."""
        return self.patch_size * (self.temporal_block_size if self.motion_module else 1)

    def motion_heads(self, index: int) -> int:
        """Temporal heads of block ``index``'s motion module (the odd blocks may differ)."""
        if index % 2 == 1 and self.temporal_num_heads_odd is not None:
            return self.temporal_num_heads_odd
        return self.temporal_num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def inpaint(self) -> bool:
        """An InP model: takes mask and masked-video latents (image-to-video)."""
        return self.inpaint_channels > 0

    @property
    def patch_in_channels(self) -> int:
        """Channels the patch embedding sees (upstream's ``in_channels``: 4, or 12 for InP)."""
        return self.in_channels + self.inpaint_channels

    @property
    def interpolation_scale(self) -> float:
        """PixArt's position-grid scale: 1 up to the 512 model, 2 for the 1024 model."""
        return float(max(self.sample_size // 64, 1))

    @property
    def base_grid(self) -> int:
        """Token-grid size that positions are normalised to (32 for the 512 model)."""
        return self.sample_size // self.patch_size

    @property
    def num_skips(self) -> int:
        """How many long_connect_fc layers the DiT has."""
        if not self.long_skips:
            return 0
        return UPSTREAM_SKIPS if self.skip_wiring == "upstream" else (self.num_layers - 2) // 2

    @property
    def skip_plan(self) -> tuple[int, int, int]:
        """(blocks whose outputs are kept, first block that takes one, how many take one):
        block ``first + k`` adds ``long_connect_fc[k]`` of the output popped last."""
        if not self.long_skips:
            return 0, self.num_layers, 0
        if self.skip_wiring == "upstream":
            return min(UPSTREAM_SKIPS, self.num_layers), 15, max(0, min(UPSTREAM_SKIPS, self.num_layers - 15))
        n = (self.num_layers - 2) // 2
        return n, self.num_layers - n, n


@dataclass(frozen=True)
class SamplingDefaults(_Serialisable):
    """Defaults of the text-to-video pipeline for a model."""

    height: int = 384
    width: int = 672
    frames: int = 144
    fps: int = 24
    steps: int = 30
    guidance_scale: float = 6.0
    sampler: str = "dpm++"
    negative_prompt: str = ""
    # DDIM clamps its predicted x0 to [-clip_sample, clip_sample] (diffusers' DDIMScheduler
    # clip_sample / clip_sample_range); None: no clamp. Upstream builds DDIMScheduler(**yaml
    # kwargs) without clip_sample, so diffusers' default (True, range 1.0) runs: the release
    # presets set 1.0.
    clip_sample: float | None = None
    # "smooth": upstream's decode_latents (reference/smooth.py: the video re-encoded half a
    # slice shifted, decoded again and averaged), what the release presets run; "plain": one
    # decode, slice by slice.
    decode: str = "plain"

    def __post_init__(self) -> None:
        if self.decode not in ("plain", "smooth"):
            raise ConfigError(f"SamplingDefaults.decode must be 'plain' or 'smooth', got {self.decode!r}")
        c = self.clip_sample
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c < float("inf")):
            raise ConfigError(f"SamplingDefaults.clip_sample must be a positive number or null, got {c!r}")


@dataclass(frozen=True)
class ModelConfig(_Serialisable):
    """A whole model: text encoder, VAE, DiT and sampling defaults."""

    name: str
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)

    def __post_init__(self) -> None:
        if self.dit.caption_channels != self.text_encoder.d_model:
            raise ConfigError(
                f"DiTConfig.caption_channels ({self.dit.caption_channels}) must equal the text "
                f"encoder's d_model ({self.text_encoder.d_model})")
        if self.dit.in_channels != self.vae.latent_channels:
            raise ConfigError(
                f"DiTConfig.in_channels ({self.dit.in_channels}) must equal VAEConfig.latent_channels "
                f"({self.vae.latent_channels})")

    @property
    def pixel_multiple(self) -> int:
        """Pixel height and width must be multiples of this: the VAE's spatial compression
        times :attr:`DiTConfig.latent_multiple`. The request rules, the DiT's shape check
        and the export specs all read this one rule."""
        return self.vae.spatial_compression * self.dit.latent_multiple

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "text_encoder": self.text_encoder.to_dict(),
            "vae": self.vae.to_dict(),
            "dit": self.dit.to_dict(),
            "sampling": self.sampling.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        return cls(
            name=data["name"],
            text_encoder=TextEncoderConfig.from_dict(data.get("text_encoder", {})),
            vae=VAEConfig.from_dict(data.get("vae", {})),
            dit=DiTConfig.from_dict(data.get("dit", {})),
            sampling=SamplingDefaults.from_dict(data.get("sampling", {})),
        )


# --- presets ------------------------------------------------------------------------

_TINY_TEXT = TextEncoderConfig(vocab_size=512, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                               num_heads=4, relative_attention_num_buckets=8,
                               relative_attention_max_distance=16, max_length=16)
_TINY_VAE = VAEConfig(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4)
_TINY_DIT = DiTConfig(num_layers=4, num_attention_heads=2, attention_head_dim=16, caption_channels=32,
                      sample_size=8, temporal_num_heads=2, temporal_max_positions=64)

# The released V2 and V3 DiTs use plain temporal attention (motion_module_type "Vanilla",
# block_size 1: configs easyanimate_video_magvit_motion_module_v2.yaml and
# easyanimate_video_slicevae_motion_module_v3.yaml); Grid Reshape (block_size 2) is the
# paper's V1 setting and our shipped model's. These settings are not in a checkpoint's
# config.json, so the presets carry them. V2: 8 temporal heads, a causal VAE chunked
# 9 frames -> 3 latents. V3: hybrid motion module (global attention in odd blocks), 16
# temporal heads, the slice VAE, and every released V3 model is InP (12 input channels
# and a CLIP ViT-L/14 image projection).
_V2_DIT = DiTConfig(sample_size=64, temporal_num_heads=8, temporal_block_size=1, skip_wiring="upstream")
_V2_VAE = VAEConfig(padding_mode="causal", slicing="chunk", slice_frames=9)
_V3_DIT = _V2_DIT.replace(temporal_num_heads=16, hybrid_global_attention=True, inpaint_channels=8,
                          clip_channels=768)

# The shipped default model (issue 3): 64x64 pixels, 17 frames at 8 fps, trained here on
# the synthetic moving-shapes world. Small enough to train and run on a 2-core CPU.
_SHAPES = ModelConfig(
    name="shapes",
    text_encoder=TextEncoderConfig(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=32, max_length=24),
    vae=VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
    # v-prediction: an 8-block epsilon network cannot reach the precision the linear
    # schedule demands at t ~ 999 (abar 4e-5), and its samples drift (MODEL_CARD.md).
    dit=DiTConfig(num_layers=8, num_attention_heads=4, attention_head_dim=32, caption_channels=64,
                  sample_size=8, temporal_num_heads=4, temporal_block_size=2, temporal_max_positions=64,
                  prediction_type="v_prediction"),
    sampling=SamplingDefaults(height=64, width=64, frames=17, fps=8, steps=25, guidance_scale=2.5),
)

PRESETS: dict[str, ModelConfig] = {
    "shapes": _SHAPES,
    "tiny": ModelConfig(
        name="tiny", text_encoder=_TINY_TEXT, vae=_TINY_VAE, dit=_TINY_DIT,
        sampling=SamplingDefaults(height=64, width=64, frames=9, fps=8, steps=5, guidance_scale=4.0),
    ),
    "v2-512": ModelConfig(
        name="v2-512", vae=_V2_VAE, dit=_V2_DIT,
        sampling=SamplingDefaults(height=512, width=512, frames=144, fps=24, steps=30, guidance_scale=6.0,
                                  clip_sample=1.0, decode="smooth"),
    ),
    "v2-768": ModelConfig(
        name="v2-768", vae=_V2_VAE, dit=_V2_DIT.replace(sample_size=96),
        sampling=SamplingDefaults(height=384, width=672, frames=144, fps=24, steps=30, guidance_scale=6.0,
                                  clip_sample=1.0, decode="smooth"),
    ),
    "v3-512": ModelConfig(
        name="v3-512", dit=_V3_DIT,
        sampling=SamplingDefaults(height=512, width=512, frames=144, fps=24, steps=25, guidance_scale=7.0,
                                  clip_sample=1.0, decode="smooth"),
    ),
    "v3-768": ModelConfig(
        name="v3-768", dit=_V3_DIT.replace(sample_size=96),
        sampling=SamplingDefaults(height=384, width=672, frames=144, fps=24, steps=25, guidance_scale=7.0,
                                  clip_sample=1.0, decode="smooth"),
    ),
    "v3-960": ModelConfig(
        name="v3-960", dit=_V3_DIT.replace(sample_size=120),
        sampling=SamplingDefaults(height=960, width=960, frames=144, fps=24, steps=25, guidance_scale=7.0,
                                  clip_sample=1.0, decode="smooth"),
    ),
}


def from_preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {sorted(PRESETS)}") from None


#: Our model directories' whole configuration (upstream release directories have none).
CONFIG_NAME = "easyanimate_rt.json"


def read_model_config(directory: str | Path) -> ModelConfig | None:
    """``directory/easyanimate_rt.json`` as a ModelConfig (no torch), None where there is
    none; a CheckpointError naming the file when it does not parse."""
    import json

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
        raise CheckpointError(f"{path} is not a valid model config: {exc}") from None


def is_model_dir(directory: str | Path) -> bool:
    """Whether ``directory`` is a model directory this package wrote: its
    ``easyanimate_rt.json`` reads as a model config (a file merely named so does not)."""
    try:
        return Path(directory).is_dir() and read_model_config(directory) is not None
    except (CheckpointError, OSError):
        return False


def preset_name(source: str | Path) -> str:
    """``source`` as a preset name; a path-like ``source`` that is not a directory is a
    missing model directory, not a preset."""
    path = Path(source)
    if str(source) not in PRESETS and (path.suffix or len(path.parts) > 1 or path.exists()):
        raise CheckpointError(f"model directory not found: {source} (and it is not a preset name; "
                              f"presets: {sorted(PRESETS)})")
    from_preset(str(source))  # an unknown name: the error lists the presets
    return str(source)


def adapters_fingerprint(base: str, adapters: Sequence[Any] = ()) -> str:
    """A model fingerprint with LoRA adapters (reference/lora.py Adapter: file sha256 and
    weight each, in order) folded in; the base fingerprint when there are none."""
    if not adapters:
        return base
    h = hashlib.sha256(base.encode())
    for a in adapters:
        h.update(f"|lora {a.sha256} {a.weight!r}".encode())
    return h.hexdigest()


def model_fingerprint(source: str | Path, seed: int = 0) -> str:
    """sha256 over a model directory's files (names and contents; model cards and the
    step-cache rescale file, which steers the runtime but no engine, aside), or
    of a preset's name, seed and torch version (which draw its random weights). Engines
    and exports record it, so a changed model never reuses them. Files of 64 MiB and more
    (release weights: gigabytes, hashed at every start otherwise) count by size,
    modification time and their first and last MiB."""
    import hashlib

    h = hashlib.sha256()
    path = Path(source)
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix != ".md"
                        and p.name != STEP_CACHE_NAME):
            h.update(str(f.relative_to(path)).encode() + b"\0")
            st = f.stat()
            with open(f, "rb") as fh:
                if st.st_size >= LARGE_FILE:
                    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
                    h.update(fh.read(1 << 20))
                    fh.seek(max(0, st.st_size - (1 << 20)))
                    h.update(fh.read())
                else:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
    else:
        from importlib.metadata import version

        h.update(f"preset:{preset_name(source)}:seed={seed}:torch={version('torch')}".encode())
    return h.hexdigest()


LARGE_FILE = 64 << 20
STEP_CACHE_NAME = "step_cache.json"  # runtime/step_cache.py's fitted TeaCache rescale
