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


@pytest.mark.parametrize("backend", ["torch", "ort-cuda", "trt", "rtx"])
def test_the_same_lora_on_each_gpu_backend(model_dir, tmp_path, backend):
    """A LoRA switched in on a loaded GPU pipeline (torch: merged in place, the CUDA graphs
    keep their addresses; engines: their own, built and gated) gives the reference's video
    with the same LoRA, and switching back gives the base video again."""
    why = backends.missing(backends.backend(backend), device="cuda")
    if why is not None:
        pytest.skip(f"{backend}: {why}")
    from easyanimate_rt.reference.lora import lora_targets, save_kohya
    from easyanimate_rt.runtime.pipeline import Pipeline

    model = build_model("tiny")
    g = torch.Generator().manual_seed(11)
    lora = save_kohya(tmp_path / "l.safetensors", {
        n: (torch.randn(2, m.weight.shape[1], generator=g) * 0.2, torch.randn(m.weight.shape[0], 2, generator=g) * 0.2)
        for n, m in lora_targets(model).items()}, alpha=2.0, rank=2)
    pipe = Pipeline.from_pretrained(model_dir, backend=backend, device="cuda", precision="fp32",
                                    cache_dir=tmp_path / "c", buckets=[Bucket(32, 32, 9)])
    req = pipe.request("a red circle", steps=4, seed=1, frames=9, height=32, width=32)
    base = pipe.run(req)
    pipe.set_loras([f"{lora}:0.7"])
    got = pipe.run(req)
    want = ReferencePipeline.from_pretrained(model_dir, loras=[f"{lora}:0.7"]).run(req)
    assert psnr(got.frames, want.frames) >= 30 and psnr(got.frames, base.frames) < psnr(got.frames, want.frames)
    pipe.set_loras([])
    assert psnr(pipe.run(req).frames, base.frames) >= 40
