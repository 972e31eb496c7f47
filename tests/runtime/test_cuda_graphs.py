"""The torch backend's device loop (runtime/cuda_graphs.py): on the CPU its eager form
equals the reference pipeline's loop; on a GPU, CUDA-graph replay equals eager."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from exported import build_model

from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.runtime.cuda_graphs import denoise_on_device

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SAMPLERS = ["ddim", "euler", "euler_a", "dpm++"]


@pytest.fixture(scope="module")
def model():
    return build_model("tiny")


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_device_loop_equals_the_reference_loop_on_cpu(model, sampler, mode):
    ref = ReferencePipeline(model)
    req = ref.request("a red circle", steps=4, sampler=sampler, seed=2, frames=9, height=32, width=32,
                      guidance_mode=mode)
    emb, mask = ref.encode_prompt(req.prompt, req.negative_prompt)
    want = ref.denoise(req, emb, mask)
    got = denoise_on_device(model, req, emb, mask, device="cpu", cuda_graph=False)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cuda_graph_replay_equals_eager(model, sampler):
    gpu_model = build_model("tiny").to("cuda")
    ref = ReferencePipeline(gpu_model, device="cuda")
    req = ref.request("a red circle", steps=5, sampler=sampler, seed=2, frames=9, height=32, width=32)
    emb, mask = ref.encode_prompt(req.prompt, req.negative_prompt)
    eager = denoise_on_device(gpu_model, req, emb, mask, device="cuda", cuda_graph=False)
    graph = denoise_on_device(gpu_model, req, emb, mask, device="cuda", cuda_graph=True)
    torch.testing.assert_close(graph, eager, rtol=1e-5, atol=1e-5)
    want = ref.denoise(req, emb, mask)
    torch.testing.assert_close(graph, want, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
def test_a_failed_capture_falls_back_to_eager(model, monkeypatch, caplog):
    gpu_model = build_model("tiny").to("cuda")
    ref = ReferencePipeline(gpu_model, device="cuda")
    req = ref.request("a red circle", steps=3, seed=2, frames=9, height=32, width=32)
    emb, mask = ref.encode_prompt(req.prompt, req.negative_prompt)

    def broken(*args, **kwargs):
        raise RuntimeError("capture not supported")

    monkeypatch.setattr(torch.cuda, "graph", broken)
    with caplog.at_level(logging.WARNING):
        got = denoise_on_device(gpu_model, req, emb, mask, device="cuda", cuda_graph=True)
    assert "CUDA graph capture failed (RuntimeError: capture not supported)" in caplog.text
    want = denoise_on_device(gpu_model, req, emb, mask, device="cuda", cuda_graph=False)
    assert np.array_equal(got.cpu().numpy(), want.cpu().numpy())
