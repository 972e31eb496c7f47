"""The runtime against the reference pipeline: same seed, sampler and steps; engine
caching, compile on first use, guidance modes, per-network backends."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
import torch
from exported import build_model
from needs import require

from easyanimate_rt.engines.buckets import Bucket
from easyanimate_rt.errors import InputError, ShapeError
from easyanimate_rt.media import read_video
from easyanimate_rt.reference.config import model_fingerprint
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.reference.weights import save_model
from easyanimate_rt.shapes.metrics import psnr

PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model with every zero-initialised branch randomised, as a model directory."""
    return save_model(build_model("tiny"), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def ort_pipe(model_dir, cache):
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(model_dir, backend="ort", cache_dir=cache,
                                    buckets=[Bucket(64, 64, 9), Bucket(32, 64, 9)], threads=1)


@pytest.fixture(scope="module")
def ref(model_dir):
    return ReferencePipeline.from_pretrained(model_dir)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "euler_a", "dpm++", "pndm"])
def test_ort_runtime_matches_the_reference_pipeline(ort_pipe, ref, sampler):
    """Per-step latents within 1e-3, the video at >= 40 dB (measured: 1e-5 / 60+ dB)."""
    req = ref.request(PROMPT, steps=4, sampler=sampler, seed=3, frames=9, height=64, width=64)
    emb, mask = ref.encode_prompt(req.prompt, req.negative_prompt)
    want_trace: list = []
    want = ref.denoise(req, emb, mask, trace=want_trace)
    want_frames = np.concatenate(list(ref.iter_frames(want)))
    got_trace: list = []
    emb_rt, mask_rt = ort_pipe.encode(req)
    assert np.abs(emb_rt - emb.numpy()).max() <= 1e-4
    got = ort_pipe.denoise(req, emb_rt, mask_rt, trace=got_trace)
    assert len(got_trace) == len(want_trace) == req.calls == (13 if sampler == "pndm" else 4)  # pndm: 4 + 9 calls
    for a, b in zip(got_trace, want_trace):
        assert np.abs(a - b.numpy()).max() <= 1e-3
    video = ort_pipe.run(req)
    assert np.abs(video.latents - got).max() == 0
    assert video.frames.shape == want_frames.shape and psnr(video.frames, want_frames) >= 40
    assert {"load", "text", "denoise", "decode", "steps"} <= set(video.timings) and len(video.timings["steps"]) == req.calls


def test_torch_backend_equals_the_reference(model_dir, ref, cache):
    from easyanimate_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_dir, backend="torch", cache_dir=cache)
    kwargs = dict(steps=3, seed=1, frames=9, height=32, width=64)
    got, want = pipe("a blue square", **kwargs), ref.generate("a blue square", **kwargs)
    torch.testing.assert_close(torch.from_numpy(got.latents), want.latents, rtol=1e-5, atol=1e-5)
    assert np.abs(got.frames.astype(int) - want.frames).max() <= 1
    # a list of prompts, one batch on the reference modules: each video is the reference's
    both = pipe(["a blue square", "a red circle"], **kwargs)
    torch.testing.assert_close(torch.from_numpy(both[0].latents), want.latents, rtol=1e-4, atol=1e-4)
    second = ref.generate("a red circle", **dict(kwargs, seed=2))
    torch.testing.assert_close(torch.from_numpy(both[1].latents), second.latents, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_backend_equals_eager(model_dir, ref, cache):
    """The DiT under torch.compile (inductor) against the reference, 2 steps (measured
    max abs difference ~1e-6; the compile takes most of this test's time)."""
    from easyanimate_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_dir, backend="dit=torch-compile,text_encoder=torch,vae=torch",
                                    cache_dir=cache, buckets=[Bucket(32, 64, 9)])
    assert type(pipe.engine("dit").module).__name__ == "OptimizedModule"
    req = ref.request("a blue square", steps=2, seed=1, frames=9, height=32, width=64)
    torch.testing.assert_close(torch.from_numpy(pipe.run(req).latents), ref.run(req).latents, rtol=1e-4, atol=1e-4)


