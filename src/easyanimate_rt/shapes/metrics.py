"""Measurements on videos of the shapes world: colour, motion, coherence, PSNR.

They read only pixels, so the same functions score ground-truth renders and generated
videos (``benchmarks/eval_shapes.py``). Videos are uint8 (F, H, W, 3); a single frame
(H, W, 3) is taken as a 1-frame video.

Foreground. A frame's background is the per-channel median of its one-pixel border
(the shape never covers most of the border), unless given. A pixel is foreground when
its CIE76 colour difference (Lab) from the background exceeds ``FOREGROUND_DELTA_E``.

Connected components are 4-connected, found with a small numpy labelling (min-label
propagation with pointer jumping), so scipy is not needed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError
from .world import COLOURS, TRANSLATIONS, ShapeSpec, colour_rgb, srgb_to_lab

#: A pixel differing from the background by more than this (CIE76 delta E) is foreground.
FOREGROUND_DELTA_E = 25.0
#: Total centroid travel below this fraction of the frame side counts as no translation.
STATIC_SHIFT = 0.06
#: Fitted area change over the clip beyond this factor counts as growing/shrinking.
GROWTH_RATIO = 1.5
#: Coherence thresholds; see ``is_coherent_blob``.
MIN_MAIN_FRACTION = 0.8
MAX_FOREGROUND_FRACTION = 0.5
MIN_BLOB_PIXELS = 4  # smaller components are speckle
MAX_AREA_JUMP = 1.5
MIN_GOOD_FRACTION = 0.9

_COLOUR_LAB = srgb_to_lab(np.array([colour_rgb(c) for c in COLOURS], dtype=np.float64))  # (K, 3)


def _as_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim == 3:
        video = video[None]
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 1:
        raise InputError(f"video must be uint8 (F, H, W, 3) or (H, W, 3), got {video.dtype} {video.shape}")
    return video


def estimate_background(frame: np.ndarray) -> np.ndarray:
    """Background sRGB (3,) of a frame (H, W, 3): the median of its border pixels."""
    border = np.concatenate([frame[0], frame[-1], frame[1:-1, 0], frame[1:-1, -1]])   # (2H+2W-4, 3)
    return np.median(border.astype(np.float64), axis=0)


def _mask_lab(lab: np.ndarray, bg_lab: np.ndarray) -> np.ndarray:
    return np.linalg.norm(lab - bg_lab, axis=-1) > FOREGROUND_DELTA_E


def _masks(video: np.ndarray, background_rgb: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray]:
    """(Lab video (F, H, W, 3), foreground masks (F, H, W))."""
    lab = srgb_to_lab(video)
    masks = np.empty(video.shape[:3], dtype=bool)
    for t, frame in enumerate(video):
        bg = estimate_background(frame) if background_rgb is None else np.asarray(background_rgb, np.float64)
        masks[t] = _mask_lab(lab[t], srgb_to_lab(bg))
    return lab, masks


def label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of a bool (H, W) mask: (labels int (H, W), 0 = background, count)."""
    h, w = mask.shape
    none = h * w
    lab = np.where(mask, np.arange(h * w).reshape(h, w), none)
    down, right = mask[:-1] & mask[1:], mask[:, :-1] & mask[:, 1:]  # both ends foreground
    while True:
        new = lab.copy()
        # Each pixel takes the smallest label among itself and its foreground neighbours.
        np.minimum(new[1:], np.where(down, lab[:-1], none), out=new[1:])
        np.minimum(new[:-1], np.where(down, lab[1:], none), out=new[:-1])
        np.minimum(new[:, 1:], np.where(right, lab[:, :-1], none), out=new[:, 1:])
        np.minimum(new[:, :-1], np.where(right, lab[:, 1:], none), out=new[:, :-1])
        # Pointer jumping: a label is a pixel index; follow it to that pixel's label.
        flat = new.reshape(-1)
        fg = flat < none
        for _ in range(4):
            flat[fg] = flat[flat[fg]]
        if np.array_equal(new, lab):
            break
        lab = new
    # Roots sorted: `none` (background) is the largest, so foreground labels are 1..count.
    roots, inverse = np.unique(lab.reshape(-1), return_inverse=True)
    labels = inverse.reshape(h, w) + 1
    labels[~mask] = 0
    return labels, int(len(roots) - (~mask).any())


def dominant_colour(video: np.ndarray, background_rgb: Sequence[float] | None = None) -> str | None:
    """The named colour (``COLOURS``) of the foreground: each frame votes the colour that
    most of its interior foreground pixels are nearest to (Lab); the majority of frames
    wins (ties: the earlier colour in COLOURS). None when no frame has a foreground.

    Interior pixels (the mask eroded by one pixel; the whole mask if erosion empties it)
    leave out anti-aliased edges, whose blend with the background is another colour.
    """
    video = _as_video(video)
    lab, masks = _masks(video, background_rgb)
    votes: Counter[int] = Counter()
    for t in range(video.shape[0]):
        core = _erode(masks[t])
        pick = core if core.any() else masks[t]
        if not pick.any():
            continue
        d = np.linalg.norm(lab[t][pick][:, None, :] - _COLOUR_LAB[None], axis=-1)   # (P, K)
        counts = np.bincount(d.argmin(axis=1), minlength=len(COLOURS))
        votes[int(counts.argmax())] += 1
    if not votes:
        return None
    best = max(votes.values())
    return COLOURS[min(k for k, v in votes.items() if v == best)]


