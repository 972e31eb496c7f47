"""Latents that turn NaN or infinite stop every denoising loop with a NumericalError
naming the step (1-based) and the sampler, and no video is written (issue 24): the
reference pipeline, the runtime's loop on host arrays (whole DiT and step-cached) and on
device arrays (torch tensors: on the CPU here; CUDA-graph replay on a GPU) and the CLI.

The DiT is made to return NaN from step k on by gating on its timestep input (the
timesteps fall step by step), so the same patch works eagerly, in a captured CUDA graph
and through the engines."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from exported import build_model

from easyanimate_rt.cli import main
from easyanimate_rt.engines.buckets import Bucket
from easyanimate_rt.errors import NumericalError
from easyanimate_rt.media import read_video
from easyanimate_rt.reference.dit import VideoDiT
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.reference.schedule import sampler_tables, training_schedule
from easyanimate_rt.runtime.denoiser import Denoiser, DeviceArrays
from easyanimate_rt.runtime.pipeline import Checkpoints, Pipeline
from easyanimate_rt.runtime.step_cache import CacheSettings

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
SAMPLERS = ["ddim", "euler", "euler_a", "dpm++"]
SIZE = dict(frames=1, height=32, width=32)
STEPS, BAD = 5, 3  # NaN from step 3 of 5


def named(step: int, steps: int, sampler: str) -> str:
    """The part of the error message that names the step and the sampler, as a pattern."""
    return re.escape(f"at step {step} of {steps} (sampler {sampler})")


def timestep_of(sampler: str, steps: int, k: int) -> float:
    """The model's timestep input at step k (1-based)."""
    return float(sampler_tables(sampler, steps).timesteps[k - 1])


def poison(out, t, t_bad: float):
    """``out`` (a tensor, or a tuple of them) plus NaN where the timestep ``t`` is at or
    past step k's, computed on the tensors' device: no host sync, capturable."""
    if isinstance(out, tuple):
        return tuple(poison(o, t, t_bad) for o in out)
    if not out.is_floating_point():
        return out
    gate = torch.where(t.reshape(-1)[:1] <= t_bad, float("nan"), 0.0).to(out.device, out.dtype)  # (1,)
    return out + gate.reshape(1, *[1] * (out.dim() - 1))


def nan_from_step(monkeypatch, module: torch.nn.Module, t_bad: float) -> None:
    """``module``'s outputs turn NaN once its timestep input (second argument) reaches t_bad."""
    original = module.forward

    def forward(latents, timestep, *args, **kwargs):
        return poison(original(latents, timestep, *args, **kwargs), timestep, t_bad)

    monkeypatch.setattr(module, "forward", forward)


def nan_engine_from_step(monkeypatch, engine, t_bad: float) -> None:
    """An engine's outputs turn NaN once its ``timestep`` feed reaches t_bad."""
    original = engine.run

    def run(feeds):
        out = original(feeds)
        if float(np.asarray(feeds["timestep"]).reshape(-1)[0]) <= t_bad:
            out = {name: np.full_like(np.asarray(v), np.nan) for name, v in out.items()}
        return out

    monkeypatch.setattr(engine, "run", run)


@pytest.fixture(scope="module")
def model():
    return build_model("tiny")


