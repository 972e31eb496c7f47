"""pytest-benchmark micro-benchmarks of the runtime's hot pieces, each checked against the
reference it replaces: one DiT step, one VAE slice decode, one sampler step, the text
encode. The runtime's engines come from the engine cache (built on first use).

    pytest benchmarks/test_micro.py                       # timed by pytest-benchmark
    pytest benchmarks/test_micro.py --benchmark-disable   # quick: each piece once, checked
    EASYANIMATE_BENCH_MODEL=tiny pytest benchmarks/test_micro.py   # another model or preset

The default model is the shipped one; CI runs the quick mode on ``tiny``
(tests/benchmarks/test_micro_quick.py).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from easyanimate_rt.cli import default_model
from easyanimate_rt.export.graphs import run_torch
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.reference.samplers import make_sampler
from easyanimate_rt.reference.schedule import NumpySampler
from easyanimate_rt.runtime.pipeline import Pipeline

MODEL = os.environ.get("EASYANIMATE_BENCH_MODEL") or default_model()
PROMPT = "a red circle moving left on a white background"


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def ref():
    torch.set_grad_enabled(False)
    return ReferencePipeline.from_pretrained(MODEL)


@pytest.fixture(scope="module")
def req(pipe):
    return pipe.request(PROMPT)


def test_text_encode(benchmark, pipe, ref, req):
    emb, mask = benchmark(pipe.encode, req)
    want, want_mask = ref.encode_prompt(req.prompt, req.negative_prompt)
    assert np.array_equal(mask, want_mask.numpy())
    assert np.abs(emb - want.numpy()).max() <= 1e-4 * max(1.0, float(want.abs().max()))


def test_dit_step(benchmark, pipe, ref, req):
    emb, mask = pipe.encode(req)
    shape = req.latent_shape(pipe.config)
    rng = np.random.default_rng(0)
    dit = pipe.engine("dit")
    feeds = {"latents": rng.standard_normal((2, *shape[1:]), dtype=np.float32),
             "timestep": np.array([500.0, 500.0], np.float32), "text": emb, "text_mask": mask}
    d = pipe.config.dit
    if d.inpaint:
        feeds["inpaint_latents"] = rng.standard_normal((2, d.inpaint_channels, *shape[2:]), dtype=np.float32)
    if d.clip_channels:
        feeds["clip_embeds"] = np.zeros((2, d.clip_channels), np.float32)
        feeds["clip_mask"] = np.zeros((2, d.clip_tokens), np.int64)
    got = benchmark(dit.run, feeds)["noise_pred"]
    want = run_torch(ref.model, dit.spec, feeds)["noise_pred"]
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, float(np.abs(want).max()))


def test_vae_slice_decode(benchmark, pipe, ref, req):
    """The decoder engine of the video's first multi-latent slice against SliceVAE."""
    from easyanimate_rt.export.spec import decoder_variant

    shape = req.latent_shape(pipe.config)
    z = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    plan = pipe.config.vae.slice_plan(shape[2])
    s = max(plan, key=lambda s: s.length)
    engine = pipe.engine(f"vae_decoder/{decoder_variant(pipe.config, s)}")
    context = np.ascontiguousarray(z[:, :, s.ctx_start:s.ctx_end])
    got = benchmark(engine.run, {"context": context})["frames"]
    want = ref.model.vae.decode_slice(torch.from_numpy(context), s.start, s.length).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-3 * max(1.0, float(np.abs(want).max()))


@pytest.mark.parametrize("name", ["dpm++", "euler_a"])
def test_sampler_step(benchmark, pipe, req, name):
    """One numpy sampler step (the runtime's loop) against the torch sampler."""
    shape = req.latent_shape(pipe.config)
    rng = np.random.default_rng(2)
    x, eps, noise = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    i = 10

    def advanced(sampler):  # multistep samplers keep the previous steps' state
        for k in range(i):
            sampler.step(k, *((x, eps, noise) if isinstance(sampler, NumpySampler) else
                              (torch.from_numpy(x), torch.from_numpy(eps), torch.from_numpy(noise))))
        return sampler

    timed = advanced(NumpySampler(name, 25))  # repeated calls move its state on: timing only
    benchmark(timed.step, i, x, eps, noise)
    got = advanced(NumpySampler(name, 25)).step(i, x, eps, noise)
    want = advanced(make_sampler(name, 25)).step(i, torch.from_numpy(x), torch.from_numpy(eps),
                                                 torch.from_numpy(noise)).numpy()
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, float(np.abs(want).max()))
