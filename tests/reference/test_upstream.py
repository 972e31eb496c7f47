"""Reading upstream model directories (reference/upstream.py): every stated field is read,
the version is inferred only where the files say it, a preset that disagrees with the
files is refused, and weights the model does not have are an error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from easyanimate_rt.errors import CheckpointError, ConfigError
from easyanimate_rt.reference.config import PRESETS, VAEConfig, from_preset
from easyanimate_rt.reference.upstream import dit_fields, infer_preset, upstream_config, vae_fields
from easyanimate_rt.reference.vae import SliceVAE
from easyanimate_rt.reference.weights import load_model, random_model

V2_VAE_JSON = {"_class_name": "AutoencoderKLMagvit", "ch": 128, "ch_mult": [1, 2, 4, 4], "layers_per_block": 2,
               "down_block_types": ["SpatialDownBlock3D", "SpatialTemporalDownBlock3D",
                                    "SpatialTemporalDownBlock3D", "DownBlock3D"],
               "up_block_types": ["SpatialUpBlock3D", "SpatialTemporalUpBlock3D", "SpatialTemporalUpBlock3D",
                                  "UpBlock3D"],
               "mid_block_use_attention": True, "latent_channels": 4, "norm_num_groups": 32,
               "scaling_factor": 0.18215, "slice_compression_vae": False, "mini_batch_encoder": 9,
               "mini_batch_decoder": 3}
V3_VAE_JSON = dict(V2_VAE_JSON, slice_compression_vae=True, mini_batch_encoder=8, mini_batch_decoder=2)
#: what a kwargs dict must say for this DiT (upstream's VanillaTemporalModule defaults to
#: num_transformer_block 2 and no position encoding where a dict leaves them out)
MM = {"num_transformer_block": 1, "temporal_position_encoding": True}
DIT_JSON = {"_class_name": "Transformer3DModel", "num_layers": 28, "num_attention_heads": 16,
            "attention_head_dim": 72, "in_channels": 4, "out_channels": 8, "patch_size": 2, "sample_size": 64,
            "caption_channels": 4096, "norm_type": "ada_norm_single", "activation_fn": "gelu-approximate",
            "attention_bias": True, "norm_elementwise_affine": False, "norm_eps": 1e-6}


def _dir(root, dit=None, vae=None):
    (root / "transformer").mkdir(parents=True)
    (root / "vae").mkdir()
    (root / "transformer" / "config.json").write_text(json.dumps(dit if dit is not None else DIT_JSON))
    if vae is not None:
        (root / "vae" / "config.json").write_text(json.dumps(vae))
    return root


@pytest.mark.parametrize("dit, vae, expected", [
    (DIT_JSON, V2_VAE_JSON, "v2-512"),
    (dict(DIT_JSON, sample_size=96), V2_VAE_JSON, "v2-768"),
    (dict(DIT_JSON, in_channels=12), V3_VAE_JSON, "v3-512"),
    (dict(DIT_JSON, in_channels=12, sample_size=96), V3_VAE_JSON, "v3-768"),
    (dict(DIT_JSON, in_channels=12, sample_size=120), V3_VAE_JSON, "v3-960"),
])
def test_release_directories_are_identified_from_their_files(tmp_path, dit, vae, expected):
    cfg = upstream_config(_dir(tmp_path / "m", dit, vae))
    assert cfg.name == f"{expected}@m"
    preset = PRESETS[expected]
    assert cfg.dit == preset.dit and cfg.vae == preset.vae


@pytest.mark.parametrize("dit, vae, why", [
    (DIT_JSON, None, "neither vae/config.json"),
    (dict(DIT_JSON, in_channels=12), V2_VAE_JSON, "matches no release"),
    (DIT_JSON, V3_VAE_JSON, "matches no release"),
])
def test_ambiguous_directories_ask_for_a_preset_and_say_why(tmp_path, dit, vae, why):
    with pytest.raises(CheckpointError, match=f"{why}.*pass --preset"):
        upstream_config(_dir(tmp_path / "m", dit, vae))


def test_motion_module_keys_in_a_config_decide_the_version(tmp_path):
    dit = dict(DIT_JSON, basic_block_type="global_motionmodule", motion_module_type="Vanilla",
               motion_module_kwargs_even={**MM, "num_attention_heads": 16, "block_size": 1}, in_channels=12)
    fields = dit_fields(tmp_path / "config.json", dit)
    assert fields["hybrid_global_attention"] and fields["temporal_num_heads"] == 16
    assert fields["temporal_block_size"] == 1 and fields["inpaint_channels"] == 8 and fields["clip_channels"] == 768
    assert infer_preset(tmp_path, fields, {}) == "v3-512"
    grid = dit_fields(tmp_path / "c.json", {"motion_module_type": "VanillaGrid"})
    assert grid == {"temporal_block_size": 2, "skip_wiring": "upstream"}


def test_a_preset_of_another_release_is_refused(tmp_path):
    v3 = _dir(tmp_path / "v3", dict(DIT_JSON, in_channels=12), V3_VAE_JSON)
    with pytest.raises(CheckpointError, match=r"describes another release than preset 'v2-512' "
                                              r"\(inpaint_channels: file 8, preset 0; clip_channels: file 768"):
        upstream_config(v3, preset="v2-512")  # a V3 directory read as V2
    v2 = _dir(tmp_path / "v2", DIT_JSON, V2_VAE_JSON)
    with pytest.raises(CheckpointError, match=r"transformer/config\.json describes another release than preset "
                                              r"'v3-512' \(inpaint_channels: file 0, preset 8"):
        upstream_config(v2, preset="v3-512")
    vae_only = _dir(tmp_path / "v2vae", dict(DIT_JSON, in_channels=12), V2_VAE_JSON)
    with pytest.raises(CheckpointError, match=r"vae/config\.json describes another release .*slicing: file 'chunk', "
                                              r"preset 'slice'"):
        upstream_config(vae_only, preset="v3-512")


def test_sizes_come_from_the_files(tmp_path):
    """The preset gives the motion module; every size the files state is the model's."""
    small = dict(DIT_JSON, num_attention_heads=2, attention_head_dim=16, sample_size=8)
    vae = dict(V2_VAE_JSON, ch=8, ch_mult=[1, 2, 2, 2], norm_num_groups=4, layers_per_block=1)
    root = _dir(tmp_path / "m", small, vae)
    cfg = upstream_config(root)
    assert cfg.name == "v2-512@m" and cfg.dit.hidden_size == 32 and cfg.dit.sample_size == 8
    assert cfg.dit.temporal_num_heads == 8 and cfg.dit.temporal_block_size == 1  # from the V2 preset
    assert cfg.vae.block_out_channels == (8, 16, 16, 16) and cfg.vae.mid_block_layers == 1
    assert upstream_config(_dir(tmp_path / "b", dict(DIT_JSON, sample_size=96), V2_VAE_JSON), "v2-512").dit.sample_size == 96


