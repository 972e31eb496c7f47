"""The moving-shapes world of the shipped default model.

One flat-coloured shape on a flat background, moving in a straight line, standing
still, growing or shrinking. Everything is a pure function of a seed, so a data set is
reproducible and a sample can be drawn on the fly by index.

Attributes (the whole vocabulary of the captions):
- shape: ``SHAPES``; colour: ``COLOURS``; background: ``BACKGROUNDS``; size: ``SIZES``;
  motion: ``MOTIONS`` (``TRANSLATIONS`` plus static, growing, shrinking).
- A background is never paired with a colour closer than ``MIN_CONTRAST`` (CIE76 delta E
  in Lab), so the shape always stands out (navy is never used under blue or purple).

Captions, one regular pattern each::

    a small red circle moving left on a white background      (left/right/up/down)
    a large blue square static on a black background          (static)
    a green triangle growing on a gray background              (growing/shrinking: no size word)
    a small red circle on a white background                   (still image)

Geometry. Positions and speeds are fractions of the frame side, so a spec renders at any
resolution. A translating shape moves at a constant ``speed`` (1.15-2.5 px/frame at 64
px; capped lower for large shapes and long clips so the path fits); its path over the
clip length it was sampled for stays inside the frame and passes through its centre
(the path's midpoint lies within ``PATH_JITTER`` of the centre on both axes). A static
shape sits anywhere it fits. Growing goes from the small
to the large radius over that clip length, shrinking the other way. Edges are
anti-aliased by 4x4 supersampling: sub-pixel motion stays smooth and there is no noise
or texture, so an autoencoder reproduces it easily.

Held-out split. A (colour, shape, motion) combination is held out when
``(i_colour + 2 i_shape + 3 i_motion) mod 7 == 0``. Since 3 is invertible mod 7 and the
lists have at most 7 entries, every (colour, shape) pair has exactly one held-out motion
(so 24 of the 168 combinations, 14.3%, are held out), and every (colour, motion) and
(shape, motion) pair has at most one held-out partner: each pair of attribute values,
and so each single value, still appears in training. Still images have no motion and are
not split: every (colour, shape) pair appears in training videos anyway.

Files on disk. Videos are H.264 in mp4 encoded losslessly in RGB (``libx264rgb -qp 0``,
with the ffmpeg that imageio-ffmpeg ships): decoding gives back the exact frames, where
even ``yuv444p -crf 0`` would be off by the RGB<->YUV rounding. Browsers do not play RGB
H.264; ffmpeg (and so ``read_video`` and the data pipeline) does. Still images are PNG.
"""

from __future__ import annotations

import functools
import logging
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from torch.utils.data import Dataset

from ..errors import InputError
from ..media import from_uint8, write_clip

logger = logging.getLogger(__name__)

#: Bump when rendering changes, so a resumed data set can tell old clips from new.
GENERATOR_VERSION = 2  # 2: translation paths through the frame centre

DEFAULT_SIZE = 64
DEFAULT_FRAMES = 17  # 1 + 2 * 8: the slice VAE trains its image and its video path
DEFAULT_FPS = 8

SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
TRANSLATIONS = ("left", "right", "up", "down")
MOTIONS = TRANSLATIONS + ("static", "growing", "shrinking")
SPLITS = ("train", "heldout")

_COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 30),
    "green": (30, 165, 60),
    "blue": (30, 70, 225),
    "yellow": (245, 215, 30),
    "purple": (150, 40, 170),
    "orange": (250, 145, 20),
}
_BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "navy": (25, 30, 80),
}
COLOURS = tuple(_COLOUR_RGB)
BACKGROUNDS = tuple(_BACKGROUND_RGB)

#: Least CIE76 delta E between a shape's colour and its background.
MIN_CONTRAST = 65.0

#: Shape radius as a fraction of the frame side. A circle has this radius; a square
#: and a diamond about the same area; a triangle's circumradius is 1.15 radii.
SIZE_RADIUS = {"small": 0.11, "large": 0.18}
_EXTENT = 1.15  # every shape lies within this many radii of its centre
_MARGIN = 0.02  # kept free between the shape and the frame edge (fraction of the side)
SPEED_RANGE = (0.018, 0.04)  # translation speed, fraction of the side per frame
PATH_JITTER = 0.08  # a translation path's midpoint lies this close to the frame centre (along its axis)
_SUPERSAMPLE = 4

