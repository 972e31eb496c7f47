"""Per-clip scores for filtering (paper section 5, DESIGN.md 3.2).

- motion: mean Farneback optical-flow magnitude (pixels, at the clip's resolution)
  between consecutive grey frames sampled at 2 fps; 0 for a still clip.
- text_area: fraction of the middle frame covered by detected text. The detector is
  PaddleOCR's DB text detector (PP-OCRv6 small) as packaged by ``rapidocr``, whose
  wheel ships the ONNX weights, run with ONNX Runtime; nothing is downloaded. Another
  DB-style ONNX detector can be given as a local file (``TextDetector(model_path=...)``).
  The area is the union of the detected text polygons.
- aesthetic: the LAION aesthetic predictor (improved-aesthetic-predictor, an MLP on
  L2-normalised CLIP ViT-L/14 image embeddings) on 4 uniformly spaced frames, averaged.
  It needs a local CLIP folder (transformers format) and the MLP weights file; without
  them the score is recorded as missing (null plus a reason), never invented.
- basic: frames, fps, size and duration, measured by decoding the clip.

Frame positions: the middle frame is ``frames // 2``; the 4 uniform frames are the
centres of 4 equal segments (``uniform_indices``); the 2 fps samples are the frames
nearest to t = 0, 0.5, 1.0, ... s.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from easyanimate_rt.errors import CheckpointError, InputError, MissingDependencyError
from easyanimate_rt import media as vio
from easyanimate_rt.data.manifest import ClipRecord, rebase_path

logger = logging.getLogger(__name__)

SCORE_NAMES = ("motion", "text_area", "aesthetic")
MOTION_FPS = 2.0
AESTHETIC_FRAMES = 4


def uniform_indices(frames: int, count: int) -> list[int]:
    """Centres of ``count`` equal segments of a ``frames``-long clip."""
    return [min(frames - 1, int((i + 0.5) * frames / count)) for i in range(count)]


def motion_indices(frames: int, fps: float, sample_fps: float = MOTION_FPS) -> list[int]:
    """Frames nearest to t = 0, 1/sample_fps, 2/sample_fps, ... within the clip."""
    step = fps / sample_fps
    count = int(math.floor((frames - 1) / step + 1e-9)) + 1
    return sorted({min(frames - 1, int(round(i * step))) for i in range(count)})


def _require_cv2(purpose: str):
    try:
        import cv2
    except ImportError as e:
        raise MissingDependencyError("opencv-python-headless", extra="data", purpose=purpose) from e
    return cv2


def motion_score(gray_frames: Sequence[np.ndarray]) -> float:
    """Mean Farneback flow magnitude over consecutive pairs of grey frames."""
    cv2 = _require_cv2("the motion score")
    if len(gray_frames) < 2:
        raise InputError(f"motion needs at least 2 sampled frames, got {len(gray_frames)}")
    means = []
    for prev, nxt in zip(gray_frames[:-1], gray_frames[1:]):
        # OpenCV's usual parameters: pyramid scale 0.5, 3 levels, window 15, 3 iterations,
        # polynomial expansion 5 / 1.2.
        flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, 3, 15, 3, 5, 1.2, 0)
        magnitude = np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2)
        means.append(float(magnitude.mean()))
    return float(np.mean(means))


class TextDetector:
    """Detected-text area fraction of an RGB frame (rapidocr's DB detector, det only)."""

    def __init__(self, model_path: str | Path | None = None, threads: int = 1):
        try:
            from rapidocr import RapidOCR
        except ImportError as e:
            raise MissingDependencyError("rapidocr", extra="data", purpose="the text-area score") from e
        params: dict[str, Any] = {
            "Global.use_cls": False,
            "Global.use_rec": False,
            "Global.log_level": "error",
            "EngineConfig.onnxruntime.intra_op_num_threads": int(threads),
            "EngineConfig.onnxruntime.inter_op_num_threads": 1,
        }
        if model_path is not None:
            model_path = Path(model_path)
            if not model_path.is_file():
                raise CheckpointError(f"text detector model {model_path} does not exist")
            params["Det.model_path"] = str(model_path)
        self._engine = RapidOCR(params=params)

    def boxes(self, rgb: np.ndarray) -> list[np.ndarray]:
        cv2 = _require_cv2("the text-area score")
        out = self._engine(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))  # the engine wants BGR
        boxes = getattr(out, "boxes", None)
        return [] if boxes is None else [np.asarray(b, dtype=np.float32) for b in boxes]

    def area_fraction(self, rgb: np.ndarray) -> float:
        cv2 = _require_cv2("the text-area score")
        height, width = rgb.shape[:2]
        mask = np.zeros((height, width), dtype=np.uint8)
        for box in self.boxes(rgb):
            cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
        return float(mask.mean())


