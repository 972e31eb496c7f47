"""Step caching (runtime/step_cache.py): the head/tail split equals the whole DiT, threshold
0 equals the uncached runtime, a skipped step reuses the cached residual, first/last
steps are always computed, guidance branches share decisions, the drift guard fires and
lowers the threshold, and bad settings are refused with the rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exported import build_model
from needs import require

from easyanimate_rt.engines.buckets import Bucket
from easyanimate_rt.errors import InputError, ShapeError
from easyanimate_rt.export.graphs import run_torch
from easyanimate_rt.export.spec import dit_spec, make_specs
from easyanimate_rt.reference.weights import save_model
from easyanimate_rt.runtime.step_cache import CacheSettings, StepCache, fit_rescale, rel_l1

PROMPT = "a red circle moving left"
SIZE = dict(frames=9, height=64, width=64)


@pytest.fixture(scope="module")
def model():
    return build_model("tiny")


@pytest.fixture(scope="module")
def model_dir(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def pipeline(model_dir, cache_dir, **kwargs):
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(model_dir, backend=kwargs.pop("backend", "ort"), cache_dir=cache_dir,
                                    buckets=[Bucket(64, 64, 9)], threads=1, **kwargs)


@pytest.fixture(scope="module")
def plain(model_dir, cache_dir):
    return pipeline(model_dir, cache_dir)


@pytest.fixture(scope="module")
def split(model_dir, cache_dir):
    return pipeline(model_dir, cache_dir, cache=CacheSettings("fbcache", 0.0))


def feeds_for(model, spec_key="dit"):
    whole = dit_spec(model.config)
    feeds = whole.sample_inputs()
    b, _, f, hh, ww = feeds["latents"].shape
    d = model.config.dit
    feeds["cached_residual"] = np.random.default_rng(3).standard_normal(
        (b, f, hh // d.patch_size, ww // d.patch_size, d.hidden_size), dtype=np.float32)
    return whole, feeds


def test_head_and_tail_equal_the_whole_dit(model, split):
    """Torch: exactly; ORT fp32 engines (at the sample shape): within 1e-5."""
    whole, feeds = feeds_for(model)
    head, tail = make_specs(model.config, networks=["dit_cache"])
    want = run_torch(model, whole, feeds)["noise_pred"]
    h = run_torch(model, head, feeds)
    t = run_torch(model, tail, {x.name: h[x.name] for x in tail.inputs})
    assert np.array_equal(t["noise_pred"], want)
    # skip_pred with the true tail residual is the whole DiT's output again
    h2 = run_torch(model, head, {**feeds, "cached_residual": t["tail_residual"]})
    assert np.abs(h2["skip_pred"] - want).max() <= 1e-5 * np.abs(want).max()

    eh, et = split.engine("dit_cache/head"), split.engine("dit_cache/tail")
    shape = (2, 4, 3, 8, 8)  # the bucket's DiT shape: batch 2, 3 latent frames, 8 x 8
    rng = np.random.default_rng(0)
    f = {"latents": rng.standard_normal(shape, dtype=np.float32), "timestep": np.array([10.0, 900.0], np.float32),
         "text": feeds["text"][:2], "text_mask": feeds["text_mask"][:2],
         "cached_residual": np.zeros((2, 3, 4, 4, model.config.dit.hidden_size), np.float32)}
    want = run_torch(model, whole, f)["noise_pred"]
    ho = eh.run(f)
    got = et.run({x.name: ho[x.name] for x in et.spec.inputs})["noise_pred"]
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


def test_threshold_zero_matches_the_uncached_runtime(plain, split):
    req = plain.request(PROMPT, steps=6, seed=4, **SIZE)
    want = plain.run(req)
    got = split.run(req)
    # the random tiny model's latents grow to ~450: 1e-5 of their scale (measured 3.7e-4 abs)
    assert np.abs(got.latents - want.latents).max() <= 1e-5 * np.abs(want.latents).max()
    assert np.abs(got.frames.astype(int) - want.frames).max() <= 1
    report = got.timings["step_cache"]
    assert report["computed"] == 6 and report["skipped"] == 0


def test_a_skipped_step_reuses_the_cached_residual(model, model_dir, cache_dir):
    """With a huge threshold every middle step is a skip or a guard check. A skipped
    step's prediction equals the whole DiT on (this step's first block + the residual
    the last computed step left), computed here by hand with the torch modules."""
    settings = CacheSettings("fbcache", 1e9, warmup=2, cooldown=2, check_every=100, max_skips=100)
    pipe = pipeline(model_dir, cache_dir, cache=settings)
    req = pipe.request(PROMPT, steps=8, seed=1, **SIZE)
    head, tail = pipe.engine("dit_cache/head"), pipe.engine("dit_cache/tail")
    seen: list = []
    run_head, run_tail = head.run, tail.run
    def spy(kind, run):  # copies: the loop refills its input buffers in place
        return lambda f: seen.append((kind, {k: np.array(v) for k, v in f.items()}, run(f))) or seen[-1][2]

    head.run, tail.run = spy("head", run_head), spy("tail", run_tail)
    try:
        report = pipe.run(req).timings["step_cache"]
    finally:
        head.run, tail.run = run_head, run_tail
    assert report["decisions"] == "CC....CC"  # first and last two computed, the rest skipped
    kinds = "".join("h" if k == "head" else "t" for k, _, _ in seen)
    assert kinds == "htht" + "h" * 4 + "htht"
    last_tail = seen[3][2]["tail_residual"]
    dit = model.dit
    for _, feeds, out in seen[4:8]:
        assert np.array_equal(feeds["cached_residual"], last_tail)
        with torch.no_grad():  # by hand: this step's first block + the cached residual -> final layer
            x0, ctx = dit.embed(*(torch.from_numpy(feeds[n]) for n in ("latents", "timestep", "text", "text_mask")))
            x1 = dit.run_blocks(x0, ctx, 0, 1, [])
            want = dit.final_layer(x1 + torch.from_numpy(last_tail).reshape(x1.shape), ctx).numpy()
        assert np.abs(out["skip_pred"] - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    # the skips changed the result: every step computed gives other latents
    forced = pipeline(model_dir, cache_dir, cache=CacheSettings("fbcache", 0.0)).run(req)
    assert np.abs(forced.latents - pipe.run(req).latents).max() > 1e-4


def test_decisions_first_last_and_shared_branches():
    steps = 10
    cache = StepCache(CacheSettings("fbcache", 0.5, warmup=2, cooldown=2, check_every=100, max_skips=100), steps)
    r = np.ones((2, 1, 2, 2, 4), np.float32)  # both guidance branches in one signal
    decisions = []
    for i in range(steps):
        sig = {"first_residual": r * (1 + 0.01 * i), "modulated": r}
        d = cache.decide(i, sig)
        decisions.append(d)
        if d != "skip":
            cache.computed(i, sig)
    assert decisions[:2] == ["compute"] * 2 and decisions[-2:] == ["compute"] * 2
    assert set(decisions[2:-2]) == {"skip"}
    # one branch changing a lot: the shared metric computes the step for both
    cache = StepCache(CacheSettings("fbcache", 0.05, warmup=1, cooldown=0), 3)
    base = {"first_residual": r, "modulated": r}
    cache.decide(0, base)
    cache.computed(0, base)
    moved = r.copy()
    moved[1] *= 1.5  # the positive branch only
    assert cache.decide(1, {"first_residual": moved, "modulated": r}) == "compute"


def test_teacache_accumulates_and_rescales():
    r = np.ones((1, 1, 2, 2, 4), np.float32)
    cache = StepCache(CacheSettings("teacache", 0.25, warmup=1, cooldown=0, check_every=100, max_skips=100), 8)
    decisions = []
    for i in range(8):
        sig = {"first_residual": r, "modulated": r * (1.1 ** i)}  # rel change ~0.091 per step
        d = cache.decide(i, sig)
        decisions.append(d)
        if d != "skip":
            cache.computed(i, sig)
    # 0.091 + 0.091 = 0.18 < 0.25, a third would be 0.27: compute, skip, skip, compute, ...
    assert decisions == ["compute", "skip", "skip", "compute", "skip", "skip", "compute", "skip"]
    coeffs = fit_rescale([0.1, 0.2, 0.3, 0.4], [0.2, 0.4, 0.6, 0.8], degree=1)
    assert coeffs == pytest.approx([2.0, 0.0], abs=1e-9)
    doubled = StepCache(CacheSettings("teacache", 0.25, warmup=1, cooldown=0, rescale=coeffs), 8)
    doubled.decide(0, {"modulated": r})
    assert doubled.metric({"modulated": r * 1.1}) == pytest.approx(2 * rel_l1(r * 1.1, r), rel=1e-6)


def test_the_drift_guard_fires_and_lowers_the_threshold(model_dir, cache_dir):
    """Everything would be skipped (threshold 1e9); every second skip is checked, the
    cached prediction is far from the computed one, so the guard halves the threshold."""
    settings = CacheSettings("fbcache", 1e9, warmup=1, cooldown=1, check_every=2, max_skips=100, drift_bound=1e-6)
    pipe = pipeline(model_dir, cache_dir, cache=settings)
    report = pipe.run(pipe.request(PROMPT, steps=8, seed=2, **SIZE)).timings["step_cache"]
    assert report["checked"] >= 2 and report["fired"], report
    assert report["final_threshold"] == pytest.approx(1e9 / 2 ** len(report["fired"]))
    assert all(e > 1e-6 for _, e in report["drift"])
    # a loose bound: checked, never fired
    loose = CacheSettings("fbcache", 1e9, warmup=1, cooldown=1, check_every=2, max_skips=100, drift_bound=1e9)
    pipe = pipeline(model_dir, cache_dir, cache=loose)
    report = pipe.run(pipe.request(PROMPT, steps=8, seed=2, **SIZE)).timings["step_cache"]
    assert report["checked"] >= 2 and not report["fired"]


@pytest.mark.parametrize("kwargs, rule", [
    (dict(policy="magic"), "policy must be one of"),
    (dict(policy="fbcache", threshold=-0.1), "threshold must be a finite number >= 0"),
    (dict(policy="teacache", threshold=float("nan")), "threshold must be a finite number >= 0"),
    (dict(policy="fbcache", warmup=0), "warmup must be an integer >= 1"),
    (dict(policy="fbcache", check_every=0), "check_every must be an integer >= 1"),
    (dict(policy="fbcache", drift_bound=0), "drift_bound must be > 0"),
])
def test_bad_settings(kwargs, rule):
    with pytest.raises(InputError, match=rule):
        CacheSettings(**kwargs)


def test_caching_without_split_engines_and_no_compile(model_dir, tmp_path):
    """No head/tail engines and compile-on-first-use off: an error naming what is missing."""
    from easyanimate_rt.runtime.pipeline import Pipeline

    with pytest.raises(ShapeError, match="no engines for 64x64x9"):
        Pipeline.from_pretrained(model_dir, backend="ort", cache_dir=tmp_path, compile=False,
                                 buckets=[Bucket(64, 64, 9)], cache="fbcache")


def test_torch_backend_caches_too(model_dir, cache_dir, plain):
    pipe = pipeline(model_dir, cache_dir, backend="torch", cache=CacheSettings("fbcache", 0.0))
    req = plain.request(PROMPT, steps=4, seed=7, **SIZE)
    torch.testing.assert_close(torch.from_numpy(pipe.run(req).latents), torch.from_numpy(plain.run(req).latents),
                               rtol=1e-4, atol=1e-4)
    assert type(pipe.engine("dit_cache/head")).__name__ == "TorchEngine"