_DIRECTION = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}
_HELDOUT_MODULUS, _HELDOUT_RESIDUE = 7, 0


# --------------------------------------------------------------------------- colours

def colour_rgb(name: str) -> tuple[int, int, int]:
    """sRGB of a shape colour or background name."""
    if name in _COLOUR_RGB:
        return _COLOUR_RGB[name]
    if name in _BACKGROUND_RGB:
        return _BACKGROUND_RGB[name]
    raise InputError(f"unknown colour {name!r}; colours are {list(COLOURS)}, backgrounds {list(BACKGROUNDS)}")


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in 0..255 (..., 3) -> CIE Lab (..., 3), D65 white."""
    c = np.asarray(rgb, dtype=np.float64) / 255.0
    c = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = (c @ m.T) / np.array([0.95047, 1.0, 1.08883])
    d = 6.0 / 29.0
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d * d) + 4.0 / 29.0)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def delta_e(a: str, b: str) -> float:
    """CIE76 colour difference between two named colours."""
    return float(np.linalg.norm(srgb_to_lab(colour_rgb(a)) - srgb_to_lab(colour_rgb(b))))


@functools.lru_cache(maxsize=None)
def allowed_backgrounds(colour: str) -> tuple[str, ...]:
    """The backgrounds a shape of ``colour`` may be drawn on (contrast >= MIN_CONTRAST)."""
    if colour not in _COLOUR_RGB:
        raise InputError(f"colour must be one of {list(COLOURS)}, got {colour!r}")
    return tuple(b for b in BACKGROUNDS if delta_e(colour, b) >= MIN_CONTRAST)


# --------------------------------------------------------------------------- split

def combination_split(colour: str, shape: str, motion: str) -> str:
    """``"train"`` or ``"heldout"`` for a (colour, shape, motion) combination."""
    try:
        key = COLOURS.index(colour) + 2 * SHAPES.index(shape) + 3 * MOTIONS.index(motion)
    except ValueError:
        raise InputError(f"unknown combination ({colour!r}, {shape!r}, {motion!r})") from None
    return "heldout" if key % _HELDOUT_MODULUS == _HELDOUT_RESIDUE else "train"


def combinations(split: str) -> list[tuple[str, str, str]]:
    """The (colour, shape, motion) combinations of a split, in a fixed order."""
    _check_split(split)
    return [(c, s, m) for c in COLOURS for s in SHAPES for m in MOTIONS
            if combination_split(c, s, m) == split]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise InputError(f"split must be one of {list(SPLITS)}, got {split!r}")


# --------------------------------------------------------------------------- specs

@dataclass(frozen=True)
class ShapeSpec:
    """Everything needed to render one sample.

    ``x``, ``y``: the centre at frame 0, fractions of the frame side (y grows downwards).
    ``speed``: for a translation, the distance moved per frame; for growing/shrinking,
    the change of radius per frame; both fractions of the frame side; 0 otherwise.
    ``still``: a still image (motion is then ``"static"``; the caption has no motion).
    """

    shape: str
    colour: str
    background: str
    size: str
    motion: str
    x: float
    y: float
    speed: float = 0.0
    still: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (("shape", SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS),
                              ("size", SIZES), ("motion", MOTIONS)):
            if getattr(self, name) not in allowed:
                raise InputError(f"{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.background not in allowed_backgrounds(self.colour):
            raise InputError(f"background {self.background!r} is too close to colour {self.colour!r}; "
                             f"allowed: {list(allowed_backgrounds(self.colour))}")
        if self.still and self.motion != "static":
            raise InputError(f"a still image has motion 'static', got {self.motion!r}")
        if not (math.isfinite(self.speed) and self.speed >= 0):
            raise InputError(f"speed must be a finite number >= 0, got {self.speed!r}")

    @property
    def caption(self) -> str:
        thing = f"{self.colour} {self.shape}"
        on = f"on a {self.background} background"
        if self.still:
            return f"a {self.size} {thing} {on}"
        if self.motion in TRANSLATIONS:
            return f"a {self.size} {thing} moving {self.motion} {on}"
        if self.motion == "static":
            return f"a {self.size} {thing} static {on}"
        return f"a {thing} {self.motion} {on}"  # growing / shrinking: the size changes

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.motion)

    def radius_at(self, t: float) -> float:
        """Radius at frame ``t`` (fraction of the frame side)."""
        r = SIZE_RADIUS[self.size]
        if self.motion == "growing":
            r += self.speed * t
        elif self.motion == "shrinking":
            r -= self.speed * t
        return max(r, 0.01)

    def centre_at(self, t: float) -> tuple[float, float]:
        """Centre at frame ``t`` (fractions of the frame side)."""
        dx, dy = _DIRECTION.get(self.motion, (0.0, 0.0))
        return self.x + dx * self.speed * t, self.y + dy * self.speed * t

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ShapeSpec":
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def sample_spec(rng: np.random.Generator, split: str = "train", still: bool = False,
                frames: int = DEFAULT_FRAMES) -> ShapeSpec:
    """Draw a spec whose path over ``frames`` frames stays inside the frame.

    Videos draw their (colour, shape, motion) uniformly from the split's combinations;
    stills draw any (colour, shape) in either split. Background, size, speed and position
    are then drawn uniformly from what the combination allows.
    """
    _check_split(split)
    if frames < 1:
        raise InputError(f"frames must be >= 1, got {frames}")
    if still:
        colour, shape, motion = COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))], "static"
    else:
        combos = combinations(split)
        colour, shape, motion = combos[rng.integers(len(combos))]
    backgrounds = allowed_backgrounds(colour)
    background = backgrounds[rng.integers(len(backgrounds))]
    size = {"growing": "small", "shrinking": "large"}.get(motion) or SIZES[rng.integers(len(SIZES))]
    steps = max(frames - 1, 1)

    # Room for the centre: the largest radius the shape reaches, plus a margin.
    r_max = SIZE_RADIUS["large"] if motion in ("growing", "shrinking") else SIZE_RADIUS[size]
    lo = _EXTENT * r_max + _MARGIN
    hi = 1.0 - lo
    speed = 0.0
    x, y = rng.uniform(lo, hi), rng.uniform(lo, hi)
    if motion in TRANSLATIONS:
        # The fastest speed whose path still fits; below SPEED_RANGE only for long clips.
        top = min(SPEED_RANGE[1], (hi - lo) / steps)
        speed = float(rng.uniform(min(SPEED_RANGE[0], top), top))
        travel = speed * steps
        dx, dy = _DIRECTION[motion]
        # The path [along, along + travel] passes through the frame centre (its midpoint
        # within PATH_JITTER of it on both axes) so that the average clip of a caption
        # shows its direction; with paths placed anywhere, the mean clips of "left" and
        # "right" coincide and a small DiT does not learn the direction word (MODEL_CARD.md).
        jitter = min(PATH_JITTER, max(0.0, (hi - lo - travel) / 2))
        along = 0.5 + rng.uniform(-jitter, jitter) - travel / 2
        across = 0.5 + rng.uniform(-PATH_JITTER, PATH_JITTER)
        if dx:
            x, y = (along if dx > 0 else along + travel), across
        else:
            y, x = (along if dy > 0 else along + travel), across
    elif motion in ("growing", "shrinking"):
        speed = (SIZE_RADIUS["large"] - SIZE_RADIUS["small"]) / steps
    return ShapeSpec(shape=shape, colour=colour, background=background, size=size, motion=motion,
                     x=float(x), y=float(y), speed=float(speed), still=still)


def caption_corpus() -> list[str]:
    """Every caption the generator can make, either split, sorted (for the tokenizer)."""
    out: set[str] = set()
    for colour in COLOURS:
        for background in allowed_backgrounds(colour):
            for shape in SHAPES:
                for size in SIZES:
                    out.add(ShapeSpec(shape, colour, background, size, "static", 0.5, 0.5, still=True).caption)
                    for motion in MOTIONS:
                        out.add(ShapeSpec(shape, colour, background, size, motion, 0.5, 0.5).caption)
    return sorted(out)


# --------------------------------------------------------------------------- render

def _inside(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Whether points at offsets (dx, dy) from the centre, in radii, lie in the shape."""
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.1
    if shape == "triangle":  # equilateral, pointing up, circumradius _EXTENT
        r = _EXTENT
        return (dy <= r / 2) & (np.abs(dx) * math.sqrt(3.0) <= dy + r)
    raise AssertionError(shape)