@pytest.mark.parametrize("field, value", [
    ("in_channels", 9), ("out_channels", 6), ("norm_type", "layer_norm"), ("qk_norm", True),
    ("patch_3d", True), ("motion_module_type", "KVCompression"),
])
def test_unsupported_transformer_settings_are_named(tmp_path, field, value):
    with pytest.raises(CheckpointError, match=f"{field}={value!r} is not supported"):
        upstream_config(_dir(tmp_path / "m", dict(DIT_JSON, **{field: value}), V2_VAE_JSON))


@pytest.mark.parametrize("field, value, match", [
    ("down_block_types", ["SpatialDownBlock3D", "SpatialTemporalDownBlockD2S3D", "DownBlock3D", "DownBlock3D"],
     "SpatialTemporalDownBlockD2S3D"),
    ("mid_block_attention_type", "spatial", "mid_block_attention_type='spatial'"),
    ("num_attention_heads", 4, "num_attention_heads=4"),
])
def test_unsupported_vae_settings_are_named(tmp_path, field, value, match):
    with pytest.raises(CheckpointError, match=match):
        upstream_config(_dir(tmp_path / "m", DIT_JSON, dict(V2_VAE_JSON, **{field: value})))


def test_vae_config_fields_are_all_read():
    raw = dict(V3_VAE_JSON, ch=32, ch_mult=[1, 1, 2, 2], layers_per_block=3, norm_num_groups=8,
               scaling_factor=0.13, mid_block_use_attention=False)
    f = vae_fields(None, raw)
    assert f["block_out_channels"] == (32, 32, 64, 64) and f["layers_per_block"] == 3
    assert f["mid_block_layers"] == 3 and f["norm_num_groups"] == 8 and f["scaling_factor"] == 0.13
    assert f["mid_block_attention"] is False and f["slicing"] == "slice" and f["padding_mode"] == "slice"
    assert f["slice_frames"] == 8 and f["down_block_types"] == ("spatial", "spacetime", "spacetime", "none")
    v2 = vae_fields(None, V2_VAE_JSON)
    assert (v2["slicing"], v2["padding_mode"], v2["slice_frames"]) == ("chunk", "causal", 9)


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_mid_block_follows_upstream_for_any_layers_per_block(layers):
    """Upstream: layers_per_block res-blocks, one attention between each pair."""
    cfg = VAEConfig(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=layers,
                    mid_block_layers=layers)
    vae = SliceVAE(cfg)
    for part in (vae.encoder, vae.decoder):
        assert len(part.mid_block.convs) == layers and len(part.mid_block.attentions) == layers - 1
    keys = [k for k in vae.state_dict() if ".mid_block." in k]
    # per res-block 8 tensors, per attention 10; encoder and decoder
    assert len(keys) == 2 * (8 * layers + 10 * (layers - 1))
    with torch.no_grad():
        out = vae.decode(vae.encode(torch.rand(1, 3, 9, 16, 16) * 2 - 1))
    assert out.shape == (1, 3, 9, 16, 16) and torch.isfinite(out).all()