def test_sequential_and_unguided_match_the_reference(ort_pipe, ref):
    for kwargs in (dict(guidance_mode="sequential"), dict(guidance_scale=1.0)):
        req = ref.request(PROMPT, steps=3, seed=5, frames=9, height=64, width=64, **kwargs)
        want = ref.run(req).latents.numpy()
        got = ort_pipe.run(req).latents
        assert np.abs(got - want).max() <= 1e-3, kwargs
    assert ("sequential", "dit") in ort_pipe.engines  # built on first use, batch-1 profiles


def _count_calls(pipe, guidance: str, keys=("text_encoder", "dit")) -> dict[str, list[int]]:
    """Wrap ``pipe``'s engines: key -> the batch of each call."""
    calls: dict[str, list[int]] = {}
    for key in keys:
        engine = pipe.engine(key, guidance)
        run = engine.run

        def counted(feeds, run=run, key=key):
            calls.setdefault(key, []).append(len(next(iter(feeds.values()))))
            return run(feeds)
        engine.run = counted
    return calls


def test_a_list_of_prompts_runs_as_one_batch(ort_pipe):
    """Three prompts (one empty): one text-encoder call and one DiT call per step, each
    of batch 6 (negatives + positives); every video equals its own run (Euler Ancestral:
    each request keeps its own seed's noise stream), and each is the reference's (its
    own run is checked against the reference above)."""
    prompts = [PROMPT, "a blue square moving up", ""]
    kwargs = dict(steps=3, sampler="euler_a", frames=9, height=64, width=64)
    videos = ort_pipe(prompts, seed=7, **kwargs)  # first use: builds the 64x64x9b4 profiles
    assert len(videos) == 3 and videos[0].timings["prompts"] == 3
    singles = [ort_pipe.run(ort_pipe.request(p, seed=7 + k, **kwargs)) for k, p in enumerate(prompts)]
    for got, want in zip(videos, singles):
        assert got.latents.shape == want.latents.shape == (1, 4, 3, 8, 8)
        assert np.abs(got.latents - want.latents).max() <= 1e-4
        assert np.abs(got.frames.astype(int) - want.frames).max() <= 1
    assert np.abs(videos[0].latents - videos[1].latents).max() > 0.1  # different prompts, seeds: different videos
    calls = _count_calls(ort_pipe, "batched")
    again = ort_pipe(prompts, seed=7, **kwargs)
    assert calls == {"text_encoder": [6], "dit": [6, 6, 6]}
    assert all(np.abs(a.latents - b.latents).max() == 0 for a, b in zip(again, videos))  # deterministic
    calls.clear()
    ort_pipe(prompts[:2], seed=7, batch_size=1, **kwargs)  # one after another
    assert calls == {"text_encoder": [2, 2], "dit": [2] * 6}


def test_sequential_and_unguided_batches(ort_pipe):
    """Sequential guidance: per step two DiT calls of N (negatives, then positives);
    unguided: one call of N positives. Each video equals its own run."""
    prompts = ["a green triangle", "a yellow circle"]
    for kwargs in (dict(guidance_mode="sequential"), dict(guidance_scale=1.0)):
        kwargs.update(steps=2, frames=9, height=64, width=64)
        reqs = [ort_pipe.request(p, seed=3 + k, **kwargs) for k, p in enumerate(prompts)]
        videos = ort_pipe.run_batch(reqs)
        calls = _count_calls(ort_pipe, "sequential")
        ort_pipe.run_batch(reqs)
        assert calls == {"text_encoder": [2, 2], "dit": [2] * (4 if "guidance_mode" in kwargs else 2)}, kwargs
        for got, req in zip(videos, reqs):
            assert np.abs(got.latents - ort_pipe.run(req).latents).max() <= 1e-4, kwargs


def test_bad_batches_are_refused(ort_pipe):
    kwargs = dict(steps=2, frames=9, height=64, width=64)
    with pytest.raises(InputError, match="the list of prompts is empty"):
        ort_pipe([], **kwargs)
    for size in (0, 5, 2.0, True):
        with pytest.raises(InputError, match="batch_size must be an integer in 1 .. 4"):
            ort_pipe([PROMPT, PROMPT], batch_size=size, **kwargs)
    with pytest.raises(InputError, match="batch_size applies to a list of prompts"):
        ort_pipe(PROMPT, batch_size=2, **kwargs)
    a, b = ort_pipe.request(PROMPT, **kwargs), ort_pipe.request(PROMPT, **dict(kwargs, steps=3))
    with pytest.raises(InputError, match="steps is 2 in the first and 3 in another"):
        ort_pipe.run_batch([a, b])
    with pytest.raises(InputError, match="a batch holds 1 .. 4 requests, got 5"):
        ort_pipe.run_batch([a] * 5)
    with pytest.raises(InputError, match="frames must be"):  # every request is checked before any work
        ort_pipe([PROMPT, PROMPT], **dict(kwargs, frames=10))