class AestheticScorer:
    """LAION aesthetic MLP on CLIP image embeddings, both from local paths."""

    def __init__(self, clip_path: str | Path, head_path: str | Path, device: str = "cpu"):
        import torch

        try:
            from transformers import AutoImageProcessor, CLIPImageProcessor, CLIPVisionModelWithProjection
        except ImportError as e:
            raise MissingDependencyError("transformers", extra="data", purpose="the aesthetic score") from e
        from easyanimate_rt.data.aesthetic import load_aesthetic_head

        clip_path, head_path = Path(clip_path), Path(head_path)
        if not (clip_path / "config.json").is_file():
            raise CheckpointError(f"CLIP folder {clip_path} has no config.json")
        self.device = torch.device(device)
        self.model = CLIPVisionModelWithProjection.from_pretrained(str(clip_path)).eval().to(self.device)
        try:
            self.processor = AutoImageProcessor.from_pretrained(str(clip_path))
        except (OSError, ValueError):
            size = self.model.config.image_size
            logger.warning("%s has no image processor config; using CLIP defaults at %d px", clip_path, size)
            self.processor = CLIPImageProcessor(size={"shortest_edge": size},
                                                crop_size={"height": size, "width": size})
        self.head = load_aesthetic_head(head_path).eval().to(self.device)
        dim = self.model.config.projection_dim
        if self.head.input_size != dim:
            raise CheckpointError(
                f"aesthetic head takes {self.head.input_size}-d embeddings but the CLIP model gives {dim}-d"
            )

    def __call__(self, frames: Sequence[np.ndarray]) -> float:
        import torch

        with torch.inference_mode():
            pixels = self.processor(images=list(frames), return_tensors="pt")["pixel_values"]
            emb = self.model(pixel_values=pixels.to(self.device)).image_embeds  # (N, D)
            emb = emb / emb.norm(dim=-1, keepdim=True)
            return float(self.head(emb.float()).mean())


@dataclass(frozen=True)
class ScoreConfig:
    scores: tuple[str, ...] = SCORE_NAMES
    text_model: str | None = None  # local ONNX DB detector; None = the one rapidocr ships
    clip_model: str | None = None
    aesthetic_head: str | None = None
    device: str = "cpu"

    def __post_init__(self) -> None:
        unknown = [s for s in self.scores if s not in SCORE_NAMES]
        if unknown:
            raise InputError(f"scores must be among {SCORE_NAMES}, got {unknown}")
        if (self.clip_model is None) != (self.aesthetic_head is None):
            raise InputError("the aesthetic score needs both a CLIP folder and an aesthetic head file")
        for name in ("clip_model", "aesthetic_head", "text_model"):
            value = getattr(self, name)
            if value is not None and not Path(value).exists():
                raise InputError(f"{name} path {value} does not exist")

    @property
    def aesthetic_enabled(self) -> bool:
        return "aesthetic" in self.scores and self.clip_model is not None


