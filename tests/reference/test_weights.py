import json

import pytest
import torch
from safetensors.torch import save_file

from easyanimate_rt.errors import CheckpointError, ConfigError
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.weights import load_model, random_model, save_model
from easyanimate_rt.tolerances import check_close

TINY = from_preset("tiny")


@pytest.fixture(scope="module")
def tiny_model():
    model = random_model(TINY, seed=3)
    with torch.no_grad():  # make skips and motion modules non-zero so they must load
        for name, p in model.dit.named_parameters():
            if "attn_temporal" in name or "long_connect" in name or name.startswith("proj_out"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def upstream_tiny():
    """tiny as upstream builds it: upstream's skip wiring (13 long_connect_fc whatever the
    depth), what an upstream directory holds."""
    model = random_model(TINY.replace(dit=TINY.dit.replace(skip_wiring="upstream")), seed=3)
    with torch.no_grad():
        for name, p in model.dit.named_parameters():
            if "attn_temporal" in name or "long_connect" in name or name.startswith("proj_out"):
                p.normal_(0, 0.1)
    return model


@torch.no_grad()
def _outputs(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 2, 8, 8, generator=g)
    emb, mask = model.text_encoder.encode(["a red circle moving left"])
    eps = model.dit(x, torch.tensor([500.0]), emb, mask)
    video = model.vae.decode(x)
    return emb, eps, video


def test_own_directory_round_trip(tiny_model, tmp_path):
    out = save_model(tiny_model, tmp_path / "m")
    assert not any(p.name.endswith(".tmp") or p.name.endswith(".partial") for p in tmp_path.rglob("*"))
    loaded = load_model(out)
    assert loaded.config == tiny_model.config
    for a, b in zip(_outputs(loaded), _outputs(tiny_model)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _write_upstream(model, root, drop=None):
    """An upstream-layout directory: diffusers-style config.json, upstream key names, plus
    the training-loss tensors upstream VAE files carry."""
    (root / "transformer").mkdir(parents=True)
    (root / "vae").mkdir()
    d = model.config.dit
    (root / "transformer" / "config.json").write_text(json.dumps({
        "_class_name": "Transformer3DModel", "num_layers": d.num_layers,
        "num_attention_heads": d.num_attention_heads, "attention_head_dim": d.attention_head_dim,
        "in_channels": 4, "out_channels": 8, "sample_size": d.sample_size, "patch_size": 2,
        "caption_channels": d.caption_channels}))
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLMagvit"}))
    dit_state = {k: v.clone() for k, v in model.dit.state_dict().items()}
    assert any(k.endswith("pos_encoder.pe") for k in dit_state)
    if drop:
        dit_state.pop(drop)
    save_file(dit_state, str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    vae_state = {k: v.clone() for k, v in model.vae.state_dict().items()}
    vae_state["loss.discriminator.main.0.weight"] = torch.zeros(3)
    save_file(vae_state, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    model.text_encoder.save_pretrained(root / "text_encoder", root / "tokenizer")


def test_upstream_directory_round_trip(upstream_tiny, tmp_path):
    _write_upstream(upstream_tiny, tmp_path / "up")
    loaded = load_model(tmp_path / "up", preset="tiny")
    assert loaded.config.dit == upstream_tiny.config.dit
    for a, b in zip(_outputs(loaded), _outputs(upstream_tiny)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_upstream_missing_key_is_named(upstream_tiny, tmp_path):
    key = "transformer_blocks.1.attn_temporal.temporal_transformer.proj_in.weight"
    _write_upstream(upstream_tiny, tmp_path / "up", drop=key)
    with pytest.raises(CheckpointError, match=key.replace(".", r"\.")):
        load_model(tmp_path / "up", preset="tiny")


def test_upstream_scheduler_config_is_read(upstream_tiny, tmp_path):
    """scheduler/config.json: its prediction type reaches the DiT config; a schedule the
    samplers do not implement is refused, naming the field."""
    root = tmp_path / "up"
    _write_upstream(upstream_tiny, root)
    (root / "scheduler").mkdir()
    sched = {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
             "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "v_prediction"}
    (root / "scheduler" / "config.json").write_text(json.dumps(sched))
    assert load_model(root, preset="tiny").config.dit.prediction_type == "v_prediction"
    (root / "scheduler" / "config.json").write_text(json.dumps({**sched, "beta_schedule": "scaled_linear"}))
    with pytest.raises(CheckpointError, match="beta_schedule='scaled_linear' is not supported"):
        load_model(root, preset="tiny")


def test_prediction_type_survives_a_round_trip(tiny_model, tmp_path):
    import dataclasses

    v = dataclasses.replace(tiny_model.config, dit=dataclasses.replace(tiny_model.config.dit,
                                                                       prediction_type="v_prediction"))
    model = random_model(v, seed=0)
    assert load_model(save_model(model, tmp_path / "m")).config.dit.prediction_type == "v_prediction"
    with pytest.raises(ConfigError, match="prediction_type"):
        dataclasses.replace(v.dit, prediction_type="sample")


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path / "empty")


def test_text_encoder_pads_and_masks(tiny_model):
    encoder, n = tiny_model.text_encoder, TINY.text_encoder.max_length
    tok = encoder.tokenizer
    emb, mask = encoder.encode(["a red circle", ""])
    assert emb.shape == (2, n, TINY.text_encoder.d_model)
    # Token ids then eos, padded to max_length; the mask marks exactly those.
    ids, mask2 = encoder.tokenize(["a red circle", ""])
    words = tok("a red circle").input_ids
    assert words[-1] == tok.eos_token_id and len(words) > 2
    assert ids.tolist() == [words + [tok.pad_token_id] * (n - len(words)),
                            [tok.eos_token_id] + [tok.pad_token_id] * (n - 1)]  # eos only when empty
    assert mask.tolist() == mask2.tolist() == [[1] * len(words) + [0] * (n - len(words)), [1] + [0] * (n - 1)]
    long = " ".join(["red circle"] * 50)
    ids, mask = encoder.tokenize([long])
    # Truncated to max_length, still ending in eos.
    assert mask.tolist() == [[1] * n]
    assert ids[0].tolist() == tok(long).input_ids[:n - 1] + [tok.eos_token_id]
    check_close(emb[0], encoder.encode(["a red circle"])[0][0], "reference_exact")


def test_random_model_leaves_nothing_in_tmp_and_no_global_rng_change(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where mkdtemp/TemporaryDirectory go
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = random_model(TINY, seed=5)
    assert torch.equal(torch.get_rng_state(), before)
    assert list(tmp_path.iterdir()) == []  # the tokenizer's training folder is gone
    b = random_model(TINY, seed=5)
    c = random_model(TINY, seed=6)
    for (k, va), vb, vc in zip(a.dit.state_dict().items(), b.dit.state_dict().values(), c.dit.state_dict().values()):
        assert torch.equal(va, vb), k  # a function of the seed alone
    assert any(not torch.equal(va, vc) for va, vc in zip(a.vae.state_dict().values(), c.vae.state_dict().values()))
    out = save_model(a, tmp_path / "m")  # the in-memory tokenizer still saves
    assert (out / "tokenizer").is_dir() and any((out / "tokenizer").iterdir())
    assert load_model(out).text_encoder.tokenize(["a red circle"])[0].tolist() == \
        a.text_encoder.tokenize(["a red circle"])[0].tolist()


def test_a_missing_model_path_is_not_taken_for_a_preset(tmp_path):
    from easyanimate_rt.reference.weights import load_model_or_preset

    with pytest.raises(CheckpointError, match="model directory not found: .*not a preset name"):
        load_model_or_preset(tmp_path / "no-such-model")
    with pytest.raises(ConfigError, match="unknown preset 'no-such-preset'"):
        load_model_or_preset("no-such-preset")
