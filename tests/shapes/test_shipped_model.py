"""The model that ships with the package (issue 3): loads, generates, knows its colours."""

from pathlib import Path

import numpy as np
import pytest

from easyanimate_rt.cli import default_model
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.shapes.evaluate import evaluate


@pytest.fixture(scope="module")
def pipe():
    model = default_model()
    assert Path(model).is_dir(), "the shapes model must ship in easyanimate_rt/assets/shapes"
    return ReferencePipeline.from_pretrained(model)


def test_shipped_model_is_small_and_complete():
    root = Path(default_model())
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 30e6, size
    assert (root / "MODEL_CARD.md").exists()


@pytest.mark.parametrize("frames", [1, 17])
def test_generates_the_right_shape(pipe, frames):
    out = pipe.generate("a small red circle moving left on a white background", frames=frames, steps=5)
    assert out.frames.shape == (frames, 64, 64, 3) and out.frames.dtype == np.uint8
    assert out.fps == 8


def test_vae_reconstructs_heldout_clips_and_their_colours(pipe):
    """A VAE that loses hue (orange and yellow objects encoded alike) caps the colour of
    every generated video; the model before VAE stage 3 kept the colour of 67% of clips."""
    report = evaluate(pipe, prompts=0, vae_clips=8)
    assert report.vae_psnr >= 28.0, report.vae_psnr
    assert report.vae_colour_rate >= 0.875, report.vae_colour_rate


@pytest.fixture(scope="module")
def heldout_report(pipe):
    """A 12-prompt slice of benchmarks/eval_shapes.py: held-out combinations, seeds 0-11."""
    return evaluate(pipe, prompts=12, vae_clips=0)


def test_direction_on_heldout_prompts(heldout_report):
    assert heldout_report.direction_prompts >= 4
    assert heldout_report.direction_rate >= 0.7, heldout_report.rows


def test_coherent_blob_on_heldout_prompts(heldout_report):
    assert heldout_report.coherent_rate >= 0.8, heldout_report.rows


def test_colour_on_heldout_prompts(heldout_report):
    """Regression check on the CI slice. Over the full 48 prompts the model is at 85.4%
    (MODEL_CARD.md, benchmarks/eval_shapes.py); on 12 prompts one standard error is ~10
    points, and seeds 0-11 measure 75% (orange drawn yellow at seeds 3, 4 and 7, as in
    the full run), so the bar here is the full run's bar less one standard error."""
    assert heldout_report.colour_rate >= 0.7, heldout_report.rows