def _write(model, root):
    """An upstream-layout directory of one of our own models (tiny), for the weight rules."""
    (root / "transformer").mkdir(parents=True)
    (root / "vae").mkdir()
    d = model.config.dit
    (root / "transformer" / "config.json").write_text(json.dumps({
        "num_layers": d.num_layers, "num_attention_heads": d.num_attention_heads,
        "attention_head_dim": d.attention_head_dim, "in_channels": 4, "out_channels": 8,
        "sample_size": d.sample_size, "patch_size": 2, "caption_channels": d.caption_channels}))
    (root / "vae" / "config.json").write_text(json.dumps({"layers_per_block": 1}))
    save_file({k: v.clone() for k, v in model.dit.state_dict().items()},
              str(root / "transformer" / "diffusion_pytorch_model.safetensors"))
    model.text_encoder.save_pretrained(root / "text_encoder", root / "tokenizer")
    return root


def test_stray_weights_are_an_error_and_training_only_ones_are_ignored(tmp_path):
    tiny = from_preset("tiny")
    model = random_model(tiny.replace(dit=tiny.dit.replace(skip_wiring="upstream")))  # as upstream saves it: 13 skips
    vae_state = {k: v.clone() for k, v in model.vae.state_dict().items()}
    # tiny's VAE has layers_per_block 1 but a 2-res-block mid block; a file saying
    # layers_per_block 1 means upstream's rule (one res-block, no attention), so the
    # extra mid-block weights are not the model's: an error listing them, not a log line.
    root = _write(model, tmp_path / "a")
    save_file(vae_state, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"vae: checkpoint has 36 weights the model does not .*mid_block"):
        load_model(root, preset="tiny")
    (root / "vae" / "config.json").write_text("{}")
    ok = dict(vae_state, **{"loss.discriminator.main.0.weight": torch.zeros(3), "loss.logvar": torch.zeros(())})
    save_file(ok, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    assert load_model(root, preset="tiny").config.vae == model.config.vae
    stray = dict(vae_state, **{"encoder.mid_block.attentions.1.to_q.weight": torch.zeros(16, 16)})
    save_file(stray, str(root / "vae" / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 weights the model does not .*attentions\.1\.to_q\.weight"):
        load_model(root, preset="tiny")


def test_a_broken_config_file_names_the_file(tmp_path):
    root = _dir(tmp_path / "m", DIT_JSON, V2_VAE_JSON)
    (root / "vae" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"vae/config\.json is not valid JSON"):
        upstream_config(root)


def test_upstream_checkpoints_of_other_depths_keep_upstreams_skip_wiring(tmp_path):
    """Upstream always builds 13 long_connect_fc and wires blocks 0-12 into blocks 15
    onward; an upstream directory of depth 24 loads with that wiring (13 weights, blocks
    15..23 taking skips of blocks 12..4), and enable_uvit false is honoured, not matched."""
    from easyanimate_rt.reference.config import DiTConfig

    d24 = _dir(tmp_path / "d24v2", dict(DIT_JSON, num_layers=24), V2_VAE_JSON)
    cfg = upstream_config(d24).dit
    assert cfg.skip_wiring == "upstream" and cfg.num_skips == 13 and cfg.skip_plan == (13, 15, 9)
    off = _dir(tmp_path / "off", dict(DIT_JSON, num_layers=24, enable_uvit=False), V2_VAE_JSON)
    assert upstream_config(off, preset="v2-512").dit.num_skips == 0  # was refused against the preset
    # ours keep theirs; upstream's wiring cannot go past 28 blocks (it would pop 14 skips)
    assert DiTConfig(num_layers=24).skip_plan == (11, 13, 11)
    with pytest.raises(ConfigError, match="at most 28 with upstream's skip wiring"):
        DiTConfig(num_layers=30, skip_wiring="upstream")


def test_a_clash_names_the_preset_only_when_one_was_passed(tmp_path):
    grid_v3 = dict(DIT_JSON, in_channels=12, basic_block_type="global_motionmodule", motion_module_type="VanillaGrid",
                   motion_module_kwargs_even={**MM, "num_attention_heads": 16, "block_size": 2})
    odd = _dir(tmp_path / "odd", grid_v3, V3_VAE_JSON)
    with pytest.raises(CheckpointError, match=r"describes another release than preset 'v3-512' "
                                              r"\(temporal_block_size: file 2, preset 1\)"):
        upstream_config(odd, preset="v3-512")
    with pytest.raises(CheckpointError, match=r"matches no EasyAnimate release: its files point to 'v3-512', but "
                                              r"temporal_block_size: file 2, release 1; pass --preset") as err:
        upstream_config(odd)  # no preset given: the message does not say one was
    assert "than preset" not in str(err.value)


@pytest.mark.parametrize("change, rule", [  # (tests/reference/test_upstream_motion.py: what is honoured)
    ({"motion_module_kwargs_even": {**MM, "num_attention_heads": 16, "qk_norm": True}},
     r"motion_module_kwargs_even\.qk_norm=True is not supported"),
    ({"motion_module_kwargs": {"remove_time_embedding_in_photo": True}},
     r"motion_module_kwargs\.num_transformer_block=2 \(upstream's default where the dict leaves it out\)"),
    ({"motion_module_type": "VanillaGrid", "motion_module_kwargs_even": {**MM, "block_size": 2},
      "motion_module_kwargs_odd": {**MM, "block_size": 1}},
     r"motion_module_kwargs_odd\.block_size=1 differs from the even blocks' 2"),
])
def test_motion_module_settings_that_change_the_output_are_refused(tmp_path, change, rule):
    with pytest.raises(CheckpointError, match=rule):
        dit_fields(tmp_path / "config.json", dict(DIT_JSON, **change))
    same = {"motion_module_kwargs_even": {**MM, "num_attention_heads": 16, "temporal_position_encoding": True},
            "motion_module_kwargs_odd": {**MM, "num_attention_heads": 16}}
    assert dit_fields(tmp_path / "config.json", dict(DIT_JSON, **same))["temporal_num_heads"] == 16


def test_mini_batch_decoder_is_read_or_refused(tmp_path):
    assert vae_fields(tmp_path / "c.json", V3_VAE_JSON)["slice_frames"] == 8  # 8 frames, 2 latents: as ours
    with pytest.raises(CheckpointError, match=r"mini_batch_decoder=4 is not supported: slices of 8 frames decode 2"):
        vae_fields(tmp_path / "c.json", dict(V3_VAE_JSON, mini_batch_decoder=4))
