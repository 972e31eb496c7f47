"""LoRA on the runtime (issue 27): the adapters are part of the model source, so a LoRA's
engines are their own (another engine directory, never the base model's); the runtime's
video with a LoRA equals the reference pipeline's with the same LoRA; switching back to
the base reuses the base engines; weight 0 is the base model; bad LoRA input is refused
before any work, on the CLI without a traceback or an output file."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from exported import build_model
from needs import require

from easyanimate_rt.engines.buckets import Bucket
from easyanimate_rt.reference.lora import Adapter, lora_targets, save_kohya
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.runtime.source import ModelSource
from easyanimate_rt.reference.weights import save_model

PROMPT = "a red circle"
KW = dict(steps=2, seed=5, frames=9, height=32, width=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model(build_model("tiny"), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def lora(model_dir, tmp_path_factory):
    """A rank-2 LoRA on every DiT Linear of the tiny model (large enough to move the video)."""
    model = build_model("tiny")
    g = torch.Generator().manual_seed(11)
    layers = {}
    for name, module in lora_targets(model).items():
        w = module.weight
        layers[name] = (torch.randn(2, w.shape[1], generator=g) * 0.3, torch.randn(w.shape[0], 2, generator=g) * 0.3)
    return save_kohya(tmp_path_factory.mktemp("lora") / "style.safetensors", layers, alpha=2.0, rank=2)


def _video(pipe, **kw):
    return pipe.run(pipe.request(PROMPT, **{**KW, **kw}))


def test_a_lora_is_part_of_the_model_source(model_dir, lora):
    base = ModelSource.of(model_dir)
    one = ModelSource.of(model_dir, loras=[f"{lora}:0.5"])
    assert one.adapters == (Adapter.open(lora, 0.5),) and one.base_fingerprint == base.fingerprint
    assert len({base.fingerprint, one.fingerprint, ModelSource.of(model_dir, loras=[lora]).fingerprint}) == 3
    assert ModelSource.of(model_dir, loras=[(lora, 0.5)]).fingerprint == one.fingerprint
    assert one.with_loras([]).fingerprint == base.fingerprint


def test_runtime_with_a_lora_equals_the_reference_and_switches_back(model_dir, lora, tmp_path):
    """ORT CPU engines of the merged model, derived from the base engines by swapping the
    merged weights into their graphs (engines/ort_swap.py): the reference's video with the
    same LoRA (within one uint8 level), not the base's; set_loras([]) goes back to the base
    engines (loaded, not built again) and the base video."""
    for m in ("onnx", "onnxscript", "onnxruntime"):
        require(m)
    from easyanimate_rt.runtime.pipeline import Pipeline

    cache = tmp_path / "cache"
    pipe = Pipeline.from_pretrained(model_dir, backend="ort", cache_dir=cache, buckets=[Bucket(32, 32, 9)], threads=1)
    base_dir = pipe.engine_dir("batched")
    base = _video(pipe)
    pipe.set_loras([f"{lora}:0.8"])
    with_lora = _video(pipe)
    lora_dir = pipe.engine_dir("batched")
    assert lora_dir != base_dir and "lora_swap" in (lora_dir / "engines.json").read_text()  # swapped, not rebuilt
    want = ReferencePipeline.from_pretrained(model_dir, loras=[f"{lora}:0.8"]).run(
        ReferencePipeline.from_pretrained(model_dir).request(PROMPT, **KW))
    assert np.abs(with_lora.frames.astype(int) - want.frames.astype(int)).max() <= 1
    assert np.abs(with_lora.frames.astype(int) - base.frames.astype(int)).max() > 8
    built = pipe.engine_set.build_seconds
    pipe.set_loras([])
    again = _video(pipe)
    assert pipe.engine_set.build_seconds == built  # the base engines were loaded, not rebuilt
    np.testing.assert_array_equal(again.frames, base.frames)


def test_torch_backend_switches_in_place_and_weight_zero_is_the_base(model_dir, lora, tmp_path):
    from easyanimate_rt.runtime.pipeline import Pipeline

    pipe = Pipeline.from_pretrained(model_dir, backend="torch", cache_dir=tmp_path / "c", buckets=[Bucket(32, 32, 9)])
    base = _video(pipe)
    pipe.set_loras([f"{lora}:1.0"])
    one = _video(pipe)
    pipe.set_loras([f"{lora}:0"])
    zero = _video(pipe)
    np.testing.assert_array_equal(zero.latents, base.latents)  # weight 0: the base weights, bit for bit
    ref = ReferencePipeline.from_pretrained(model_dir, loras=[lora])
    want = ref.run(ref.request(PROMPT, **KW))
    np.testing.assert_allclose(one.latents, want.latents.numpy(), rtol=1e-5, atol=1e-5)
    assert np.abs(one.latents - base.latents).max() > 1e-2


@pytest.mark.parametrize("spec, rule", [
    ("missing.safetensors", "LoRA file not found"),
    ("{lora}:nan", "LoRA weight must be finite"),
    ("{lora}:heavy", "LoRA weight must be a number"),
    ("{bad}", "safetensors"),
])
def test_cli_refuses_bad_lora_before_any_work(model_dir, lora, tmp_path, spec, rule):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    out = tmp_path / "v.mp4"
    result = subprocess.run([sys.executable, "-m", "easyanimate_rt", "generate", PROMPT, "--model", str(model_dir),
                             "--lora", spec.format(lora=lora, bad=bad), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and rule in result.stderr, result.stderr
    assert not out.exists()


def test_cli_refuses_the_same_lora_twice(model_dir, lora, tmp_path):
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(lora.read_bytes())
    result = subprocess.run([sys.executable, "-m", "easyanimate_rt", "generate", PROMPT, "--model", str(model_dir),
                             "--lora", str(lora), "--lora", f"{copy}:0.5", "--out", str(tmp_path / "v.mp4")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "the same LoRA may be given only once" in result.stderr, result.stderr
