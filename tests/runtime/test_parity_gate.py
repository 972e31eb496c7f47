"""The parity gate runs through the runtime's own Engine classes (runtime/backends'
gate_runner, which `build`, compile on first use and the CLI pass to engines/build):
the engine a build stages is loaded and run as generation would run it, and an engine
whose outputs miss the reference is refused with its figures and never cached."""

from __future__ import annotations

import numpy as np
import pytest
from exported import build_model
from needs import require

from easyanimate_rt.engines.buckets import parse_buckets
from easyanimate_rt.engines.build import build_engines, parity_feeds, parity_gate
from easyanimate_rt.engines.cache import EngineCache
from easyanimate_rt.errors import EngineError
from easyanimate_rt.runtime import backends
from easyanimate_rt.runtime.backends.ort import OrtEngine
from easyanimate_rt.runtime.backends.torch import TorchEngine
from easyanimate_rt.runtime.engine import to_host

BUCKET = parse_buckets("32x32x1")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.export.onnx import export_model

    model = build_model("tiny")
    root = tmp_path_factory.mktemp("export") / "tiny"
    export_model(model, root, "fp32", ["text_encoder", "dit", "vae_decoder"], source="tiny", seed=0)
    return root, model


def spying_runner(calls: list):
    def runner(staging, spec, onnx_path, builder, threads):
        run = backends.gate_runner(staging, spec, onnx_path, builder, threads)

        def spied(feed):
            calls.append(spec.key)
            return run(feed)

        return spied

    return runner


def test_the_gate_runs_the_runtimes_engine(export, tmp_path, monkeypatch):
    root, model = export
    loaded: list = []
    original = OrtEngine.__init__

    def init(self, *args, **kwargs):
        loaded.append(args[0])
        original(self, *args, **kwargs)

    monkeypatch.setattr(OrtEngine, "__init__", init)
    calls: list = []
    results = build_engines(root, tmp_path / "e", "ort-cpu", BUCKET, cache=EngineCache(tmp_path / "c"),
                            model=model, threads=1, runner=spying_runner(calls))
    assert sorted(r.key for r in results) == ["dit", "text_encoder", "vae_decoder/lone"]
    for r in results:
        assert r.manifest.parity["ok"] and r.manifest.parity["max_abs"] <= 1e-4
        assert calls.count(r.key) == r.manifest.parity["inputs"]  # every gate input, through the engine
    assert len(loaded) == 3 and all(p.name.startswith(".") for p in loaded)  # the staged entries, by OrtEngine


def test_a_wrong_engine_is_refused_and_not_cached(export, tmp_path, monkeypatch):
    root, model = export
    original = OrtEngine.run

    def off_by_a_little(self, feeds):
        return {k: v + np.float32(0.05) for k, v in original(self, feeds).items()}

    monkeypatch.setattr(OrtEngine, "run", off_by_a_little)
    cache = EngineCache(tmp_path / "c")
    with pytest.raises(EngineError, match=r": parity gate failed: max_abs 0\.05 .*the engine was not cached"):
        build_engines(root, tmp_path / "e", "ort-cpu", BUCKET, cache=cache, model=model, threads=1,
                      runner=backends.gate_runner)
    assert cache.entries() == [] and not list(cache.root.glob(".*partial*"))
    assert not (tmp_path / "e").exists()


def test_the_gate_refuses_a_torch_engine_of_another_model(export):
    root, model = export
    from easyanimate_rt.export.index import load_export

    spec = load_export(root).specs["text_encoder"]
    other = TorchEngine(build_model("tiny-grid"), spec)  # another model's weights behind the same graph

    def run(feed):
        return to_host(other.run(feed)["text_embeddings"])

    with pytest.raises(EngineError, match="parity gate failed"):
        parity_gate(run, spec, model, parity_feeds(spec, root / "text_encoder"))
    same = TorchEngine(model, spec)
    figures = parity_gate(lambda feed: to_host(same.run(feed)["text_embeddings"]), spec, model,
                          parity_feeds(spec, root / "text_encoder"))
    assert figures["ok"] and figures["max_abs"] == 0.0


def test_an_engine_never_gated_here_is_gated_through_its_engine_on_first_load(tmp_path, monkeypatch):
    """An engine built where it could not run (an ahead-of-time plan) carries no gate
    figures; the first load on a machine that runs it gates it through its Engine and
    records the figures; a wrong one is refused with them and nothing runs on it."""
    from easyanimate_rt.engines.buckets import Bucket
    from easyanimate_rt.engines.manifest import Manifest
    from easyanimate_rt.runtime.pipeline import Pipeline

    kwargs = dict(cache_dir=tmp_path / "c", buckets=[Bucket(32, 32, 1)], threads=1)
    entry = Pipeline.from_pretrained("tiny", **kwargs).engine_dir("batched") / "dit"

    def never_gated() -> None:
        manifest = Manifest.load(entry)
        manifest.parity = {"skipped": "rtx engines do not run on this machine"}
        manifest.save(entry)

    never_gated()
    pipe = Pipeline.from_pretrained("tiny", compile=False, **kwargs)
    parity = Manifest.load(entry).parity
    assert parity["ok"] and parity["gated_at_load"] == "cpu" and parity["max_abs"] <= 1e-4
    assert pipe("a red circle", steps=2, frames=1, height=32, width=32).frames.shape == (1, 32, 32, 3)
    never_gated()
    original = OrtEngine.run
    monkeypatch.setattr(OrtEngine, "run", lambda self, feeds: {k: v + np.float32(0.05)
                                                                for k, v in original(self, feeds).items()})
    with pytest.raises(EngineError, match=r"cannot be used: dit: parity gate failed: max_abs 0\.05"):
        Pipeline.from_pretrained("tiny", compile=False, **kwargs)
    assert "skipped" in Manifest.load(entry).parity  # no figures recorded for a refused engine