def render(spec: ShapeSpec, frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Frames (F, size, size, 3) uint8 of a spec.

    Paths are planned for the ``frames`` given to ``sample_spec``; render at most that
    many frames to keep the shape inside the frame.
    """
    if frames < 1:
        raise InputError(f"frames must be >= 1, got {frames}")
    if size < 8:
        raise InputError(f"size must be >= 8 pixels, got {size}")
    bg = np.array(colour_rgb(spec.background), dtype=np.float64)
    fg = np.array(colour_rgb(spec.colour), dtype=np.float64)
    video = np.empty((frames, size, size, 3), dtype=np.uint8)
    video[:] = bg.astype(np.uint8)
    n = _SUPERSAMPLE
    offsets = (np.arange(n) + 0.5) / n  # sample points inside a pixel
    for t in range(frames):
        cx, cy = (c * size for c in spec.centre_at(t))
        r = spec.radius_at(t) * size
        # Only the pixels of the shape's bounding box can be covered.
        x0, x1 = max(int(math.floor(cx - _EXTENT * r)) - 1, 0), min(int(math.ceil(cx + _EXTENT * r)) + 1, size)
        y0, y1 = max(int(math.floor(cy - _EXTENT * r)) - 1, 0), min(int(math.ceil(cy + _EXTENT * r)) + 1, size)
        if x1 <= x0 or y1 <= y0:
            continue
        xs = (np.arange(x0, x1)[:, None] + offsets).reshape(-1)   # (w*n,)
        ys = (np.arange(y0, y1)[:, None] + offsets).reshape(-1)   # (h*n,)
        inside = _inside(spec.shape, (xs[None, :] - cx) / r, (ys[:, None] - cy) / r)  # (h*n, w*n)
        cover = inside.reshape(y1 - y0, n, x1 - x0, n).mean(axis=(1, 3))           # (h, w)
        patch = bg + cover[..., None] * (fg - bg)                                     # (h, w, 3)
        video[t, y0:y1, x0:x1] = np.rint(patch).astype(np.uint8)
    return video


# --------------------------------------------------------------------------- datasets

def sample_at(index: int, split: str = "train", seed: int = 0, frames: int = DEFAULT_FRAMES,
              still_fraction: float = 0.0) -> ShapeSpec:
    """The spec of sample ``index`` of a data set: a pure function of its arguments."""
    _check_split(split)
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    still = bool(rng.random() < still_fraction)  # drawn always, so the stream never shifts
    return sample_spec(rng, split, still=still, frames=frames)


class ShapesDataset(Dataset):
    """Map-style data set of rendered samples; item ``i`` depends only on (seed, split, i).

    Item: ``{"video": FloatTensor (3, F, size, size) in [-1, 1], "caption": str,
    "spec": ShapeSpec.to_dict()}``, with F = 1 for a still image (a fraction
    ``still_fraction`` of the items) and ``frames`` otherwise.
    """

    def __init__(self, split: str = "train", frames: int = DEFAULT_FRAMES, size: int = DEFAULT_SIZE,
                 length: int = 10_000, seed: int = 0, still_fraction: float = 0.0):
        _check_split(split)
        if frames < 1 or size < 8 or length < 0:
            raise InputError(f"need frames >= 1, size >= 8, length >= 0; got {frames}, {size}, {length}")
        if not 0.0 <= still_fraction <= 1.0:
            raise InputError(f"still_fraction must be in [0, 1], got {still_fraction}")
        self.split, self.frames, self.size, self.length = split, frames, size, length
        self.seed, self.still_fraction = seed, still_fraction

    def __len__(self) -> int:
        return self.length

    def spec(self, i: int) -> ShapeSpec:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for a data set of {self.length}")
        return sample_at(i, self.split, self.seed, self.frames, self.still_fraction)

    def frames_of(self, i: int) -> np.ndarray:
        """Item ``i`` as uint8 frames (F, H, W, 3)."""
        spec = self.spec(i)
        return render(spec, 1 if spec.still else self.frames, self.size)

    def __getitem__(self, i: int) -> dict[str, Any]:
        spec = self.spec(i)
        video = render(spec, 1 if spec.still else self.frames, self.size)
        return {"video": from_uint8(video), "caption": spec.caption, "spec": spec.to_dict()}


# --------------------------------------------------------------------------- files

def _settings(split: str, seed: int, frames: int, size: int, fps: float, still_fraction: float) -> dict:
    return {"generator_version": GENERATOR_VERSION, "split": split, "seed": seed, "frames": frames,
            "size": size, "fps": float(fps), "still_fraction": float(still_fraction)}


def _clip_name(split: str, index: int, still: bool) -> str:
    return f"clips/{split}_{index:06d}.{'png' if still else 'mp4'}"


def _write_one(root: str, settings: dict, index: int) -> dict:
    """Render and write clip ``index``; return its manifest record (runs in a worker)."""
    s = settings
    spec = sample_at(index, s["split"], s["seed"], s["frames"], s["still_fraction"])
    frames = 1 if spec.still else s["frames"]
    name = _clip_name(s["split"], index, spec.still)
    write_clip(render(spec, frames, s["size"]), Path(root) / name, s["fps"])
    return {"path": name, "caption": spec.caption, "frames": frames, "fps": s["fps"],
            "width": s["size"], "height": s["size"],
            "attributes": spec.to_dict(), "synthetic": {**s, "index": index}}


def write_dataset(out_dir: str | Path, n: int, split: str = "train", frames: int = DEFAULT_FRAMES,
                  size: int = DEFAULT_SIZE, fps: float = DEFAULT_FPS, seed: int = 0,
                  still_fraction: float = 0.0, workers: int = 1) -> Path:
    """Write samples 0..n-1 of ``ShapesDataset(split, frames, size, n, seed, still_fraction)``
    as clips under ``out_dir/clips`` plus ``out_dir/manifest.jsonl``; return the manifest path.

    Records carry the spec under ``attributes`` and the generator settings and sample
    index under ``synthetic``. Resumable: a clip whose record is already in the manifest
    is skipped, so a rerun after an interruption writes only what is missing. A manifest
    written with other settings is refused rather than mixed.
    """
    from ..data.manifest import append_records, read_manifest, write_manifest

    if n < 0 or workers < 1:
        raise InputError(f"need n >= 0 and workers >= 1, got n={n}, workers={workers}")
    ShapesDataset(split, frames, size, n, seed, still_fraction)  # validates the settings
    if not (math.isfinite(fps) and fps > 0):
        raise InputError(f"fps must be a positive number, got {fps!r}")
    root = Path(out_dir)
    manifest = root / "manifest.jsonl"
    settings = _settings(split, seed, frames, size, fps, still_fraction)
    done: set[str] = set()
    if manifest.is_file():
        for rec in read_manifest(manifest):
            theirs = {k: v for k, v in rec.extra.get("synthetic", {}).items() if k != "index"}
            if theirs != settings:
                raise InputError(f"{manifest} was written with other settings ({theirs}); "
                                 f"expected {settings}: use another out_dir")
            done.add(rec.path)
    todo = [i for i in range(n)
            if _clip_name(split, i, sample_at(i, split, seed, frames, still_fraction).still) not in done]
    logger.info("%s: %d of %d clips to write", manifest, len(todo), n)
    batch: list[dict] = []
    # Records are appended in batches: an interruption loses at most one batch of
    # records, whose clips are then simply rewritten on the next run.
    if workers == 1:
        results = (_write_one(str(root), settings, i) for i in todo)
        pool = None
    else:
        pool = ProcessPoolExecutor(max_workers=workers)
        results = pool.map(_write_one, [str(root)] * len(todo), [settings] * len(todo), todo, chunksize=8)
    try:
        for record in results:
            batch.append(record)
            if len(batch) >= 64:
                append_records(manifest, batch)
                batch = []
        if batch:
            append_records(manifest, batch)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if not manifest.exists():
        write_manifest(manifest, [])  # n == 0: still leave a (valid, empty) manifest
    return manifest
