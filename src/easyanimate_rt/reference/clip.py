"""CLIP image encoder for image-to-video with InP models (upstream V3:
``transformers.CLIPVisionModelWithProjection`` + ``CLIPImageProcessor``, ViT-L/14,
768-d ``image_embeds``). Weights load from a local directory; nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, InputError


class ClipImageEncoder:
    """``encoder(image (H, W, 3) uint8) -> (1, K)`` CLIP image embedding."""

    def __init__(self, model, processor, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> "ClipImageEncoder":
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        path = Path(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"CLIP vision model directory {path} has no config.json "
                                  f"(a local CLIPVisionModelWithProjection directory is needed)")
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(str(path), local_files_only=True)
            processor = CLIPImageProcessor.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the CLIP vision model at {path}: {exc}") from None
        return cls(model, processor, device)

    @torch.no_grad()
    def __call__(self, image: np.ndarray) -> torch.Tensor:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise InputError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=pixels).image_embeds.float()                # (1, K)