@pytest.mark.parametrize("sampler", ["dpm++", "euler_a", "plms"])
def test_a_resumed_loop_ends_bit_equal(ort_pipe, sampler):
    """Stopped after any checkpoint and resumed from its (serialised) state, the loop
    ends on the uninterrupted run's latents exactly: DPM++ carries its x0 history,
    Euler Ancestral its noise stream, PLMS its five-array history (7 calls for 6 steps)."""
    from easyanimate_rt.errors import CheckpointError
    from easyanimate_rt.runtime.loop_state import LoopState
    from easyanimate_rt.runtime.pipeline import Checkpoints

    req = ort_pipe.request(PROMPT, steps=6, sampler=sampler, seed=4, frames=9, height=64, width=64)
    emb, mask = ort_pipe.encode(req)
    saved: list[bytes] = []
    want = ort_pipe.denoise(req, emb, mask, checkpoints=Checkpoints(lambda s: saved.append(s.to_bytes()), 2))
    assert [LoopState.from_bytes(b).step for b in saved] == ([2, 4, 6] if sampler == "plms" else [2, 4])  # not the last
    for blob in saved:
        state = LoopState.from_bytes(blob)
        done: list[int] = []
        got = ort_pipe.denoise(req, emb, mask, callback=lambda k, n: done.append(k),
                               checkpoints=Checkpoints(resume=state))
        assert done == list(range(state.step + 1, req.calls + 1))
        np.testing.assert_array_equal(got, want)
    other = ort_pipe.request(PROMPT, steps=6, sampler=sampler, seed=5, frames=9, height=64, width=64)
    with pytest.raises(InputError, match="belongs to another request"):
        ort_pipe.denoise(other, emb, mask, checkpoints=Checkpoints(resume=LoopState.from_bytes(saved[0])))
    with pytest.raises(CheckpointError, match="unreadable"):
        LoopState.from_bytes(saved[0][:100])
    with pytest.raises(InputError, match="checkpoint interval must be an integer >= 0"):
        Checkpoints(every=-1)


def test_per_network_backends(model_dir, ref, cache):
    from easyanimate_rt.runtime.pipeline import Pipeline, parse_backend

    # networks not named run on auto (decided with the device); ort is ort-cpu
    assert parse_backend("dit=ort,vae=torch") == {"text_encoder": "auto", "dit": "ort-cpu", "vae": "torch"}
    for bad, rule in (("trt9", "backend for text_encoder must be one of"), ("unet=ort", "unknown network 'unet'")):
        with pytest.raises(InputError, match=rule):
            parse_backend(bad)
    pipe = Pipeline.from_pretrained(model_dir, backend="text_encoder=torch,vae=torch", cache_dir=cache,
                                    buckets=[Bucket(64, 64, 9)], threads=1)
    kinds = {key: type(engine).__name__ for (_, key), engine in pipe.engines.items()}
    assert kinds["dit"] == "OrtEngine" and kinds["text_encoder"] == "TorchEngine"
    assert {v for k, v in kinds.items() if k.startswith("vae_decoder")} == {"TorchEngine"}
    req = ref.request(PROMPT, steps=3, seed=2, frames=9, height=64, width=64)
    assert np.abs(pipe.run(req).latents - ref.run(req).latents.numpy()).max() <= 1e-3


def test_a_size_outside_the_built_buckets(model_dir, cache, ort_pipe):
    from easyanimate_rt.runtime.pipeline import Pipeline

    fixed = Pipeline.from_pretrained(model_dir, backend="ort", cache_dir=cache, buckets=[Bucket(64, 64, 9)],
                                     threads=1, compile=False)
    with pytest.raises(ShapeError, match=r"no engines for 64x32x9 .*built: 32x64x9, 64x64x9"):
        fixed("x", steps=1, frames=9, height=64, width=32)
    with pytest.raises(InputError, match="height must be a positive multiple of 16, got 40"):
        fixed("x", steps=1, height=40)


