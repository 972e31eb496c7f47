"""Reading and writing videos as uint8 arrays (F, H, W, 3).

mp4 goes through the ffmpeg binary that imageio-ffmpeg ships; gif and png through
imageio's pillow plugin. Files are written to a temporary name and renamed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .io import atomic_path

VIDEO_SUFFIXES = (".mp4", ".gif", ".png")


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) in [-1, 1] -> (F, H, W, 3) uint8."""
    x = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).cpu().numpy()


def from_uint8(frames: np.ndarray) -> torch.Tensor:
    """(F, H, W, 3) uint8 -> (3, F, H, W) float in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float() / 127.5 - 1.0
    return x.permute(3, 0, 1, 2)


def save_video(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """Write frames (F, H, W, 3) uint8 to mp4, gif, or png (first frame; for 1-frame output)."""
    import imageio.v3 as iio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise InputError(f"output file must end in one of {list(VIDEO_SUFFIXES)}, got {path.name!r}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise InputError(f"frames must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    with atomic_path(path) as tmp:
        if suffix == ".mp4":
            import imageio_ffmpeg

            h, w = frames.shape[1:3]
            writer = imageio_ffmpeg.write_frames(
                str(tmp), (w, h), fps=fps, codec="libx264", quality=None,
                output_params=["-crf", "18", "-f", "mp4"], macro_block_size=1, pix_fmt_out="yuv420p")
            writer.send(None)
            for frame in frames:
                writer.send(np.ascontiguousarray(frame))
            writer.close()
        elif suffix == ".gif":
            iio.imwrite(tmp, frames, extension=".gif", duration=1000 / fps, loop=0)
        else:
            iio.imwrite(tmp, frames[0], extension=".png")
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """(frames (F, H, W, 3) uint8, fps)."""
    import imageio.v3 as iio

    path = Path(path)
    if not path.exists():
        raise InputError(f"video file not found: {path}")
    if path.suffix.lower() == ".mp4":
        import imageio_ffmpeg

        reader = imageio_ffmpeg.read_frames(str(path))
        meta = reader.__next__()
        w, h = meta["size"]
        frames = [np.frombuffer(buf, np.uint8).reshape(h, w, 3) for buf in reader]
        return np.stack(frames), float(meta["fps"])
    frames = iio.imread(path, index=None)
    if frames.ndim == 3:
        frames = frames[None]
    return np.ascontiguousarray(frames[..., :3]), 8.0
