"""Scene split (paper section 5, DESIGN.md 3.1): raw videos -> 3-10 s single-scene clips.

1. PySceneDetect's ContentDetector runs as a cascade of (threshold, frame skip)
   passes, by default (10, 0), (20, 1), (30, 2). A low threshold on every frame finds
   soft cuts; the coarser passes add cuts the first one misses. Their cuts are unioned;
   a cut from a pass that skips ``s`` frames can be up to ``s`` frames late, so it is
   dropped when a finer pass already has a cut within ``s`` frames of it.
2. Scenes shorter than ``min_seconds`` are dropped. Scenes longer than ``max_seconds``
   are split into ``ceil(len / max)`` equal pieces (all content kept); if such pieces
   would be shorter than ``min_seconds``, into whole ``max_seconds`` pieces with the
   remainder dropped.
3. Each clip is cut with ffmpeg (``video.cut_clip``: a stream copy where that is exact,
   else a frame-exact re-encode) and written atomically.

The output folder is a dataset folder of ours, marked by ``dataset.json``: split writes
only into a folder that is new, empty or marked (or, for a dataset split before the
marker existed, holds split's ledger ``clips.log.jsonl``), and refuses anything else
before any work, so it never writes among, or over, the user's files.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from easyanimate_rt.errors import InputError, MissingDependencyError
from easyanimate_rt import media as vio
from easyanimate_rt.fileio import atomic_write_text, claim_dir

logger = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".ts")
DEFAULT_CASCADE: tuple[tuple[float, int], ...] = ((10.0, 0), (20.0, 1), (30.0, 2))
CLIPS_MANIFEST = "clips.jsonl"
DATASET_MARKER = "dataset.json"
DATASET_KIND = "easyanimate-rt dataset"
#: The marker; for a dataset split before it existed, split's ledger.
DATASET_MARKERS = (DATASET_MARKER, "clips.log.jsonl")


@dataclass(frozen=True)
class SplitConfig:
    cascade: tuple[tuple[float, int], ...] = DEFAULT_CASCADE
    min_seconds: float = 3.0
    max_seconds: float = 10.0
    min_scene_len: int = 15  # frames; ContentDetector's guard against flashes
    cut_mode: str = "auto"

    def __post_init__(self) -> None:
        if not self.cascade:
            raise InputError("cascade needs at least one (threshold, frame_skip) pass")
        for threshold, skip in self.cascade:
            if not threshold > 0:
                raise InputError(f"cascade thresholds must be > 0, got {threshold}")
            if int(skip) != skip or skip < 0:
                raise InputError(f"cascade frame skips must be integers >= 0, got {skip}")
        if not 0 < self.min_seconds <= self.max_seconds:
            raise InputError(
                f"need 0 < min_seconds <= max_seconds, got {self.min_seconds} and {self.max_seconds}"
            )
        if self.min_scene_len < 1:
            raise InputError(f"min_scene_len must be >= 1 frame, got {self.min_scene_len}")
        if self.cut_mode not in vio.CUT_MODES:
            raise InputError(f"cut mode must be one of {vio.CUT_MODES}, got {self.cut_mode!r}")


def parse_cascade(text: str) -> tuple[tuple[float, int], ...]:
    """``"10:0,20:1,30:2"`` -> ((10.0, 0), (20.0, 1), (30.0, 2))."""
    passes = []
    for part in text.split(","):
        try:
            threshold, skip = part.split(":")
            passes.append((float(threshold), int(skip)))
        except ValueError as e:
            raise InputError(f"cascade must look like 10:0,20:1,30:2, got {text!r}") from e
    return tuple(passes)


def find_videos(in_dir: str | Path) -> list[Path]:
    """Video files under ``in_dir`` (recursive), sorted."""
    in_dir = Path(in_dir)
    if not in_dir.is_dir():
        raise InputError(f"input folder {in_dir} does not exist")
    return sorted(p for p in in_dir.rglob("*") if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                  and not p.name.startswith("."))


def merge_cuts(passes: Sequence[tuple[int, Sequence[int]]]) -> list[int]:
    """Union the cuts of several passes, given as (frame_skip, cuts).

    Finer passes (smaller skip) are trusted first; a cut from a pass with skip ``s`` is
    dropped if an accepted cut lies within ``s`` frames of it.
    """
    accepted: list[int] = []
    for skip, cuts in sorted(passes, key=lambda p: p[0]):
        for cut in sorted(set(int(c) for c in cuts)):
            if all(abs(cut - a) > skip for a in accepted) and cut not in accepted:
                accepted.append(cut)
    return sorted(accepted)


def detect_cuts(path: str | Path, cascade: Sequence[tuple[float, int]] = DEFAULT_CASCADE,
                min_scene_len: int = 15) -> tuple[list[int], int, float, tuple[int, int]]:
    """Cut frames of a video by the ContentDetector cascade.

    Returns (cuts, frame count, fps, (width, height)); a cut is the first frame of a new
    scene.
    """
    try:
        from scenedetect import ContentDetector, SceneManager, VideoOpenFailure, open_video
    except ImportError as e:
        raise MissingDependencyError("scenedetect", extra="data", purpose="scene splitting") from e
    try:
        stream = open_video(str(path), backend="opencv")
    except (VideoOpenFailure, OSError) as e:
        raise vio.VideoReadError(f"cannot open video {path}: {e}") from e
    fps = float(stream.frame_rate)
    size = tuple(int(v) for v in stream.frame_size)
    passes = []
    frames = 0
    for threshold, skip in cascade:
        stream.reset()
        manager = SceneManager()
        manager.auto_downscale = True
        manager.add_detector(ContentDetector(threshold=threshold, min_scene_len=min_scene_len))
        manager.detect_scenes(stream, frame_skip=int(skip))
        scenes = manager.get_scene_list()
        passes.append((int(skip), [start.frame_num for start, _ in scenes[1:]]))
        frames = max(frames, stream.frame_number)
    if frames < 1 or fps <= 0:
        raise vio.VideoReadError(f"video {path} has no decodable frames")
    return merge_cuts(passes), frames, fps, (size[0], size[1])


def plan_clips(cuts: Sequence[int], frames: int, fps: float, min_seconds: float = 3.0,
               max_seconds: float = 10.0) -> list[tuple[int, int]]:
    """Clips as (start_frame, end_frame exclusive) from the cuts of a ``frames``-long video."""
    min_frames = max(1, math.ceil(min_seconds * fps - 1e-6))
    max_frames = max(min_frames, math.floor(max_seconds * fps + 1e-6))
    bounds = [0, *[c for c in sorted(set(cuts)) if 0 < c < frames], frames]
    clips: list[tuple[int, int]] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        length = end - start
        if length < min_frames:
            continue
        if length <= max_frames:
            clips.append((start, end))
            continue
        pieces = math.ceil(length / max_frames)
        if length // pieces >= min_frames:
            edges = [start + round(i * length / pieces) for i in range(pieces + 1)]
        else:
            edges = [start + i * max_frames for i in range(length // max_frames + 1)]
        clips.extend(zip(edges[:-1], edges[1:]))
    return clips


def clip_name(source_rel: Path, start: int, end: int) -> str:
    stem = "__".join(source_rel.with_suffix("").parts)
    return f"{stem}-{start:07d}-{end:07d}.mp4"


@dataclass
class SplitTask:
    """One source video -> its clips under ``out_dir/clips`` and their records."""

    in_dir: Path
    out_dir: Path
    config: SplitConfig
    name: str = "split"

    def check(self) -> None:
        try:
            import cv2  # noqa: F401
            import scenedetect  # noqa: F401
        except ImportError as e:
            raise MissingDependencyError(e.name or "scenedetect", extra="data",
                                         purpose="scene splitting") from e
        vio.ffmpeg_exe()

    def setup(self, threads: int) -> None:
        import cv2

        cv2.setNumThreads(threads)

    def __call__(self, source: Path) -> list[dict]:
        cfg = self.config
        cuts, frames, fps, (width, height) = detect_cuts(source, cfg.cascade, cfg.min_scene_len)
        plan = plan_clips(cuts, frames, fps, cfg.min_seconds, cfg.max_seconds)
        keyframes = vio.keyframe_indices(source, fps) if cfg.cut_mode == "auto" and plan else None
        rel = source.resolve().relative_to(self.in_dir.resolve())
        records = []
        for start, end in plan:
            rel_clip = Path("clips") / clip_name(rel, start, end)
            how, n = vio.cut_clip(source, self.out_dir / rel_clip, start, end - start, fps,
                                  mode=cfg.cut_mode, keyframes=keyframes,
                                  source_frames=frames)
            records.append({
                "path": rel_clip.as_posix(), "caption": "", "frames": n, "fps": fps,
                "width": width, "height": height, "duration": n / fps,
                "start": start / fps, "end": end / fps, "start_frame": start, "end_frame": end,
                "source": str(source.resolve()), "cut": how,
            })
        logger.info("%s: %d cuts, %d clips", source, len(cuts), len(records))
        return records


def is_dataset_dir(path: str | Path) -> bool:
    """Whether ``path`` is a dataset folder split wrote: its ``dataset.json`` says so, or
    (a dataset from before the marker) it holds a ledger of split's."""
    from easyanimate_rt.data.parallel import ledger_path, ledger_stage

    path = Path(path)
    try:
        info = json.loads((path / DATASET_MARKER).read_text(encoding="utf-8"))
        if isinstance(info, dict) and info.get("kind") == DATASET_KIND:
            return True
    except (OSError, ValueError):
        pass
    return ledger_stage(ledger_path(path / CLIPS_MANIFEST)) in ("", "split")