@dataclass
class ScoreTask:
    """One manifest record -> the same record with basic fields, scores and missing reasons."""

    in_root: Path  # folder relative clip paths are resolved against
    out_root: Path  # folder of the output manifest
    config: ScoreConfig = field(default_factory=ScoreConfig)
    name: str = "score"

    def __post_init__(self) -> None:
        self._text: TextDetector | None = None
        self._aesthetic: AestheticScorer | None = None

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_text"] = state["_aesthetic"] = None  # models are loaded per process
        return state

    def check(self) -> None:
        _require_cv2("the motion and text-area scores")
        if "text_area" in self.config.scores:
            try:
                import rapidocr  # noqa: F401
            except ImportError as e:
                raise MissingDependencyError("rapidocr", extra="data", purpose="the text-area score") from e

    def setup(self, threads: int) -> None:
        cv2 = _require_cv2("the motion score")
        cv2.setNumThreads(threads)
        if "text_area" in self.config.scores and self._text is None:
            self._text = TextDetector(self.config.text_model, threads=threads)
        if self.config.aesthetic_enabled and self._aesthetic is None:
            import torch

            torch.set_num_threads(threads)
            self._aesthetic = AestheticScorer(self.config.clip_model, self.config.aesthetic_head,
                                              self.config.device)

    def __call__(self, data: dict) -> list[dict]:
        record = ClipRecord.from_dict(data)
        path = record.resolve(self.in_root)
        info = vio.probe(path)
        want_motion = "motion" in self.config.scores
        motion_idx = motion_indices(info.frames, info.fps) if want_motion else []
        middle = info.frames // 2
        uniform = uniform_indices(info.frames, AESTHETIC_FRAMES) if self.config.aesthetic_enabled else []
        rgb_idx = set(uniform) | ({middle} if "text_area" in self.config.scores else set())

        # 1. one decoding pass collects every frame any score needs
        cv2 = _require_cv2("the motion score")
        gray: dict[int, np.ndarray] = {}
        rgb: dict[int, np.ndarray] = {}
        motion_set = set(motion_idx)
        last = max([*motion_set, *rgb_idx], default=-1)
        for index, frame in enumerate(vio.iter_frames(path)):
            if index in rgb_idx:
                rgb[index] = frame.copy()
            if index in motion_set:
                gray[index] = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
            if index >= last:
                break
        if len(gray) < len(motion_idx) or len(rgb) < len(rgb_idx):
            raise vio.VideoReadError(f"video {path} ended before frame {last}")

        scores: dict[str, float | None] = dict(record.scores)
        # reasons of earlier runs stay only for scores this run does not recompute
        missing: dict[str, str] = {k: v for k, v in record.missing.items() if k not in self.config.scores}

        # 2. motion
        if want_motion and len(gray) >= 2:
            scores["motion"] = motion_score([gray[i] for i in sorted(gray)])
        elif want_motion:
            scores["motion"] = None
            missing["motion"] = f"clip shorter than one {MOTION_FPS:g} fps step ({info.frames} frames)"
        # 3. text area on the middle frame
        if "text_area" in self.config.scores:
            assert self._text is not None, "setup() was not called"
            scores["text_area"] = self._text.area_fraction(rgb[middle])
        # 4. aesthetic on 4 uniform frames, or recorded as missing
        if self.config.aesthetic_enabled:
            assert self._aesthetic is not None, "setup() was not called"
            scores["aesthetic"] = self._aesthetic([rgb[i] for i in uniform])
        elif "aesthetic" in self.config.scores:
            scores["aesthetic"] = None
            missing["aesthetic"] = "no aesthetic model given (--clip-model and --aesthetic-head)"
        for name in SCORE_NAMES:
            if name not in self.config.scores and name not in scores:
                scores[name] = None
                missing[name] = "not requested"

        out = record.to_dict()
        out.update(path=rebase_path(record.path, self.in_root, self.out_root), frames=info.frames,
                   fps=info.fps, width=info.width, height=info.height, duration=info.duration,
                   scores=scores, missing=missing)
        if not missing:
            out.pop("missing", None)
        return [out]



def score_clips(manifest: str | Path, output: str | Path, config: ScoreConfig = ScoreConfig(), *,
                workers: int = 1, progress: bool = False):
    """Score every clip of ``manifest`` into ``output`` (resumable; see ``parallel``)."""
    from easyanimate_rt.data.parallel import run_manifest_stage

    return run_manifest_stage(lambda src, dst: ScoreTask(src, dst, config), manifest, output,
                              workers=workers, progress=progress)
