"""`train lora` (issue 27): factors train while the base stays frozen, the kohya file reads
back and merges into exactly the trained model, weight 0 is the base, a resume is bit
exact, and bad input is refused before any work."""

import json
import os
import signal

import numpy as np
import pytest
import torch
from exported import build_model

from easyanimate_rt.cli import main
from easyanimate_rt.errors import ConfigError, TrainingInterrupted
from easyanimate_rt.media import write_clip
from easyanimate_rt.reference.lora import Adapter, LoraMerger, kohya_name, lora_targets, read_lora
from easyanimate_rt.shapes.world import ShapesDataset
from easyanimate_rt.train.lora_trainer import LoraTrainConfig, save_lora, train_lora

SIZE, FRAMES = 32, 9


@pytest.fixture(scope="module")
def model():
    return build_model("tiny")


@pytest.fixture(scope="module")
def clips():
    return ShapesDataset(frames=FRAMES, size=SIZE, length=4, seed=3)


def _cfg(**kw) -> LoraTrainConfig:
    base = dict(rank=2, alpha=4.0, steps=6, batch_size=2, lr=1e-2, warmup_steps=1, cache_size=4,
                checkpoint_every=100, log_every=1, caption_dropout=0.3, save_dtype="float32")
    return LoraTrainConfig(**{**base, **kw})


def _dit_out(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 3, SIZE // 8, SIZE // 8, generator=g)               # (B, C, F, h, w)
    emb, mask = model.text_encoder.encode(["a small red circle moving left", "a blue square"])
    with torch.no_grad():
        return model.dit(x, torch.tensor([10, 700]), emb, mask)


def _state(model):
    return {k: v.clone() for net in (model.dit, model.text_encoder) for k, v in net.state_dict().items()}


def test_trains_factors_on_a_frozen_model_and_the_file_merges_to_the_trained_model(model, clips, tmp_path):
    before = _state(model)
    base_out = _dit_out(model)
    cfg = _cfg(steps=4)
    net = train_lora(model, clips, cfg, tmp_path / "run", progress=False)
    # The base weights are untouched; the factors moved away from up = 0.
    for k, v in _state(model).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    ups = [f.up for f in net.factors.values()]
    assert all(bool(u.abs().sum() > 0) for u in ups)
    assert len((tmp_path / "run" / "metrics.csv").read_text().splitlines()) == 1 + 4

    # The model with the hooks attached (what was trained) ...
    net.attach()
    trained_out = _dit_out(model)
    net.detach()
    assert not torch.equal(trained_out, base_out)

    # ... is what the written kohya file gives, merged at weight 1.
    path = save_lora(net, tmp_path / "a.safetensors", cfg)
    lora = read_lora(Adapter.open(path))
    targets = lora_targets(model)
    assert lora.format == "kohya" and not lora.unknown
    assert lora.total == 3 * len(targets)
    assert {layer.name for layer in lora.layers} == {kohya_name(q)[len("lora_unet__"):] for q in targets}
    assert {layer.rank for layer in lora.layers} == {2}
    assert {layer.scale for layer in lora.layers} == {2.0}                    # alpha 4 / rank 2
    assert not any("attn_temporal" in layer.name for layer in lora.layers)   # no motion module unless asked
    merger = LoraMerger(model)
    try:
        report, = merger.merge([Adapter.open(path, 1.0)])
        assert len(report.matched) == lora.total and not report.unmatched
        torch.testing.assert_close(_dit_out(model), trained_out, rtol=1e-4, atol=1e-5)
        merger.merge([Adapter.open(path, 0.0)])
        torch.testing.assert_close(_dit_out(model), base_out, rtol=0, atol=0)
    finally:
        merger.unmerge()
    for k, v in _state(model).items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def test_motion_module_and_text_encoder_are_adapted_when_asked(model, clips, tmp_path):
    cfg = _cfg(steps=2, motion_module=True, text_encoder=True)
    net = train_lora(model, clips, cfg, tmp_path / "run", progress=False)
    t5 = [f for q, f in zip(net.targets, net.factors.values()) if q.startswith("text_encoder.")]
    assert t5 and all(bool(f.up.abs().sum() > 0) for f in t5)               # T5 got gradients
    lora = read_lora(Adapter.open(save_lora(net, tmp_path / "b.safetensors", cfg)))
    names = [layer.name for layer in lora.layers]
    assert any("attn_temporal" in n for n in names)
    assert any(layer.network == "text_encoder" for layer in lora.layers)
    assert len(lora.layers) == len(lora_targets(model, motion_module=True, text_encoder=True))


def test_resume_is_exact(model, clips, tmp_path):
    cfg = _cfg(steps=4)
    whole = train_lora(model, clips, cfg, tmp_path / "a", progress=False).state_dict()

    calls = {"n": 0}

    def interrupt(module, args, out):  # a real SIGINT during step 2 (of 4)
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    hook = model.dit.register_forward_hook(interrupt)
    try:
        with pytest.raises(TrainingInterrupted) as info:
            train_lora(model, clips, cfg, tmp_path / "b", progress=False)
    finally:
        hook.remove()
    assert info.value.step == 2
    resumed = train_lora(model, clips, cfg, tmp_path / "b", progress=False).state_dict()
    for k, v in whole.items():
        torch.testing.assert_close(resumed[k], v, rtol=0, atol=0, msg=k)


def test_cli_writes_a_kohya_file(tmp_path):
    frames = np.random.default_rng(0).integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
    write_clip(frames, tmp_path / "a.mp4")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"path": "a.mp4", "caption": "a red circle", "frames": FRAMES, "fps": 8,
                                    "width": SIZE, "height": SIZE}) + "\n")
    out = tmp_path / "lora.safetensors"
    argv = ["train", "lora", "--model", "tiny", "--manifest", str(manifest), "--rank", "3", "--alpha", "1.5",
            "--run", str(tmp_path / "run"), "--out", str(out), "--steps", "2", "--size", str(SIZE),
            "--frames", str(FRAMES), "--batch-size", "1", "--cache-size", "1"]
    assert main(argv) == 0
    lora = read_lora(Adapter.open(out))
    assert {layer.rank for layer in lora.layers} == {3} and {layer.scale for layer in lora.layers} == {0.5}
    assert main(argv) == 0                       # rerun: resumes at the end, rewrites its own file