def claim_dataset_dir(path: str | Path, option: str = "--out") -> Path:
    """An InputError, before any work, unless ``path`` is new, empty or a dataset folder
    of ours (:func:`is_dataset_dir`)."""
    return claim_dir(path, DATASET_MARKERS, "dataset folder", option, is_ours=is_dataset_dir)


def split_videos(in_dir: str | Path, out_dir: str | Path, config: SplitConfig = SplitConfig(), *,
                 manifest: str | Path | None = None, workers: int = 1, progress: bool = False):
    """Split every video under ``in_dir`` into clips under ``out_dir/clips``.

    Records go to ``manifest`` (default ``out_dir/clips.jsonl``), with clip paths
    relative to ``out_dir``. Resumable; see ``parallel``. ``out_dir`` must be new, empty
    or a dataset folder of ours (:func:`claim_dataset_dir`), else an InputError before
    any work; it is marked with ``dataset.json``.
    """
    from easyanimate_rt.data.parallel import claim_output, run_stage

    in_dir, out_dir = Path(in_dir), Path(out_dir)
    manifest = Path(manifest) if manifest is not None else out_dir / CLIPS_MANIFEST
    if manifest.resolve().parent != out_dir.resolve():
        raise InputError(f"the split manifest must sit in the output folder {out_dir}, got {manifest}")
    # 0. before any work: the folder and the manifest in it must be new or ours
    claim_dataset_dir(out_dir)
    sources = find_videos(in_dir)
    task = SplitTask(in_dir, out_dir, config)
    claim_output(manifest, task.name, option="--out")
    if not (out_dir / DATASET_MARKER).exists():
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(out_dir / DATASET_MARKER, json.dumps(
            {"format": 1, "kind": DATASET_KIND, "created_by": "data split", "source": str(in_dir.resolve()),
             "created": created}, indent=2) + "\n")
    items = [(p.resolve().relative_to(in_dir.resolve()).as_posix(), p) for p in sources]
    return run_stage(task, items, manifest, workers=workers, progress=progress)
