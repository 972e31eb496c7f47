"""The ONNX Runtime LoRA switch by initializer swap (issue 27, engines/ort_swap.py): every
weight a LoRA changes is found by content in the base engines' optimised graphs; the
swapped engines equal engines built from scratch for the merged model and pass the
parity gate against the reference with the LoRA; the runtime loads them as its own
engines of the LoRA model (no build); a weight that cannot be found makes the caller
rebuild, with a log line saying why; graphs with external data are patched in place."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from exported import build_model
from needs import require

from easyanimate_rt.engines.buckets import Bucket
from easyanimate_rt.engines.manifest import Manifest, read_index
from easyanimate_rt.engines.ort_swap import (
    base_values,
    derive_engines,
    derive_lora_engines,
    initializer_map,
    swap_graph,
)
from easyanimate_rt.reference.lora import lora_targets, merged_state, save_kohya
from easyanimate_rt.reference.weights import save_model
from easyanimate_rt.tolerances import error_stats, within

BUCKET = Bucket(32, 32, 9)
PROMPT = "a red circle"
KW = {"steps": 2, "seed": 5, "frames": 9, "height": 32, "width": 32}
SWAPPED = ("dit", "text_encoder")
#: Swapped against scratch-built engines, relative to the output's scale: float reassociation
#: only (0 when both builds keep the same transformer fusions, a timing-dependent choice).
SAME_GRAPH_RTOL = 1e-5


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Base engines of the tiny model (cache A); a LoRA on every DiT and T5 Linear; that
    LoRA's engines built from scratch (cache B, a fresh pipeline as a first use)."""
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.runtime.pipeline import Pipeline

    root = tmp_path_factory.mktemp("swap")
    model_dir = save_model(build_model("tiny"), root / "tiny")
    g = torch.Generator().manual_seed(3)
    layers = {name: (torch.randn(2, m.weight.shape[1], generator=g) * 0.3,
                     torch.randn(m.weight.shape[0], 2, generator=g) * 0.3)
              for name, m in lora_targets(build_model("tiny"), text_encoder=True).items()}
    lora = save_kohya(root / "style.safetensors", layers, alpha=2.0, rank=2)
    spec = f"{lora}:0.8"
    pipe = Pipeline.from_pretrained(model_dir, backend="ort", cache_dir=root / "a", buckets=[BUCKET], threads=1)
    scratch = Pipeline.from_pretrained(model_dir, backend="ort", cache_dir=root / "b", buckets=[BUCKET], threads=1,
                                       loras=[spec])
    return SimpleNamespace(root=root, pipe=pipe, base_dir=pipe.engine_dir("batched"), scratch=scratch,
                           scratch_dir=scratch.engine_dir("batched"), lora=spec, layers=layers)


@pytest.fixture(scope="module")
def derived(built):
    """The base pipeline switched to the LoRA, its engine directory derived by swap
    before its engines are asked for (as EngineSet._ensure_built would)."""
    pipe = built.pipe
    pipe.set_loras([built.lora])
    model = pipe.model()  # the reference with the LoRA merged (from its kept base copies)
    merged = merged_state(model, pipe.source.adapters)
    new_dir = pipe.engine_dir("batched")
    from easyanimate_rt.runtime.backends import gate_runner

    assert derive_lora_engines(model, pipe.source.adapters, built.base_dir, new_dir, runner=gate_runner, threads=1,
                               index_info={"source_sha256": pipe.source.fingerprint})
    return SimpleNamespace(dir=new_dir, model=model, merged=merged)


def test_every_lora_weight_is_found_in_the_optimised_graphs(built):
    model = built.pipe.model()
    for key in SWAPPED:
        params = {f"{name}.weight": m.weight for name, m in lora_targets(model, text_encoder=True).items()
                  if name.startswith(key + ".")}
        slots = initializer_map(built.base_dir / key / "model.ort.onnx", base_values(model, params))
        assert set(slots) == set(params), sorted(set(params) - set(slots))[:3]
        assert len({s[0] for s in slots.values()}) == len(slots)  # one initializer each
        assert any(t for _, t in slots.values())  # exported Linear weights are stored transposed