def test_engines_are_reused_and_a_changed_model_is_rebuilt(model_dir, cache, ort_pipe, tmp_path):
    from easyanimate_rt.runtime.pipeline import Pipeline

    directory = ort_pipe.engine_dir("batched")
    index = json.loads((directory / "engines.json").read_text())
    assert index["source_sha256"] == model_fingerprint(model_dir)
    again = Pipeline.from_pretrained(model_dir, backend="ort", cache_dir=cache, buckets=[Bucket(64, 64, 9)],
                                     threads=1, compile=False)  # loads: nothing to build
    assert "build" not in again.timings
    # The same model with one weight changed is another model: its own engine directory.
    import shutil

    changed = shutil.copytree(model_dir, tmp_path / "changed")
    cfg = changed / "transformer" / "config.json"
    cfg.write_text(cfg.read_text() + "\n")
    assert model_fingerprint(changed) != model_fingerprint(model_dir)
    with pytest.raises(ShapeError, match="built: none"):
        Pipeline.from_pretrained(changed, backend="ort", cache_dir=cache, buckets=[Bucket(64, 64, 9)],
                                 compile=False)


def test_cached_start_up_imports_neither_torch_nor_transformers(model_dir, cache, ort_pipe, tmp_path):
    out = tmp_path / "v.mp4"
    code = textwrap.dedent(f"""
        import sys
        from easyanimate_rt.runtime.pipeline import Pipeline
        from easyanimate_rt.engines.buckets import Bucket
        pipe = Pipeline.from_pretrained({str(model_dir)!r}, cache_dir={str(cache)!r}, buckets=[Bucket(64, 64, 9)],
                                        compile=False, threads=1)
        pipe.generate_to({str(out)!r}, pipe.request("a red circle", steps=2, frames=9, height=64, width=64))
        heavy = [m for m in ("torch", "transformers") if m in sys.modules]
        assert not heavy, heavy
    """)
    subprocess.run([sys.executable, "-c", code], check=True)
    frames, _ = read_video(out)
    assert frames.shape == (9, 64, 64, 3)


@pytest.mark.slow
def test_long_videos_stream_in_constant_memory(tmp_path):
    """144 frames of the tiny preset decode slice by slice into the writer: Python-side
    peak memory stays within 1.25x of a 16-frame run (the benchmark measures RSS)."""
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained("tiny", cache_dir=tmp_path / "c", buckets=[Bucket(32, 32, 16), Bucket(32, 32, 144)],
                                    threads=1)
    peaks = {}
    for frames in (16, 144):
        tracemalloc.start()
        video = pipe.generate_to(tmp_path / f"v{frames}.mp4", pipe.request(PROMPT, steps=1, frames=frames, height=32,
                                                                           width=32))
        peaks[frames] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert video.frames is None and read_video(video.path)[0].shape == (frames, 32, 32, 3)
    assert peaks[144] <= 1.25 * peaks[16], peaks


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-v2", "tiny-grid"])
def test_release_code_paths_on_the_runtime(name, tmp_path):
    """V2's chunked causal VAE (18 frames: two 9-frame chunks) and the release DiT's Grid
    Reshape + hybrid attention, through the ONNX Runtime engines, against the reference."""
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.runtime.pipeline import Pipeline

    model_dir = save_model(build_model(name), tmp_path / name)
    frames = 18 if name == "tiny-v2" else 9
    pipe = Pipeline.from_pretrained(model_dir, cache_dir=tmp_path / "c", buckets=[Bucket(32, 64, frames)], threads=1)
    ref = ReferencePipeline.from_pretrained(model_dir)
    req = ref.request(PROMPT, steps=3, seed=4, frames=frames, height=32, width=64)
    want, got = ref.run(req), pipe.run(req)
    assert np.abs(got.latents - want.latents.numpy()).max() <= 1e-3
    assert got.frames.shape == want.frames.shape == (frames, 32, 64, 3)
    assert psnr(got.frames, want.frames) >= 40