CACHE = CacheSettings("fbcache", 2.0, check_every=3)  # skips steps on the tiny model


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    from easyanimate_rt.reference.weights import save_model

    return save_model(model, tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def pipe(model_dir):
    """The CPU runtime on the torch backend (the numpy loop around the DiT engine)."""
    return Pipeline.from_pretrained(model_dir, backend="torch", buckets=[Bucket(32, 32, 1)])


@pytest.fixture(scope="module")
def cached(model_dir):
    """The same with step caching (the head and tail engines)."""
    return Pipeline.from_pretrained(model_dir, backend="torch", buckets=[Bucket(32, 32, 1)], cache=CACHE)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_reference_pipeline_stops_at_the_bad_step(model, monkeypatch, sampler):
    ref = ReferencePipeline(model)
    req = ref.request("a red circle", steps=STEPS, sampler=sampler, seed=1, **SIZE)
    emb, mask = ref.encode_prompt(req.prompt, req.negative_prompt)
    nan_from_step(monkeypatch, model.dit, timestep_of(sampler, STEPS, BAD))
    done: list[int] = []
    with pytest.raises(NumericalError, match=named(BAD, STEPS, sampler)):
        ref.denoise(req, emb, mask, callback=lambda i, n: done.append(i))
    assert done == list(range(1, BAD))  # stopped at the bad step, no later one ran


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_runtime_loop_stops_at_the_bad_step_and_saves_no_bad_state(pipe, monkeypatch, sampler):
    req = pipe.request("a red circle", steps=STEPS, sampler=sampler, seed=1, **SIZE)
    emb, mask = pipe.encode(req)
    nan_engine_from_step(monkeypatch, pipe.engine("dit"), timestep_of(sampler, STEPS, BAD))
    saved = []
    with pytest.raises(NumericalError, match=named(BAD, STEPS, sampler)):
        pipe.denoise(req, emb, mask, checkpoints=Checkpoints(save=saved.append, every=1))
    assert [s.step for s in saved] == list(range(1, BAD))
    assert all(np.isfinite(s.latents).all() for s in saved)


def test_a_resumed_runtime_loop_still_stops(pipe, monkeypatch):
    """Resumed after step 1 (a LoopState), NaN from step 3: the same error."""
    req = pipe.request("a red circle", steps=STEPS, seed=1, **SIZE)
    emb, mask = pipe.encode(req)
    saved = []
    want = pipe.denoise(req, emb, mask, checkpoints=Checkpoints(save=saved.append, every=1))
    assert np.isfinite(want).all()
    nan_engine_from_step(monkeypatch, pipe.engine("dit"), timestep_of(req.sampler, STEPS, BAD))
    with pytest.raises(NumericalError, match=rf"step {BAD} of {STEPS}"):
        pipe.denoise(req, emb, mask, checkpoints=Checkpoints(resume=saved[0]))


def test_step_cached_runtime_loop_stops_at_the_bad_step(cached, monkeypatch):
    """NaN from the head (it runs every step, skipped or not) at step 6 of 10."""
    req = cached.request("a red circle", steps=10, seed=2, **SIZE)
    emb, mask = cached.encode(req)
    assert "." in cached.denoised(req, emb, mask).cache_report["decisions"]  # the loop skips steps
    nan_engine_from_step(monkeypatch, cached.engine("dit_cache/head"), timestep_of(req.sampler, 10, 6))
    with pytest.raises(NumericalError, match=named(6, 10, "dpm++")):
        cached.denoise(req, emb, mask)


def device_loop(model, ref, req, **kwargs):
    """The runtime's loop with its arrays on a device (torch tensors; here the CPU)."""
    emb, mask = ref.encode_prompt(req.prompt, req.negative_prompt)
    loop = Denoiser.on_model(model, DeviceArrays(str(emb.device)), **kwargs)
    return loop, emb.float().cpu().numpy(), mask.cpu().numpy()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_device_loop_names_the_first_bad_step_on_cpu(model, monkeypatch, sampler):
    ref = ReferencePipeline(model)
    req = ref.request("a red circle", steps=STEPS, sampler=sampler, seed=1, **SIZE)
    loop, emb, mask = device_loop(model, ref, req)
    nan_from_step(monkeypatch, model.dit, timestep_of(sampler, STEPS, BAD))
    done: list[int] = []
    with pytest.raises(NumericalError, match=named(BAD, STEPS, sampler)):
        loop.run([req], emb, mask, callback=lambda i, n: done.append(i))
    assert done == list(range(1, STEPS + 1))  # no per-step read-back: the check comes after the loop
    # a checkpoint reads the latents back anyway: there the bad step stops the loop first
    saved = []
    with pytest.raises(NumericalError, match=rf"at step {BAD} of {STEPS}"):
        loop.run([req], emb, mask, checkpoints=Checkpoints(save=saved.append, every=1))
    assert [s.step for s in saved] == list(range(1, BAD))


def test_device_loop_with_step_caching_names_the_bad_step_on_cpu(model, monkeypatch):
    ref = ReferencePipeline(model)
    req = ref.request("a red circle", steps=10, seed=2, **SIZE)
    loop, emb, mask = device_loop(model, ref, req, step_cache=CACHE)
    nan_from_step(monkeypatch, loop.engine("dit_cache/head").module, timestep_of(req.sampler, 10, 6))
    with pytest.raises(NumericalError, match=named(6, 10, "dpm++")):
        loop.run([req], emb, mask)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("sampler", ["dpm++", "euler_a"])
def test_cuda_graph_loop_names_the_first_bad_step(monkeypatch, sampler):
    """The NaN comes from inside the DiT engine's captured graph (the gate reads the
    timestep on the device); the flags are read once, after the loop."""
    gpu_model = build_model("tiny").to("cuda")
    ref = ReferencePipeline(gpu_model, device="cuda")
    req = ref.request("a red circle", steps=STEPS, sampler=sampler, seed=1, **SIZE)
    loop, emb, mask = device_loop(gpu_model, ref, req, cuda_graphs=True)
    assert np.isfinite(loop.run([req], emb, mask).latents).all()
    nan_from_step(monkeypatch, gpu_model.dit, timestep_of(sampler, STEPS, BAD))
    loop, emb, mask = device_loop(gpu_model, ref, req, cuda_graphs=True)  # captured anew, with the gate
    with pytest.raises(NumericalError, match=named(BAD, STEPS, sampler)):
        loop.run([req], emb, mask)


# --- through the CLI ----------------------------------------------------------------------------


def cli_generate(out, *extra: str) -> int:
    return main(["generate", "a red circle", "--model", "tiny", "--frames", "1", "--height", "32", "--width", "32",
                 "--out", str(out), "-q", *extra])


def patch_dit_class(monkeypatch, forward) -> None:
    """The CLI builds its own model: patch the DiT class."""
    monkeypatch.setattr(VideoDiT, "forward", forward)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_cli_exits_2_names_the_step_and_writes_no_video(tmp_path, monkeypatch, capsys, backend):
    original, t_bad = VideoDiT.forward, timestep_of("dpm++", 4, BAD)

    def forward(self, latents, timestep, *args, **kwargs):
        return poison(original(self, latents, timestep, *args, **kwargs), timestep, t_bad)

    patch_dit_class(monkeypatch, forward)
    out = tmp_path / "v.gif"
    code = cli_generate(out, "--backend", backend, "--steps", "4")
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"at step {BAD} of 4 (sampler dpm++)" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no video, no temporary file


def test_cli_1000_steps_with_the_default_sampler(tmp_path, monkeypatch, capsys):
    """Issue 24's command: 1000 steps of the default sampler (dpm++, whose timesteps repeat
    one there) used to divide by zero and write a black video with exit 0. The DiT is a
    fake (an exact denoiser towards zero latents: 1000 real tiny-DiT steps take ~20 s
    on two cores); the loop, its tables, the decoder and the writer are the real ones."""
    abar = torch.from_numpy(training_schedule().alphas_cumprod).double()
    seen: list[float] = []

    def forward(self, latents, timestep, *args, **kwargs):
        t = timestep.double().reshape(-1, *[1] * (latents.dim() - 1))
        lo = t.floor().long().clamp(0, len(abar) - 2)
        abar_t = abar[lo] + (abar[lo + 1] - abar[lo]) * (t - lo)
        seen.append(float(timestep.reshape(-1)[0]))
        return (latents.double() / (1 - abar_t).sqrt()).to(latents.dtype)  # (B, C, F, H, W)

    patch_dit_class(monkeypatch, forward)
    out = tmp_path / "v.gif"
    code = cli_generate(out, "--backend", "torch", "--steps", "1000")
    assert code == 0, capsys.readouterr().err
    assert len(seen) == 1000 and seen.count(500.0) == 2  # every step ran, the repeated timestep included
    frames, _ = read_video(out)
    assert frames.shape == (1, 32, 32, 3)
    assert frames.max() > 0 and frames.std() > 1  # a picture, not the all-black frame of NaN latents
