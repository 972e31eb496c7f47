import numpy as np
import pytest
import torch
from needs import require

from easyanimate_rt.errors import InputError
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.media import read_video
from easyanimate_rt.reference.weights import random_model

SMALL = dict(height=32, width=32, steps=2)


@pytest.fixture(scope="module")
def pipe():
    model = random_model(from_preset("tiny"), seed=1)
    with torch.no_grad():  # non-trivial outputs everywhere
        for name, p in model.dit.named_parameters():
            if "attn_temporal" in name or "long_connect" in name or name.startswith("proj_out"):
                p.normal_(0, 0.05)
    return ReferencePipeline(model)


@pytest.mark.parametrize("frames", [1, 9])
def test_same_seed_same_frames(pipe, frames):
    a = pipe.generate("a red circle moving left", frames=frames, seed=5, **SMALL)
    b = pipe.generate("a red circle moving left", frames=frames, seed=5, **SMALL)
    c = pipe.generate("a red circle moving left", frames=frames, seed=6, **SMALL)
    assert a.frames.shape == (frames, 32, 32, 3) and a.frames.dtype == np.uint8
    np.testing.assert_array_equal(a.frames, b.frames)
    assert not np.array_equal(a.latents, c.latents)


def test_guidance_modes_agree(pipe):
    req = dict(frames=9, seed=2, guidance_scale=5.0, **SMALL)
    a = pipe.generate("a blue square", guidance_mode="batched", **req)
    b = pipe.generate("a blue square", guidance_mode="sequential", **req)
    torch.testing.assert_close(a.latents, b.latents, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpm++"])
def test_every_sampler_runs(pipe, sampler):
    out = pipe.generate("a green triangle", frames=1, sampler=sampler, **SMALL)
    assert np.isfinite(out.latents.numpy()).all()


@pytest.mark.parametrize("kwargs, rule", [
    (dict(height=40), "height must be a positive multiple of 16, got 40"),
    (dict(width=0), "width must be a positive multiple of 16, got 0"),
    (dict(frames=7), "frames must be 1, a multiple of 8 or a multiple of 8 plus 1, got 7"),
    (dict(steps=0), "steps must be an integer >= 1, got 0"),
    (dict(guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (dict(sampler="plms"), "unknown sampler 'plms'; known samplers: "),
])
def test_bad_inputs_name_the_rule(pipe, kwargs, rule):
    with pytest.raises(InputError) as info:
        pipe.generate("x", **{**SMALL, "frames": 1, **kwargs})
    assert rule in str(info.value)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_save_video(pipe, tmp_path, suffix):
    out = pipe.generate("a red circle", frames=9, **SMALL)
    path = out.save(tmp_path / f"v{suffix}")
    frames, _ = read_video(path)
    assert frames.shape == (9, 32, 32, 3)
    # lossy codecs: close to what we wrote, on average
    assert np.abs(frames.astype(float) - out.frames.astype(float)).mean() < 20


def test_v_prediction_model_follows_diffusers(pipe):
    """A v-prediction DiT: the pipeline's guided loop equals diffusers' DPM++ scheduler
    configured with prediction_type="v_prediction" fed the same (guided) network outputs."""
    import dataclasses

    diffusers = require("diffusers")
    dit = pipe.model.dit
    eps_config = dit.config
    dit.config = dataclasses.replace(eps_config, prediction_type="v_prediction")
    try:
        req = pipe.request("a red circle", frames=9, seed=3, steps=6, guidance_scale=3.0, height=32, width=32)
        ours = pipe.run(req).latents
        emb, mask = pipe.encode_prompt(req.prompt, req.negative_prompt)
        sched = diffusers.DPMSolverMultistepScheduler(
            num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", steps_offset=1,
            prediction_type="v_prediction", algorithm_type="dpmsolver++", solver_order=2,
            solver_type="midpoint", lower_order_final=True)
        sched.set_timesteps(6)
        x = torch.randn(req.latent_shape(pipe.config), generator=torch.Generator().manual_seed(3))
        c = pipe.config.vae.latent_channels
        with torch.no_grad():
            for t in sched.timesteps:
                out_u, out_c = dit(x.expand(2, *x.shape[1:]), t.expand(2), emb, mask)[:, :c].chunk(2)
                x = sched.step(out_u + 3.0 * (out_c - out_u), t, x).prev_sample
    finally:
        dit.config = eps_config
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)
    eps_run = pipe.run(req).latents
    assert (eps_run - ours).abs().max() > 0.01  # the prediction type is honoured, not ignored