@pytest.mark.parametrize("case", ["rank-0", "no-manifest", "no-model", "out-is-a-folder", "out-is-a-user-file",
                                  "out-unwritable", "out-inside-run"])
def test_bad_input_is_refused_before_any_work(case, tmp_path, capsys):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("")
    run, out = tmp_path / "run", tmp_path / "lora.safetensors"
    rank, model = "2", "tiny"
    words = []
    if case == "rank-0":
        rank, words = "0", ["rank", "0"]
    elif case == "no-manifest":
        manifest, words = tmp_path / "missing.jsonl", ["missing.jsonl", "not found"]
    elif case == "no-model":
        model, words = str(tmp_path / "no" / "model"), ["model directory not found"]
    elif case == "out-is-a-folder":
        out.mkdir()
        (out / "mine.txt").write_text("keep")
        words = ["is a folder"]
    elif case == "out-is-a-user-file":
        out.write_bytes(b"user data")
        words = ["not a LoRA written by easyanimate-rt"]
    elif case == "out-unwritable":
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        out, words = ro / "lora.safetensors", ["not writable"]
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
    elif case == "out-inside-run":
        out, words = run / "lora.safetensors", ["inside the run folder"]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    rc = main(["train", "lora", "--model", model, "--manifest", str(manifest), "--rank", rank, "--run", str(run),
               "--out", str(out), "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.strip().splitlines()) == 1 and all(w in err for w in words), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before   # nothing written
    if case == "out-is-a-user-file":
        assert out.read_bytes() == b"user data"


def test_config_rules():
    for bad in (dict(rank=0), dict(rank=1.5), dict(alpha=0.0), dict(alpha=float("nan")), dict(steps=0),
                dict(lr=-1.0), dict(save_dtype="int8")):
        with pytest.raises(ConfigError):
            LoraTrainConfig(**bad)
