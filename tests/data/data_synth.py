"""Synthetic videos for the data-pipeline tests, written with imageio (libx264)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from needs import require

cv2 = require("cv2")

FPS = 10
CUTS = (43, 87)  # first frames of scenes 2 and 3
CUT_VIDEO_FRAMES = 130
PAN_PX_PER_FRAME = 1  # 5 px between the 2 fps samples of a 10 fps clip
TEXT = "SALE 50%"
TEXT_SCALE, TEXT_THICKNESS = 0.8, 2


def write_video(path: Path, frames, fps: int = FPS, keyframes_s: str | None = None) -> Path:
    import imageio.v2 as iio

    params = ["-force_key_frames", keyframes_s] if keyframes_s else None
    writer = iio.get_writer(str(path), fps=fps, codec="libx264", macro_block_size=16,
                            ffmpeg_log_level="error", output_params=params)
    for frame in frames:
        writer.append_data(np.ascontiguousarray(frame))
    writer.close()
    return path


def texture(height: int, width: int, seed: int, sigma: float = 3.0) -> np.ndarray:
    """Smooth grey random texture, full 0-255 range (uint8, (H, W))."""
    noise = np.random.default_rng(seed).integers(0, 256, (height, width)).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), sigma)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (smooth * 255).astype(np.uint8)


def cut_video_frames() -> list[np.ndarray]:
    """Three scenes with hard cuts at CUTS: noisy red, a still texture, blue with a moving square."""
    rng = np.random.default_rng(1)
    tex = np.stack([texture(64, 64, 2)] * 3, axis=-1)
    frames = []
    for i in range(CUT_VIDEO_FRAMES):
        if i < CUTS[0]:
            f = np.full((64, 64, 3), (200, 40, 40), np.int16) + rng.integers(-8, 8, (64, 64, 3))
        elif i < CUTS[1]:
            f = tex.astype(np.int16)
        else:
            f = np.full((64, 64, 3), (30, 40, 190), np.int16)
            x = 4 + (i - CUTS[1])
            f[20:36, x:x + 16] = 240
        frames.append(np.clip(f, 0, 255).astype(np.uint8))
    return frames


def pan_frames(px_per_frame: int, n: int = 30, seed: int = 3) -> list[np.ndarray]:
    """A camera pan over a texture (px_per_frame = 0: a still clip)."""
    big = texture(80, 96 + px_per_frame * n + 8, seed)
    return [np.repeat(big[8:72, 4 + px_per_frame * i: 4 + px_per_frame * i + 96, None], 3, axis=2)
            for i in range(n)]


def text_frames(with_text: bool, n: int = 10) -> tuple[list[np.ndarray], float]:
    """A softly textured 128x128 background, optionally with TEXT drawn; returns the text box area fraction."""
    bg = (texture(128, 128, 4, sigma=6) // 4 + 40).astype(np.uint8)
    frame = np.repeat(bg[..., None], 3, axis=2)
    area = 0.0
    if with_text:
        (w, h), baseline = cv2.getTextSize(TEXT, cv2.FONT_HERSHEY_SIMPLEX, TEXT_SCALE, TEXT_THICKNESS)
        frame = frame.copy()
        org = (8, 64 + h // 2)
        cv2.putText(frame, TEXT, org, cv2.FONT_HERSHEY_SIMPLEX, TEXT_SCALE, (255, 255, 255),
                    TEXT_THICKNESS, cv2.LINE_AA)
        area = w * (h + baseline) / (128 * 128)
    return [frame] * n, area


def clip_record(path: Path, root: Path, frames: int, **extra) -> dict:
    return {"path": path.relative_to(root).as_posix(), "caption": "", "frames": frames, "fps": float(FPS),
            "width": 1, "height": 1, **extra}
