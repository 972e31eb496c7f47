"""Damaged files in the engine cache are checked against the hashes recorded for them
before use: a corrupted or truncated exported graph is exported again (never built
from) and its engines rebuilt on first use, giving the same video; with
``--no-compile`` the run stops with an error naming the file. And ``engines clean``
on a real cache removes the cache's items only."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from exported import build_model
from needs import require

from easyanimate_rt.cli import main
from easyanimate_rt.engines.buckets import Bucket
from easyanimate_rt.errors import EngineError
from easyanimate_rt.reference.weights import save_model

BUCKET = Bucket(32, 32, 1)
KWARGS = dict(steps=2, seed=5, height=32, width=32, frames=1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("damaged")
    model = save_model(build_model("tiny"), root / "tiny")
    cache = root / "cache"
    pipe = Pipeline.from_pretrained(model, cache_dir=cache, buckets=[BUCKET], threads=1)
    want = pipe("a red circle", **KWARGS).frames
    pipe.close()
    return model, cache, want


def load(model, cache, **kw):
    from easyanimate_rt.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(model, cache_dir=cache, buckets=[BUCKET], threads=1, **kw)


def export_dir(cache):
    (found,) = (cache / "models").glob("*/export-fp32")
    return found


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_graph_is_exported_again_and_named_without_compile(setup, damage):
    model, cache, want = setup
    graph = export_dir(cache) / "dit" / "model.onnx"
    recorded = json.loads((graph.parent / "spec.json").read_text())["graph"]["sha256"]
    data = bytearray(graph.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
        graph.write_bytes(bytes(data))
    else:
        graph.write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(EngineError, match="model.onnx") as err:
        load(model, cache, compile=False)
    assert "drop --no-compile" in str(err.value)
    # the CLI: exit 2, the file named, no video
    out = graph.parents[3] / "v.png"
    assert main(["generate", "a red circle", "--model", str(model), "--cache-dir", str(cache), "--no-compile",
                 "--height", "32", "--width", "32", "--frames", "1", "--steps", "2", "--out", str(out), "-q"]) == 2
    assert not out.exists()
    # compile on first use: the graph is exported again (same bytes as first written), the video is the same
    pipe = load(model, cache)
    from easyanimate_rt.fileio import sha256_files

    assert sha256_files([graph]) == recorded
    np.testing.assert_array_equal(pipe("a red circle", **KWARGS).frames, want)
    pipe.close()
    np.testing.assert_array_equal(load(model, cache, compile=False)("a red circle", **KWARGS).frames, want)


def test_a_damaged_spec_or_index_is_rewritten_on_first_use(setup):
    model, cache, want = setup
    spec = export_dir(cache) / "vae_decoder"
    (victim,) = [p for p in spec.rglob("spec.json")][:1]
    victim.write_text("[1, 2")
    pipe = load(model, cache)
    np.testing.assert_array_equal(pipe("a red circle", **KWARGS).frames, want)
    pipe.close()
    index = next((cache / "models").glob("*/ort-cpu-fp32-batched")) / "engines.json"
    index.write_text(json.dumps([1, 2, 3]))
    with pytest.raises(EngineError, match="engines.json holds a JSON list"):
        load(model, cache, compile=False)
    np.testing.assert_array_equal(load(model, cache)("a red circle", **KWARGS).frames, want)


def test_clean_on_a_real_cache_keeps_foreign_files(setup, capsys):
    model, cache, _ = setup
    (cache / "my-notes.txt").write_text("keep me\n")
    os.mkdir(cache / "photos")
    (cache / "photos" / "a.jpg").write_bytes(b"\xff\xd8" + bytes(100))
    assert main(["engines", "clean", "--cache-dir", str(cache), "--yes"]) == 0
    out = capsys.readouterr().out
    assert "leaving 2 items that are not the cache's" in out
    assert sorted(p.name for p in cache.iterdir()) == ["CACHEDIR.TAG", "my-notes.txt", "photos"]
    assert (cache / "my-notes.txt").read_text() == "keep me\n"
    assert (cache / "photos" / "a.jpg").read_bytes() == b"\xff\xd8" + bytes(100)
