"""A generation request and its rules, without torch (the runtime's start-up path reads
it too). Every rule is checked before any work starts; a broken one is an InputError
naming the rule and the value."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from ..media import save_video
from .config import ModelConfig
from .schedule import check_sampler, check_seed, model_calls, training_schedule
from .smooth import check_decode

# Classifier-free guidance past ~20 saturates any model; 100 is a typo, not a setting.
MAX_GUIDANCE = 100.0

GUIDANCE_MODES = ("batched", "sequential")


@dataclass(frozen=True)
class GenerationRequest:
    """One text-to-video request, validated on construction."""

    prompt: str
    negative_prompt: str = ""
    height: int = 384
    width: int = 672
    frames: int = 144
    steps: int = 30
    guidance_scale: float = 6.0
    sampler: str = "dpm++"
    seed: int = 0
    guidance_mode: str = "batched"
    # image-to-video: the start frame, uint8 (height, width, 3); InP models only.
    image: np.ndarray | None = field(default=None, compare=False, repr=False)
    # share of the last steps that see the CLIP image embedding (upstream default 0.5)
    clip_apply_ratio: float = 0.5
    # "plain" or "smooth" (upstream's smoothed decode, reference/smooth.py)
    decode: str = "plain"

    def validate(self, config: ModelConfig) -> None:
        if not isinstance(self.prompt, str):
            raise InputError(f"prompt must be a string, got {type(self.prompt).__name__}")
        if not isinstance(self.negative_prompt, str):
            raise InputError(f"negative_prompt must be a string, got {type(self.negative_prompt).__name__}")
        mult = config.pixel_multiple
        for name in ("height", "width"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0 or v % mult:
                raise InputError(f"{name} must be a positive multiple of {mult}, got {v!r}")
        d = config.dit
        if d.motion_module and (d.hidden_size // d.motion_norm_groups) * (self.height // mult) \
                * (self.width // mult) * (d.latent_multiple // d.patch_size) ** 2 < 2:
            # The motion module's GroupNorm normalises each frame's channels of a group over
            # its tokens: one value per group has no variance (torch refuses it).
            raise InputError(f"{self.height}x{self.width} is one DiT token per frame, too small for this model's "
                             f"motion module (GroupNorm of {d.hidden_size // d.motion_norm_groups} channel per "
                             f"group); height x width must be at least {mult}x{2 * mult}")
        config.vae.check_frames(self.frames)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {self.steps!r}")
        g = self.guidance_scale
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0 <= g <= MAX_GUIDANCE:
            raise InputError(f"guidance_scale must be a finite number in [0, {MAX_GUIDANCE}], got {g!r}")
        check_sampler(self.sampler, self.steps, training_schedule())  # the name and the step count
        check_seed(self.seed)
        if self.guidance_mode not in GUIDANCE_MODES:
            raise InputError(f"guidance_mode must be one of {list(GUIDANCE_MODES)}, got {self.guidance_mode!r}")
        check_decode(self.decode)
        if not 0.0 <= self.clip_apply_ratio <= 1.0:
            raise InputError(f"clip_apply_ratio must be in [0, 1], got {self.clip_apply_ratio!r}")
        if self.image is not None:
            if not config.dit.inpaint:
                raise InputError(f"image-to-video needs an InP model (a DiT with mask and masked-video "
                                 f"inputs, e.g. the v3 presets); {config.name!r} is text-to-video only")
            image = np.asarray(self.image)
            if image.dtype != np.uint8 or image.shape != (self.height, self.width, 3):
                raise InputError(f"image must be uint8 of shape ({self.height}, {self.width}, 3) (the video's "
                                 f"height x width, RGB), got {image.dtype} {image.shape}")

    @property
    def calls(self) -> int:
        """Model calls of the denoising loop: ``steps``, but more for samplers that call the
        model more than once a step (PNDM: steps + 9; PLMS: steps + 1). Loops, progress
        and checkpoints count these."""
        return model_calls(self.sampler, self.steps)

    def latent_shape(self, config: ModelConfig) -> tuple[int, int, int, int, int]:
        s = config.vae.spatial_compression
        return (1, config.vae.latent_channels, config.vae.latent_frames(self.frames),
                self.height // s, self.width // s)


def default_request(config: ModelConfig, prompt: str, **kwargs) -> GenerationRequest:
    """A request with ``config``'s sampling defaults where ``kwargs`` give None or nothing."""
    d = config.sampling
    base = dict(negative_prompt=d.negative_prompt, height=d.height, width=d.width, frames=d.frames,
                steps=d.steps, guidance_scale=d.guidance_scale, sampler=d.sampler, decode=d.decode)
    base.update({k: v for k, v in kwargs.items() if v is not None})
    return GenerationRequest(prompt=prompt, **base)


def batch_key(req: GenerationRequest) -> dict[str, Any]:
    """What requests of one batch share: everything but the prompts and the seed."""
    return {f.name: getattr(req, f.name) for f in fields(req) if f.name not in ("prompt", "negative_prompt", "seed")}


def check_batch(reqs: list[GenerationRequest], config: ModelConfig, most: int) -> None:
    """1 .. ``most`` valid requests that differ only in prompts and seed (one batch of
    the runtime's loop); an InputError naming the field and both values otherwise."""
    if not 1 <= len(reqs) <= most:
        raise InputError(f"a batch holds 1 .. {most} requests, got {len(reqs)}")
    for req in reqs:
        req.validate(config)
    first = batch_key(reqs[0])
    for req in reqs[1:]:
        other = batch_key(req)
        for name, value in first.items():
            if not _same(value, other[name]):
                raise InputError(f"requests in one batch differ only in prompt, negative prompt and seed; "
                                 f"{name} is {value!r} in the first and {other[name]!r} in another")


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is b or (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b))
    return a == b


@dataclass
class Video:
    """What a pipeline gives for one request, the reference's and the runtime's alike:
    the frames (None when they were streamed to ``path``), the fps, the final latents (the
    pipeline's own arrays: a torch tensor from the reference, numpy from the runtime) and
    the seconds per stage (``timings``)."""

    frames: np.ndarray | None  # (F, H, W, 3) uint8
    fps: int
    latents: Any = None
    timings: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def save(self, path: str | Path) -> Path:
        if self.frames is None:
            raise InputError("this video was streamed to a file; it holds no frames to save")
        return save_video(self.frames, path, self.fps)


def token_counts(config: ModelConfig, height: int, width: int, frames: int) -> tuple[int, int, int]:
    """(latent frames, spatial tokens per frame, total tokens) of the DiT at this size."""
    s, p = config.vae.spatial_compression, config.dit.patch_size
    latent = config.vae.latent_frames(frames)
    spatial = (height // s // p) * (width // s // p)
    return latent, spatial, latent * spatial


def dit_tokens(config: ModelConfig, req: GenerationRequest) -> tuple[int, int, int]:
    """(latent frames, spatial tokens per frame, total tokens) of the DiT at ``req``."""
    return token_counts(config, req.height, req.width, req.frames)