def test_swapped_engines_equal_engines_built_from_scratch(built, derived):
    """Outputs of the swapped DiT and T5 engines against the scratch-built ones (float
    tolerance of one graph in two sessions) and the torch reference with the LoRA (the
    parity gate's tolerance); the VAE engines are the base's files, hard-linked."""
    from easyanimate_rt.engines.build import parity_feeds
    from easyanimate_rt.export.graphs import run_torch
    from easyanimate_rt.export.index import load_export
    from easyanimate_rt.runtime.backends.ort import OrtEngine

    index = read_index(derived.dir)
    export = load_export(index["export"])
    assert index["source_sha256"] == built.pipe.source.fingerprint
    assert sorted(index["lora_swap"]["swapped"]) == sorted(SWAPPED)
    for key in SWAPPED:
        manifest = Manifest.load(derived.dir / key)
        assert manifest.parity["ok"] and manifest.flags["lora_swap"]["initializers"] > 0
        spec = export.specs[key]
        engines = {name: OrtEngine(d / key, spec, read_index(d)["networks"][key]["onnx"], threads=1)
                   for name, d in (("swap", derived.dir), ("scratch", built.scratch_dir), ("base", built.base_dir))}
        feeds = parity_feeds(spec.replace(profiles=tuple(engines["swap"].profiles())), export.root / key)
        for feed in feeds:
            out = {name: e.run(feed)[spec.output_names[0]] for name, e in engines.items()}
            diff = float(np.abs(out["swap"] - out["scratch"]).max())
            print(f"{key}: swapped vs scratch-built max abs diff {diff:.3g}")
            assert diff <= SAME_GRAPH_RTOL * max(1.0, float(np.abs(out["scratch"]).max()))
            stats = error_stats(out["swap"], run_torch(derived.model, spec, feed)[spec.output_names[0]])
            assert within(stats, spec.precision.tolerance), stats
            assert np.abs(out["swap"] - out["base"]).max() > 1e-3  # the LoRA is in
    for key, entry in index["networks"].items():
        if key.startswith("vae"):
            for f in (derived.dir / entry["dir"]).iterdir():
                if f.name != "manifest.json":
                    assert os.path.samefile(f, built.base_dir / entry["dir"] / f.name)


def test_the_runtime_loads_the_derived_engines_without_a_build(built, derived):
    """The derived directory is where the runtime looks for the LoRA's engines: it loads
    them (no build) and its video equals the scratch-built engines' video."""
    pipe = built.pipe
    before = pipe.engine_set.build_seconds
    video = pipe.run(pipe.request(PROMPT, **KW))
    assert pipe.engine_set.build_seconds == before
    want = built.scratch.run(built.scratch.request(PROMPT, **KW))
    assert np.abs(video.frames.astype(int) - want.frames.astype(int)).max() <= 1
    np.testing.assert_allclose(video.latents, want.latents, rtol=1e-5, atol=1e-4)


def test_a_weight_not_found_falls_back_to_a_rebuild(built, derived, tmp_path, caplog):
    merged = dict(derived.merged)
    base = base_values(derived.model, merged)
    name = min(n for n in base if n.startswith("dit."))
    base[name] = base[name] + 1.0  # no graph holds this "base" weight
    new_dir = tmp_path / "lora"
    with caplog.at_level(logging.INFO, logger="easyanimate_rt.engines.ort_swap"):
        assert not derive_engines(built.base_dir, new_dir, merged, base, model=derived.model, threads=1)
    assert "not found unchanged" in caplog.text and name in caplog.text and "from scratch" in caplog.text
    assert not new_dir.exists()


def test_no_base_engines_falls_back(derived, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="easyanimate_rt.engines.ort_swap"):
        assert not derive_engines(tmp_path / "none", tmp_path / "lora", derived.merged,
                                  base_values(derived.model, derived.merged))
    assert "no base engines" in caplog.text


def test_a_graph_with_external_data_is_patched_in_place(tmp_path):
    """initializer_map reads external data; swap_graph keeps the protobuf and patches the
    data file's ranges; ONNX Runtime runs the new weights."""
    require("onnx")
    require("onnxruntime")
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)          # a Linear weight (out, in)
    b = rng.standard_normal((6, 3)).astype(np.float32)          # another, stored as is
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "wt"], ["h"]), helper.make_node("MatMul", ["h", "b"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "wt"), numpy_helper.from_array(b, "b")])
    path = tmp_path / "src" / "model.ort.onnx"
    path.parent.mkdir()
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="model.ort.onnx.data",
              size_threshold=0)
    slots = initializer_map(path, {"lin": torch.from_numpy(w), "other": b})
    assert slots == {"lin": ("wt", True), "other": ("b", False)}
    w2 = rng.standard_normal((6, 4)).astype(np.float32)
    out = tmp_path / "dst" / "model.ort.onnx"
    out.parent.mkdir()
    written = swap_graph(path, out, {"wt": np.ascontiguousarray(w2.T)})
    assert [p.name for p in written] == ["model.ort.onnx", "model.ort.onnx.data"]
    assert out.read_bytes() == path.read_bytes()  # the protobuf is unchanged
    x = rng.standard_normal((2, 4)).astype(np.float32)
    y = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w2.T @ b, rtol=1e-5, atol=1e-5)
    assert initializer_map(out, {"lin": w2}) == {"lin": ("wt", True)}
