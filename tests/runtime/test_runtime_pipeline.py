"""The runtime against the reference pipeline: same seed, sampler and steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exported import build_model
from needs import require

from easyanimate_rt.engines.buckets import Bucket
from easyanimate_rt.errors import InputError, ShapeError
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.reference.weights import save_model
from easyanimate_rt.shapes.metrics import psnr


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model with every zero-initialised branch randomised, as a model directory."""
    return save_model(build_model("tiny"), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def ort_pipe(model_dir, tmp_path_factory):
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(model_dir, backend="ort", cache_dir=tmp_path_factory.mktemp("cache"),
                                    buckets=[Bucket(64, 64, 9), Bucket(32, 64, 9)], threads=1)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpm++"])
def test_ort_runtime_matches_the_reference_pipeline(ort_pipe, model_dir, sampler):
    ref = ReferencePipeline.from_pretrained(model_dir)
    kwargs = dict(steps=4, sampler=sampler, seed=3, frames=9, height=64, width=64)
    want = ref.generate("a red circle moving left", **kwargs)
    got = ort_pipe("a red circle moving left", **kwargs)
    assert (got.latents - want.latents).abs().max() <= 1e-3
    assert got.frames.shape == want.frames.shape and psnr(got.frames, want.frames) >= 40
    assert set(got.timings) == {"text", "denoise", "decode"}


def test_torch_backend_equals_the_reference(model_dir):
    from easyanimate_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_dir, backend="torch")
    ref = ReferencePipeline.from_pretrained(model_dir)
    kwargs = dict(steps=3, seed=1, frames=9, height=32, width=64)
    got, want = pipe("a blue square", **kwargs), ref.generate("a blue square", **kwargs)
    torch.testing.assert_close(got.latents, want.latents, rtol=1e-5, atol=1e-5)
    assert np.abs(got.frames.astype(int) - want.frames).max() <= 1


def test_a_size_outside_the_built_buckets_names_them(ort_pipe):
    with pytest.raises(ShapeError, match="outside every profile this engine was built for"):
        ort_pipe("x", steps=1, frames=9, height=64, width=32)
    with pytest.raises(InputError, match="height must be a positive multiple of 16, got 40"):
        ort_pipe("x", steps=1, height=40)
