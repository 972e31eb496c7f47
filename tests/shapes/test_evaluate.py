"""The shapes evaluation scores any pipeline object, not only the reference pipeline."""

from dataclasses import dataclass

import numpy as np
import pytest

from easyanimate_rt.errors import InputError
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.shapes.evaluate import evaluate, heldout_specs
from easyanimate_rt.shapes.world import render

CONFIG = from_preset("shapes")


@dataclass
class _Video:
    frames: np.ndarray


class OraclePipeline:
    """Draws exactly the prompted clip (ground-truth renders), or mirrors it in time."""

    config = CONFIG

    def __init__(self, reverse: bool = False):
        s = CONFIG.sampling
        self.by_caption = {spec.caption: spec for spec in heldout_specs(8, s.frames, s.height)}
        self.reverse = reverse
        self.seeds: list[int] = []

    def generate(self, prompt: str, seed: int = 0, steps=None, guidance_scale=None) -> _Video:
        self.seeds.append(seed)
        frames = render(self.by_caption[prompt], CONFIG.sampling.frames, CONFIG.sampling.height)
        return _Video(frames[::-1].copy() if self.reverse else frames)


def test_an_oracle_scores_full_marks_and_a_time_reversed_one_loses_direction():
    oracle = OraclePipeline()
    noisy = np.random.default_rng(0)

    def reconstruct(frames):
        return np.clip(frames.astype(np.int16) + noisy.integers(-2, 3, frames.shape), 0, 255).astype(np.uint8)

    report = evaluate(oracle, prompts=8, vae_clips=2, seed=5, reconstruct=reconstruct)
    assert oracle.seeds == list(range(5, 13))
    assert report.prompts == 8 and report.direction_prompts == 6
    assert report.colour_rate == 1.0 and report.direction_rate == 1.0 and report.coherent_rate == 1.0
    assert report.vae_colour_rate == 1.0 and 40.0 < report.vae_psnr < 50.0  # +-2 levels of noise: ~44 dB
    reverse = evaluate(OraclePipeline(reverse=True), prompts=8, vae_clips=0)
    assert reverse.colour_rate == 1.0 and reverse.direction_rate == 0.0


def test_a_pipeline_without_a_reference_vae_needs_reconstruct():
    with pytest.raises(InputError, match="no reference VAE.*reconstruct="):
        evaluate(OraclePipeline(), prompts=0, vae_clips=1)
