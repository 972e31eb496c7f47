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


def _cached_pair(tmp_path_factory, model, settings, **kwargs):
    """The CPU runtime's cached loop (torch backend) and the device loop's, same request."""
    from easyanimate_rt.engines.buckets import Bucket
    from easyanimate_rt.reference.weights import save_model
    from easyanimate_rt.runtime.pipeline import Pipeline
    from easyanimate_rt.runtime.step_cache import StepCache

    model_dir = save_model(model, tmp_path_factory.mktemp("m") / "tiny")
    pipe = Pipeline.from_pretrained(model_dir, backend="torch", buckets=[Bucket(32, 32, 9)], cache=settings,
                                    guidance=kwargs.get("guidance_mode", "batched"))
    req = pipe.request("a red circle", steps=10, seed=2, frames=9, height=32, width=32, **kwargs)
    pipe.ensure(Bucket(32, 32, 9), pipe.guidance_of(req))
    emb, mask = pipe.encode(req)
    want = pipe.denoise(req, emb, mask)
    guidance = pipe.guidance_of(req)
    cache = StepCache(settings, req.steps)
    head, tail = (pipe.engine(f"dit_cache/{k}", guidance).module for k in ("head", "tail"))
    return pipe, req, emb, mask, want, cache, head, tail


@pytest.mark.parametrize("kwargs", [{}, {"guidance_mode": "sequential"}, {"guidance_scale": 1.0}])
def test_device_loop_with_step_caching_equals_the_cpu_runtime(model, tmp_path_factory, kwargs):
    """The GPU loop's step caching, eagerly on the CPU: the CPU runtime's decisions
    (skips, drift-guard checks) and its latents."""
    from easyanimate_rt.runtime.step_cache import CacheSettings

    settings = CacheSettings("fbcache", 2.0, check_every=3)
    pipe, req, emb, mask, want, cache, head, tail = _cached_pair(tmp_path_factory, model, settings, **kwargs)
    got = denoise_on_device(pipe.model(), req, emb, mask, device="cpu", cuda_graph=False, step_cache=cache,
                            head=head, tail=tail)
    report = cache.report()
    assert report["decisions"] == pipe.last_cache_report["decisions"]
    assert report["skipped"] >= 2 and report["checked"] >= 1, report["decisions"]
    assert [e for _, e in report["drift"]] == pytest.approx([e for _, e in pipe.last_cache_report["drift"]],
                                                            rel=1e-3, abs=1e-6)
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
def test_step_caching_on_the_gpu_equals_the_cpu(model, tmp_path_factory):
    from easyanimate_rt.runtime.step_cache import CacheSettings, StepCache

    settings = CacheSettings("fbcache", 2.0, check_every=3)
    pipe, req, emb, mask, want, cache, head, tail = _cached_pair(tmp_path_factory, model, settings)
    gpu_model = pipe.model().to("cuda")
    cache = StepCache(settings, req.steps)
    got = denoise_on_device(gpu_model, req, emb, mask, device="cuda", cuda_graph=True, step_cache=cache,
                            head=head.to("cuda"), tail=tail.to("cuda"))
    assert cache.report()["decisions"] == pipe.last_cache_report["decisions"]
    torch.testing.assert_close(got.cpu(), torch.from_numpy(want), rtol=1e-3, atol=1e-3)
