"""A whole generation per GPU backend (marked ``gpu``; skipped with the reason where the
card or the backend's library is missing): engines built and gated on first use, the
video against the reference pipeline's on the same seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exported import build_model

from easyanimate_rt.engines.buckets import Bucket
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.reference.weights import save_model
from easyanimate_rt.runtime import backends
from easyanimate_rt.shapes.metrics import psnr

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(build_model("tiny"), tmp_path_factory.mktemp("m") / "tiny")


@pytest.mark.parametrize("backend", ["torch", "ort-cuda", "ort-trt", "trt", "rtx"])
def test_a_whole_generation_on_each_gpu_backend(model_dir, tmp_path, backend):
    why = backends.missing(backends.backend(backend), device="cuda")
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    from easyanimate_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_dir, backend=backend, device="cuda", precision="fp32",
                                    cache_dir=tmp_path / "c", buckets=[Bucket(32, 32, 9)])
    req = pipe.request("a red circle", steps=4, seed=1, frames=9, height=32, width=32)
    got = pipe.run(req)
    want = ReferencePipeline.from_pretrained(model_dir).run(req)
    assert np.abs(got.latents - want.latents.numpy()).max() <= 1e-2
    assert psnr(got.frames, want.frames) >= 30
