"""Reference text-to-video pipeline: the definition the runtime is validated against.

1. encode the prompt and the negative prompt (T5);
2. draw initial latents from the seed;
3. denoise with classifier-free guidance (batched by default, or sequential);
4. decode slice by slice with the Slice VAE; return uint8 frames and fps.

Symbols: B guidance batch (2), C latent channels, F latent frames, H, W latent size,
S text tokens, E text width.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..errors import InputError
from ..media import save_video, to_uint8
from .config import ModelConfig, check_frames
from .samplers import SAMPLERS, make_sampler
from .weights import EasyAnimateModel, load_model_or_preset

log = logging.getLogger(__name__)

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
        check_frames(self.frames, config.vae.slice_frames)
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be an integer >= 1, got {self.steps!r}")
        if not self.guidance_scale >= 0:
            raise InputError(f"guidance_scale must be >= 0, got {self.guidance_scale!r}")
        if self.sampler not in SAMPLERS:
            raise InputError(f"unknown sampler {self.sampler!r}; known samplers: {sorted(SAMPLERS)}")
        if self.guidance_mode not in GUIDANCE_MODES:
            raise InputError(f"guidance_mode must be one of {list(GUIDANCE_MODES)}, got {self.guidance_mode!r}")

    def latent_shape(self, config: ModelConfig) -> tuple[int, int, int, int, int]:
        s = config.vae.spatial_compression
        return (1, config.vae.latent_channels, config.vae.latent_frames(self.frames),
                self.height // s, self.width // s)


@dataclass
class GenerationResult:
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: int
    latents: torch.Tensor  # (1, C, F', H', W') final latents (scaled)

    def save(self, path: str | Path) -> Path:
        return save_video(self.frames, path, self.fps)


StepCallback = Callable[[int, int], None]


class ReferencePipeline:
    """Text -> video with the PyTorch reference networks."""

    def __init__(self, model: EasyAnimateModel, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.config = model.config
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, source: str | Path, device: torch.device | str = "cpu",
                        preset: str | None = None) -> "ReferencePipeline":
        """``source``: a model directory, or a preset name for random weights."""
        return cls(load_model_or_preset(source, preset=preset), device)

    def request(self, prompt: str, **kwargs) -> GenerationRequest:
        """A request filled with this model's sampling defaults."""
        d = self.config.sampling
        base = dict(negative_prompt=d.negative_prompt, height=d.height, width=d.width, frames=d.frames,
                    steps=d.steps, guidance_scale=d.guidance_scale, sampler=d.sampler)
        base.update({k: v for k, v in kwargs.items() if v is not None})
        return GenerationRequest(prompt=prompt, **base)

    # 1. text
    @torch.no_grad()
    def encode_prompt(self, prompt: str, negative_prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        emb, mask = self.model.text_encoder.encode([negative_prompt, prompt], device=self.device)
        return emb.to(self.model.dit.proj_out.weight.dtype), mask  # (2, S, E), (2, S)

    # 3. denoising loop
    @torch.no_grad()
    def denoise(self, req: GenerationRequest, emb: torch.Tensor, mask: torch.Tensor,
                callback: StepCallback | None = None) -> torch.Tensor:
        dit = self.model.dit
        dtype = dit.proj_out.weight.dtype
        c = self.config.vae.latent_channels
        gen = torch.Generator("cpu").manual_seed(req.seed)
        sampler = make_sampler(req.sampler, req.steps, device=self.device)
        shape = req.latent_shape(self.config)
        x = (torch.randn(shape, generator=gen) * sampler.init_noise_sigma).to(self.device)
        guided = req.guidance_scale != 1.0
        if not guided:
            emb, mask = emb[1:], mask[1:]
        for i in range(req.steps):
            t = sampler.timesteps[i]
            xin = sampler.scale_model_input(x, i).to(dtype)
            # out: epsilon or v, as the DiT predicts (config.prediction_type).
            if guided and req.guidance_mode == "batched":
                out = dit(xin.expand(2, *xin.shape[1:]), t.expand(2), emb, mask)[:, :c]  # (2, C, F, H, W)
                out_u, out_c = out.float().chunk(2)
            elif guided:
                out_u = dit(xin, t.expand(1), emb[:1], mask[:1])[:, :c].float()
                out_c = dit(xin, t.expand(1), emb[1:], mask[1:])[:, :c].float()
            else:
                out_u = out_c = dit(xin, t.expand(1), emb, mask)[:, :c].float()
            # Guidance is affine, so guiding v and converting equals converting each branch.
            eps = sampler.epsilon(i, xin, out_u + req.guidance_scale * (out_c - out_u),
                                  dit.config.prediction_type)
            noise = None
            if sampler.needs_noise:
                noise = torch.randn(shape, generator=gen).to(self.device)
            x = sampler.step(i, x, eps, noise)
            if callback is not None:
                callback(i + 1, req.steps)
        return x

    # 4. decode
    @torch.no_grad()
    def iter_frames(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """Decoded uint8 frames (n, H, W, 3), one VAE slice at a time (constant memory)."""
        vae = self.model.vae
        for chunk in vae.iter_decode(latents.to(next(vae.parameters()).dtype)):
            yield to_uint8(chunk[0])

    def generate(self, prompt: str, callback: StepCallback | None = None, **kwargs) -> GenerationResult:
        req = self.request(prompt, **kwargs)
        return self.run(req, callback)

    def run(self, req: GenerationRequest, callback: StepCallback | None = None) -> GenerationResult:
        req.validate(self.config)
        emb, mask = self.encode_prompt(req.prompt, req.negative_prompt)
        latents = self.denoise(req, emb, mask, callback)
        frames = np.concatenate(list(self.iter_frames(latents)), axis=0)
        return GenerationResult(frames=frames, fps=self.config.sampling.fps, latents=latents)

    __call__ = generate