def _erode(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    out[1:] &= mask[:-1]
    out[:-1] &= mask[1:]
    out[:, 1:] &= mask[:, :-1]
    out[:, :-1] &= mask[:, 1:]
    out[0] = out[-1] = False
    out[:, 0] = out[:, -1] = False
    return out


def _fit_slope(t: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of y over t."""
    t = t - t.mean()
    return float((t * (y - y.mean())).sum() / max((t * t).sum(), 1e-12))


def motion_direction(video: np.ndarray, background_rgb: Sequence[float] | None = None) -> str:
    """The motion of the foreground: one of ``left, right, up, down, static, growing, shrinking``.

    The foreground centroid of each frame that has a foreground is fitted by least
    squares against time; the fitted travel over the clip (slope x (F - 1)) decides.
    Travel of at least STATIC_SHIFT of the frame side is a translation, named by its
    larger axis (image y grows downwards, so +y is ``down``). Otherwise a fitted area
    change (log-area slope) beyond GROWTH_RATIO over the clip is ``growing``/``shrinking``,
    else ``static``. Fewer than two frames with a foreground give ``static``.
    """
    video = _as_video(video)
    _, masks = _masks(video, background_rgb)
    f, h, w = masks.shape
    area = masks.sum(axis=(1, 2))
    t = np.flatnonzero(area > 0)
    if len(t) < 2:
        return "static"
    ys, xs = np.mgrid[0:h, 0:w]
    cx = (masks[t] * xs).sum(axis=(1, 2)) / area[t]
    cy = (masks[t] * ys).sum(axis=(1, 2)) / area[t]
    span = f - 1
    dx, dy = _fit_slope(t.astype(float), cx) * span, _fit_slope(t.astype(float), cy) * span
    if np.hypot(dx, dy) >= STATIC_SHIFT * max(h, w):
        if abs(dx) >= abs(dy):
            return "right" if dx > 0 else "left"
        return "down" if dy > 0 else "up"
    growth = np.exp(_fit_slope(t.astype(float), np.log(area[t].astype(float))) * span)
    if growth > GROWTH_RATIO:
        return "growing"
    if growth < 1.0 / GROWTH_RATIO:
        return "shrinking"
    return "static"


def blob_stats(video: np.ndarray, background_rgb: Sequence[float] | None = None) -> dict[str, Any]:
    """Per-frame coherence figures behind ``is_coherent_blob``."""
    video = _as_video(video)
    _, masks = _masks(video, background_rgb)
    f, h, w = masks.shape
    frame_ok, main_area = [], []
    for mask in masks:
        total = int(mask.sum())
        if total == 0:
            frame_ok.append(False)
            main_area.append(0)
            continue
        labels, count = label_components(mask)
        sizes = np.bincount(labels.reshape(-1), minlength=count + 1)[1:]
        blobs = sizes[sizes >= MIN_BLOB_PIXELS]  # smaller components are speckle (noise)
        main = int(blobs.max()) if len(blobs) else 0
        main_area.append(main)
        frame_ok.append(main > 0 and main >= MIN_MAIN_FRACTION * blobs.sum()
                        and total <= MAX_FOREGROUND_FRACTION * h * w)
    pair_ok = []
    for t in range(f - 1):
        if frame_ok[t] and frame_ok[t + 1]:
            a, b = main_area[t], main_area[t + 1]
            pair_ok.append(max(a, b) <= MAX_AREA_JUMP * min(a, b))
    return {"frame_ok": frame_ok, "main_area": main_area, "pair_ok": pair_ok,
            "frame_fraction": sum(frame_ok) / f,
            "pair_fraction": sum(pair_ok) / len(pair_ok) if pair_ok else 1.0}


def is_coherent_blob(video: np.ndarray, background_rgb: Sequence[float] | None = None) -> bool:
    """Whether the foreground is one solid object throughout the video.

    Definition. Foreground pixels: CIE76 delta E > 25 from the frame's background
    (median of the frame's border pixels). Blobs: 4-connected components of the
    foreground of at least 4 pixels (smaller ones are speckle and are ignored). A frame is
    good when it has a blob, its foreground covers at most 50% of the frame, and its
    largest blob holds at least 80% of the pixels of all its blobs. A pair of
    consecutive good frames is stable when the larger of their largest-component areas
    is at most 1.5 times the smaller. The video is coherent when at least 90% of its
    frames are good and at least 90% of its pairs of consecutive good frames are stable
    (a video with no such pair passes the second test).
    """
    s = blob_stats(video, background_rgb)
    return s["frame_fraction"] >= MIN_GOOD_FRACTION and s["pair_fraction"] >= MIN_GOOD_FRACTION


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB (inf for identical inputs); same shapes required."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"psnr needs equal shapes, got {a.shape} and {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def score_video(video: np.ndarray, spec: ShapeSpec | Mapping[str, Any]) -> dict[str, Any]:
    """Score a video against the spec of its prompt.

    ``colour_ok``: ``dominant_colour == spec.colour``. ``direction_ok``: the measured
    motion equals a translating spec motion (None for static, growing, shrinking and
    stills). ``motion_ok``: the measured motion equals the spec's for every motion (None
    for a 1-frame video). ``coherent``: ``is_coherent_blob``. ``colour`` and ``motion``
    are the measured values. The background is estimated from the pixels.
    """
    if not isinstance(spec, ShapeSpec):
        spec = ShapeSpec.from_dict(spec)
    video = _as_video(video)
    colour = dominant_colour(video)
    motion = motion_direction(video)
    moving = spec.motion in TRANSLATIONS and not spec.still
    return {
        "colour": colour,
        "motion": motion,
        "colour_ok": colour == spec.colour,
        "direction_ok": (motion == spec.motion) if moving else None,
        "motion_ok": (motion == spec.motion) if video.shape[0] > 1 else None,
        "coherent": is_coherent_blob(video),
    }
