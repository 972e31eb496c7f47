"""Training data sources: a manifest of video files, or the synthetic shapes world.

Every source is a map-style dataset whose item ``i`` is a pure function of ``i``:
``{"video": FloatTensor (3, F, H, W) in [-1, 1], "caption": str}``. The trainers draw
indices from (seed, step), so data order survives a resume.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F_
from torch.utils.data import Dataset

from ..errors import InputError
from ..media import from_uint8, read_video

log = logging.getLogger(__name__)


def resize_center_crop(video: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(3, F, H, W) -> (3, F, height, width): scale the short side, crop the centre."""
    _, f, h, w = video.shape
    scale = max(height / h, width / w)
    nh, nw = max(height, round(h * scale)), max(width, round(w * scale))
    if (nh, nw) != (h, w):
        video = F_.interpolate(video.transpose(0, 1), size=(nh, nw), mode="bilinear",
                               align_corners=False, antialias=True).transpose(0, 1)
    top, left = (nh - height) // 2, (nw - width) // 2
    return video[:, :, top:top + height, left:left + width]


class ManifestDataset(Dataset):
    """Clips listed in a JSONL manifest (the data pipeline's output); the first
    ``frames`` frames of each clip (clips shorter than that are skipped), resized and
    centre-cropped to ``height`` x ``width``."""

    def __init__(self, manifest: str | Path, frames: int, height: int, width: int):
        from ..data.manifest import read_manifest

        self.root = Path(manifest).parent
        records = read_manifest(manifest)
        self.records = [r for r in records if r.frames >= frames]
        if not self.records:
            raise InputError(f"manifest {manifest} has no clip with at least {frames} frames "
                             f"({len(records)} records in all)")
        self.frames, self.height, self.width = frames, height, width

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        rec = self.records[i]
        path = Path(rec.path)
        frames, _ = read_video(path if path.is_absolute() else self.root / path)
        video = from_uint8(frames[: self.frames])
        return {"video": resize_center_crop(video, self.height, self.width), "caption": rec.caption}


def shapes_sources(frames: int, size: int, length: int, seed: int, split: str = "train"
                   ) -> tuple[Dataset, Dataset]:
    """(stills, clips) of the synthetic shapes world for the default model's recipe."""
    from ..shapes.world import ShapesDataset

    stills = ShapesDataset(split=split, frames=1, size=size, length=length, seed=seed + 1, still_fraction=1.0)
    clips = ShapesDataset(split=split, frames=frames, size=size, length=length, seed=seed)
    return stills, clips
