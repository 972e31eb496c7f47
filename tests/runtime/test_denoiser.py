"""The one denoising loop (runtime/denoiser.py) with its arrays on a device
(DeviceArrays: torch tensors, the sampler update on the device, a non-finite flag per
step): on the CPU it equals the reference pipeline's loop and the host loop, with step
caching and prompt batches; on a GPU, the torch engine's CUDA-graph replay equals eager."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from exported import build_model

from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.runtime.denoiser import (
    Conditioning,
    Denoiser,
    DeviceArrays,
    HostArrays,
)

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SAMPLERS = ["ddim", "euler", "euler_a", "dpm++", "pndm", "plms"]


@pytest.fixture(scope="module")
def model():
    return build_model("tiny")


def encoded(ref, req):
    emb, mask = ref.encode_prompt(req.prompt, req.negative_prompt)
    return emb.float().cpu().numpy(), mask.cpu().numpy()


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("mode", ["batched", "sequential"])
def test_device_loop_equals_the_reference_loop_on_cpu(model, sampler, mode):
    ref = ReferencePipeline(model)
    req = ref.request("a red circle", steps=4, sampler=sampler, seed=2, frames=9, height=32, width=32,
                      guidance_mode=mode)
    want = ref.denoise(req, *ref.encode_prompt(req.prompt, req.negative_prompt))
    emb, mask = encoded(ref, req)
    got = Denoiser.on_model(model, DeviceArrays("cpu")).run([req], emb, mask).latents
    torch.testing.assert_close(torch.from_numpy(got), want, rtol=1e-5, atol=1e-5)
    host = Denoiser.on_model(model, HostArrays()).run([req], emb, mask).latents  # the same loop on numpy arrays
    np.testing.assert_allclose(host, got, rtol=1e-5, atol=1e-5)


def test_a_prompt_batch_on_the_device_loop_equals_each_own_run(model):
    ref = ReferencePipeline(model)
    reqs = [ref.request(p, steps=3, sampler="euler_a", seed=s, frames=9, height=32, width=32)
            for p, s in (("a red circle", 4), ("a blue square", 9))]
    pairs = [encoded(ref, r) for r in reqs]
    emb = np.concatenate([pairs[0][0][:1], pairs[1][0][:1], pairs[0][0][1:], pairs[1][0][1:]])
    mask = np.concatenate([pairs[0][1][:1], pairs[1][1][:1], pairs[0][1][1:], pairs[1][1][1:]])
    loop = Denoiser.on_model(model, DeviceArrays("cpu"))
    both = loop.run(reqs, emb, mask).latents
    for k, (r, (e, m)) in enumerate(zip(reqs, pairs)):
        np.testing.assert_allclose(both[k:k + 1], loop.run([r], e, m).latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"guidance_mode": "sequential"}, {"guidance_scale": 1.0}])
def test_device_loop_with_step_caching_equals_the_host_loop(model, kwargs):
    """Step caching with the arrays on a device, on the CPU: the host loop's decisions
    (skips, drift-guard checks) and its latents."""
    from easyanimate_rt.runtime.step_cache import CacheSettings

    settings = CacheSettings("fbcache", 2.0, check_every=3)
    ref = ReferencePipeline(model)
    req = ref.request("a red circle", steps=10, seed=2, frames=9, height=32, width=32, **kwargs)
    emb, mask = encoded(ref, req)
    want = Denoiser.on_model(model, HostArrays(), step_cache=settings).run([req], emb, mask)
    got = Denoiser.on_model(model, DeviceArrays("cpu"), step_cache=settings).run([req], emb, mask)
    assert got.cache_report["decisions"] == want.cache_report["decisions"]
    assert want.cache_report["skipped"] >= 2 and want.cache_report["checked"] >= 1, want.cache_report["decisions"]
    assert [e for _, e in got.cache_report["drift"]] == pytest.approx(
        [e for _, e in want.cache_report["drift"]], rel=1e-3, abs=1e-6)
    np.testing.assert_allclose(got.latents, want.latents, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cuda_graph_replay_equals_eager(sampler):
    gpu_model = build_model("tiny").to("cuda")
    ref = ReferencePipeline(gpu_model, device="cuda")
    req = ref.request("a red circle", steps=5, sampler=sampler, seed=2, frames=9, height=32, width=32)
    emb, mask = encoded(ref, req)
    eager = Denoiser.on_model(gpu_model, DeviceArrays("cuda")).run([req], emb, mask).latents
    graph = Denoiser.on_model(gpu_model, DeviceArrays("cuda"), cuda_graphs=True).run([req], emb, mask).latents
    np.testing.assert_allclose(graph, eager, rtol=1e-5, atol=1e-5)
    want = ref.denoise(req, *ref.encode_prompt(req.prompt, req.negative_prompt)).cpu().numpy()
    np.testing.assert_allclose(graph, want, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.gpu
def test_a_failed_capture_falls_back_to_eager(monkeypatch, caplog):
    gpu_model = build_model("tiny").to("cuda")
    ref = ReferencePipeline(gpu_model, device="cuda")
    req = ref.request("a red circle", steps=3, seed=2, frames=9, height=32, width=32)
    emb, mask = encoded(ref, req)

    def broken(*args, **kwargs):
        raise RuntimeError("capture not supported")

    monkeypatch.setattr(torch.cuda, "graph", broken)
    with caplog.at_level(logging.WARNING):
        got = Denoiser.on_model(gpu_model, DeviceArrays("cuda"), cuda_graphs=True).run([req], emb, mask).latents
    assert "dit: CUDA graph capture failed (RuntimeError: capture not supported); running eagerly" in caplog.text
    want = Denoiser.on_model(gpu_model, DeviceArrays("cuda")).run([req], emb, mask).latents
    assert np.array_equal(got, want)


@gpu
@pytest.mark.gpu
def test_step_caching_on_the_gpu_equals_the_cpu(model):
    from easyanimate_rt.runtime.step_cache import CacheSettings

    settings = CacheSettings("fbcache", 2.0, check_every=3)
    ref = ReferencePipeline(model)
    req = ref.request("a red circle", steps=10, seed=2, frames=9, height=32, width=32)
    emb, mask = encoded(ref, req)
    want = Denoiser.on_model(model, HostArrays(), step_cache=settings).run([req], emb, mask)
    got = Denoiser.on_model(build_model("tiny").to("cuda"), DeviceArrays("cuda"), step_cache=settings).run([req], emb, mask)
    assert got.cache_report["decisions"] == want.cache_report["decisions"]
    np.testing.assert_allclose(got.latents, want.latents, rtol=1e-3, atol=1e-3)


def test_conditioning_defaults_to_none():
    assert Conditioning().inpaint is None and Conditioning().clip is None


def test_ddim_with_the_x0_clamp_runs_the_same_on_the_runtime_loop(model):
    """A model whose sampling config clamps DDIM's x0 (the release presets, as upstream):
    the reference and the runtime loop (host and device arrays) take it from the config."""
    import dataclasses

    clamped = dataclasses.replace(model.config, sampling=model.config.sampling.replace(clip_sample=1.0))
    original = model.config
    model.config = clamped
    try:
        ref = ReferencePipeline(model)
        req = ref.request("a red circle", steps=6, sampler="ddim", seed=4, frames=9, height=32, width=32)
        want = ref.denoise(req, *ref.encode_prompt(req.prompt, req.negative_prompt)).numpy()
        emb, mask = encoded(ref, req)
        for arrays in (HostArrays(), DeviceArrays("cpu")):
            got = Denoiser.on_model(model, arrays).run([req], emb, mask).latents
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        model.config = original
    plain = Denoiser.on_model(model, HostArrays()).run([req], emb, mask).latents
    assert np.abs(plain - want).max() > 1e-3  # the clamp changed the trajectory


def test_pndm_on_a_v_network_converts_v_in_the_step_as_diffusers(model):
    """PNDM with a v-prediction DiT: both loops give the sampler the model's prediction
    type, so the combined v is converted at the step's base sample (diffusers' discretisation,
    test_samplers), not each call's v at its own input; the two differ measurably."""
    import copy

    from easyanimate_rt.reference.schedule import NumpySampler, training_schedule

    v_model = copy.deepcopy(model)
    v_model.config = model.config.replace(dit=model.config.dit.replace(prediction_type="v_prediction"))
    v_model.dit.config = v_model.config.dit
    ref = ReferencePipeline(v_model)
    req = ref.request("a red circle", steps=4, sampler="pndm", seed=2, frames=9, height=32, width=32)
    want = ref.denoise(req, *ref.encode_prompt(req.prompt, req.negative_prompt))
    emb, mask = encoded(ref, req)
    host = Denoiser.on_model(v_model, HostArrays()).run([req], emb, mask).latents
    np.testing.assert_allclose(host, want.numpy(), rtol=1e-5, atol=1e-5)

    class EpsilonSchedule(HostArrays):  # a loop that forgot the prediction type: v converted per call
        def sampler(self, name, steps, clip_sample=None, prediction_type="epsilon"):
            return NumpySampler(name, steps, training_schedule(clip_sample=clip_sample))

    per_call = Denoiser.on_model(v_model, EpsilonSchedule()).run([req], emb, mask).latents
    assert np.abs(per_call - host).max() > 1e-3