class FakeClip:
    """A deterministic stand-in for the CLIP vision model: an embedding of the image."""

    embed_dim = 24

    def __call__(self, image):
        x = torch.from_numpy(np.asarray(image, np.float32) / 255.0)
        return torch.stack([x[..., k % 3].mean() * (k + 1) / 24 for k in range(24)])[None]


@pytest.mark.slow
def test_inp_text_and_image_to_video_on_the_runtime(tmp_path):
    """A V3-style InP model: mask and masked-video latents through the VAE encoder engines,
    the CLIP embedding in the last half of the steps; runtime vs reference, t2v and i2v."""
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.runtime.conditioning import inpaint_latents
    from easyanimate_rt.runtime.pipeline import Pipeline

    model_dir = save_model(build_model("tiny-inp"), tmp_path / "inp")
    pipe = Pipeline.from_pretrained(model_dir, cache_dir=tmp_path / "c", buckets=[Bucket(32, 32, 9)], threads=1)
    assert ("batched", "vae_encoder/slice") in pipe.engines and ("batched", "vae_encoder/image") in pipe.engines
    ref = ReferencePipeline.from_pretrained(model_dir)
    ref.clip_encoder = pipe.clip_encoder = FakeClip()
    image = (np.arange(32 * 32 * 3).reshape(32, 32, 3) % 251).astype(np.uint8)
    for kwargs in ({}, {"image": image}):
        req = ref.request(PROMPT, steps=4, seed=1, frames=9, height=32, width=32, **kwargs)
        want = ref.inpaint_latents(req).numpy()
        got_latents = inpaint_latents(pipe.config, req, lambda key: pipe.engine(key, "batched"))
        assert np.abs(got_latents - want).max() <= 1e-4
        got, expected = pipe.run(req), ref.run(req)
        assert np.abs(got.latents - expected.latents.numpy()).max() <= 1e-3, kwargs
        assert psnr(got.frames, expected.frames) >= 40
    # the image matters: the same request without it ends elsewhere
    assert np.abs(pipe.run(ref.request(PROMPT, steps=4, seed=1, frames=9, height=32, width=32)).latents
                  - got.latents).max() > 1e-2


def test_fingerprint_of_large_files_is_cheap_but_sees_changes(tmp_path, monkeypatch):
    from easyanimate_rt.reference import config as config_module

    monkeypatch.setattr(config_module, "LARGE_FILE", 1 << 10)  # treat 1 KiB as "large" here
    model = tmp_path / "m"
    model.mkdir()
    weights = model / "w.safetensors"
    weights.write_bytes(bytes(range(256)) * 64)
    (model / "README.md").write_text("a card")
    before = model_fingerprint(model)
    (model / "README.md").write_text("another card")  # model cards do not count
    assert model_fingerprint(model) == before
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # the last MiB is hashed
    weights.write_bytes(bytes(data))
    assert model_fingerprint(model) != before


def test_smoothed_decode_on_the_engines_equals_the_reference(ort_pipe, ref):
    """decode="smooth" on the runtime: the VAE encoder engines are built with the decoder's
    (the request asks for them), the frames stream out in several chunks, in order, and
    equal the reference's smoothed frames (uint8, off by at most one level); the window's
    frames differ from the plain decode, the frames outside it do not."""
    import torch

    req = ort_pipe.request(PROMPT, steps=2, seed=3, frames=17, height=64, width=64, decode="smooth")
    ort_pipe.prepare(req)
    assert any(key.startswith("vae_encoder/") for _, key in ort_pipe.engines)
    rng = np.random.default_rng(0)
    latents = rng.standard_normal(req.latent_shape(ort_pipe.config)).astype(np.float32)
    chunks = list(ort_pipe.iter_frames(latents, decode="smooth"))
    got = np.concatenate(chunks)
    plain = np.concatenate(list(ort_pipe.iter_frames(latents)))
    want = np.concatenate(list(ref.iter_frames(torch.from_numpy(latents), "smooth")))
    assert len(chunks) >= 2 and got.shape == plain.shape == want.shape == (17, 64, 64, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
    diff = np.abs(got.astype(int) - plain.astype(int)).reshape(17, -1).max(axis=1)
    assert (diff[:4] == 0).all() and (diff[13:] == 0).all() and (diff[4:13] > 0).all()  # the window (4, 13)
