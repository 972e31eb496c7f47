"""Quality evaluation of a shapes-world model on held-out attribute combinations.

Used by ``benchmarks/eval_shapes.py`` (the full evaluation in MODEL_CARD.md) and by a
small CI test. Prompts are the captions of held-out (colour, shape, motion)
combinations, which never appear in training; seeds are fixed.

- VAE: PSNR of encode -> decode on held-out clips (uint8 frames, 255 peak), and the
  share of reconstructions whose dominant colour is still the clip's (the ceiling of
  the generation colour metric: a hue the latent loses, the DiT cannot draw).
- Generation: dominant colour matches the prompt; centroid direction matches for
  translating motions; the object stays one coherent blob (see shapes.metrics).

Any pipeline object scores: it needs ``config`` (a ``ModelConfig``, for the sampling
size) and ``generate(prompt, seed=, steps=, guidance_scale=)`` returning an object with
uint8 ``frames`` (F, H, W, 3): the reference pipeline, and the runtime's pipeline on any
backend. The VAE figures need a ``reconstruct`` function (frames -> frames); a
pipeline holding a reference model (``pipe.model.vae``) gets one by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import numpy as np

from ..errors import InputError
from ..media import from_uint8, to_uint8
from ..reference.config import ModelConfig
from .metrics import dominant_colour, psnr, score_video
from .world import TRANSLATIONS, ShapesDataset, ShapeSpec


class VideoPipeline(Protocol):
    """What :func:`evaluate` needs of a pipeline."""

    config: ModelConfig

    def generate(self, prompt: str, **kwargs: Any) -> Any: ...


Reconstruct = Callable[[np.ndarray], np.ndarray]


@dataclass
class ShapesReport:
    vae_psnr: float | None = None
    vae_colour_rate: float | None = None
    prompts: int = 0
    colour_rate: float = 0.0
    direction_rate: float = 0.0
    direction_prompts: int = 0
    coherent_rate: float = 0.0
    seconds_per_video: float = 0.0
    rows: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "rows"}


def heldout_specs(n: int, frames: int, size: int, seed: int = 1234, translating_share: float = 0.75
                  ) -> list[ShapeSpec]:
    """``n`` held-out specs: mostly translating motions (they carry the direction metric)."""
    ds = ShapesDataset(split="heldout", frames=frames, size=size, length=100 * n, seed=seed)
    want_move = round(n * translating_share)
    moving, other = [], []
    for i in range(len(ds)):
        spec = ds.spec(i)
        (moving if spec.motion in TRANSLATIONS else other).append(spec)
        if len(moving) >= want_move and len(other) >= n - want_move:
            break
    return moving[:want_move] + other[: n - want_move]


def reference_reconstruct(pipe: Any) -> Reconstruct:
    """encode -> decode through the reference VAE of ``pipe.model`` (on ``pipe.device``)."""
    import torch

    vae = getattr(getattr(pipe, "model", None), "vae", None)
    if vae is None:
        raise InputError(f"{type(pipe).__name__} holds no reference VAE (pipe.model.vae): pass reconstruct= "
                         f"to score the VAE, or vae_clips=0")
    device = getattr(pipe, "device", "cpu")

    @torch.no_grad()
    def reconstruct(frames: np.ndarray) -> np.ndarray:
        video = from_uint8(frames)[None].to(device)                         # (1, 3, F, H, W)
        return to_uint8(vae.decode(vae.encode(video))[0])                   # (F, H, W, 3)

    return reconstruct


def vae_fidelity(reconstruct: Reconstruct, clips: int, frames: int, size: int, seed: int = 99
                 ) -> tuple[float, float]:
    """(mean PSNR, share of clips whose reconstruction keeps the dominant colour)."""
    ds = ShapesDataset(split="heldout", frames=frames, size=size, length=clips, seed=seed)
    psnrs, colour_ok = [], []
    for i in range(clips):
        truth = ds.frames_of(i)                                             # (F, H, W, 3)
        recon = reconstruct(truth)
        psnrs.append(psnr(recon, truth))
        colour_ok.append(dominant_colour(recon) == ds.spec(i).colour)
    return float(np.mean(psnrs)), float(np.mean(colour_ok))


def evaluate(pipe: VideoPipeline, prompts: int = 48, vae_clips: int = 16, steps: int | None = None,
             guidance_scale: float | None = None, seed: int = 0,
             progress: Callable[[int, int], None] | None = None,
             reconstruct: Reconstruct | None = None) -> ShapesReport:
    """Score ``pipe`` on ``prompts`` held-out prompts (seeds ``seed``, ``seed + 1``, ...)
    and, with ``vae_clips``, its VAE on held-out clips."""
    cfg = pipe.config.sampling
    size, frames = cfg.height, cfg.frames
    report = ShapesReport()
    if vae_clips:
        reconstruct = reconstruct or reference_reconstruct(pipe)
        report.vae_psnr, report.vae_colour_rate = vae_fidelity(reconstruct, vae_clips, frames, size)
    specs = heldout_specs(prompts, frames, size)
    t0 = time.perf_counter()
    for k, spec in enumerate(specs):
        out = pipe.generate(spec.caption, seed=seed + k, steps=steps, guidance_scale=guidance_scale)
        score = score_video(out.frames, spec)
        report.rows.append({"prompt": spec.caption, "seed": seed + k, **score})
        if progress is not None:
            progress(k + 1, len(specs))
    report.seconds_per_video = (time.perf_counter() - t0) / max(1, len(specs))
    rows = report.rows
    report.prompts = len(rows)
    if not rows:
        return report
    report.colour_rate = float(np.mean([r["colour_ok"] for r in rows]))
    moving = [r for r in rows if r["direction_ok"] is not None]
    report.direction_prompts = len(moving)
    report.direction_rate = float(np.mean([r["direction_ok"] for r in moving])) if moving else 0.0
    report.coherent_rate = float(np.mean([r["coherent"] for r in rows]))
    return report
