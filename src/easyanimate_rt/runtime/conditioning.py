"""An InP model's inputs besides the text, built as the reference builds them
(ReferencePipeline.inpaint_latents / clip_condition), through the runtime's engines.

- mask + masked-video latents (1, 2C, F', h, w): the VAE encoder engines, slice by slice;
  text-to-video masks every frame (all -1 video), image-to-video keeps frame 0;
- CLIP image tokens ((2, K) embeds, (2, T) mask) for [negative, positive]: hidden (zeros)
  except the positive branch of image-to-video with a CLIP encoder.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ..export.spec import encoder_key
from ..reference.config import ModelConfig
from ..reference.request import GenerationRequest
from .denoiser import Conditioning
from .engine import Engine, to_host

log = logging.getLogger(__name__)


def conditioning(config: ModelConfig, req: GenerationRequest, engine: Callable[[str], Engine],
                 clip_encoder=None) -> Conditioning:
    """What the denoising loop feeds the DiT besides text for ``req`` (nothing for a
    text-only model); ``engine(key)`` gives the VAE encoder engines."""
    return Conditioning(inpaint_latents(config, req, engine), clip_condition(config, req, clip_encoder))


def inpaint_latents(config: ModelConfig, req: GenerationRequest, engine: Callable[[str], Engine]
                    ) -> np.ndarray | None:
    if not config.dit.inpaint:
        return None
    shape = (1, 3, req.frames, req.height, req.width)
    generate = np.ones((1, 1, req.frames, 1, 1), np.float32)  # 1 = to generate
    if req.image is None:
        video = np.full(shape, -1.0, np.float32)
    else:
        image = (np.asarray(req.image, np.float32) / np.float32(127.5) - np.float32(1.0)).transpose(2, 0, 1)
        video = np.broadcast_to(image[None, :, None], shape)
        generate[:, :, 0] = 0.0
    mask = np.broadcast_to(generate, shape)
    masked = np.where(mask < 0.5, video, np.float32(-1.0)).astype(np.float32)

    def encode(x: np.ndarray) -> np.ndarray:
        parts = []
        for a, b in config.vae.frame_slices(req.frames):
            encoder = engine(str(encoder_key(b - a)))
            parts.append(to_host(encoder.run({"frames": np.ascontiguousarray(x[:, :, a:b])})["latents"]))
        return np.concatenate(parts, axis=2)

    return np.concatenate([encode(np.ascontiguousarray(mask, np.float32)), encode(masked)], axis=1)


def clip_condition(config: ModelConfig, req: GenerationRequest, clip_encoder=None
                   ) -> tuple[np.ndarray, np.ndarray] | None:
    d = config.dit
    if not d.clip_channels:
        return None
    embeds = np.zeros((2, d.clip_channels), np.float32)
    clip_mask = np.zeros((2, d.clip_tokens), np.float32)
    if req.image is not None:
        if clip_encoder is None:
            log.warning("image-to-video without a CLIP vision model: the DiT gets no CLIP image embedding "
                        "(as upstream without a clip_image); pass clip_model= to add it")
        else:
            embeds[1] = clip_encoder(np.asarray(req.image))[0].float().numpy()
            clip_mask[1] = 1.0
    return embeds, clip_mask
