"""The shipped colour LoRA (tests/fixtures/lora/, made by `train lora`) has the effect
it was trained for on the shipped model: held-out prompts naming another colour come out
red at weight 1, and weight 0 gives the base model's video bit for bit
(benchmarks/lora_effect.py measures the whole curve)."""

from pathlib import Path

import numpy as np
import pytest

from easyanimate_rt.cli import default_model
from easyanimate_rt.reference.lora import Adapter, LoraMerger, read_lora
from easyanimate_rt.shapes.evaluate import heldout_specs
from easyanimate_rt.shapes.metrics import dominant_colour

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "lora" / "red-rank4.safetensors"

pytestmark = pytest.mark.skipif(default_model() == "tiny", reason="the shipped shapes model is not installed")


@pytest.fixture(scope="module")
def pipe():
    from easyanimate_rt.reference.pipeline import ReferencePipeline

    return ReferencePipeline.from_pretrained(default_model())


def test_fixture_is_a_rank_4_kohya_file():
    lora = read_lora(Adapter.open(FIXTURE))
    assert lora.format == "kohya" and {layer.rank for layer in lora.layers} == {4}
    assert FIXTURE.stat().st_size < 500_000


def test_red_lora_turns_other_colours_red_and_weight_0_is_the_base(pipe):
    specs = [s for s in heldout_specs(24, 17, 64) if s.colour != "red"][:2]
    merger = LoraMerger.of(pipe.model)
    try:
        base = pipe.generate(specs[0].caption, seed=0).frames
        merger.merge([Adapter.open(FIXTURE, 0.0)])
        assert np.array_equal(pipe.generate(specs[0].caption, seed=0).frames, base)
        merger.merge([Adapter.open(FIXTURE, 1.0)])
        colours = [dominant_colour(pipe.generate(s.caption, seed=k).frames) for k, s in enumerate(specs)]
    finally:
        merger.unmerge()
    assert colours == ["red"] * len(specs), (colours, [s.caption for s in specs])
