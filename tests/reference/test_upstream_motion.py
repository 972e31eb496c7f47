"""Upstream motion-module settings (issue 26 item 4, "every field read or refused"): each
round-2 fixture (tests/fixtures/upstream/round2, made by running upstream's code) is either
reproduced by our loader + DiT to reference_exact, or refused with an error naming the file
and the field; the VAE's default scaling_factor is upstream's; and every argument of
upstream's recorded constructors is mapped, refused or listed as not changing the output."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from easyanimate_rt.errors import CheckpointError
from easyanimate_rt.reference import upstream
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.dit import VideoDiT
from easyanimate_rt.reference.upstream import (
    dit_config,
    dit_fields,
    vae_config,
    vae_fields,
)
from easyanimate_rt.reference.weights import load_dit
from easyanimate_rt.tolerances import check_close

ROUND2 = Path(__file__).resolve().parents[1] / "fixtures" / "upstream" / "round2"
MOTION = ROUND2 / "dit-motion"


def _meta(name: str) -> dict:
    return json.loads((MOTION / name / "meta.json").read_text())


def _saved(tmp_path: Path, name: str) -> Path:
    """The fixture as upstream's save_pretrained writes it: config.json with the whole init
    config (the yaml's transformer_additional_kwargs included), the same weights."""
    root = tmp_path / name
    shutil.copytree(MOTION / name, root)
    (root / "transformer" / "config.json").write_text(json.dumps(_meta(name)["full_init_config"]))
    return root


@torch.no_grad()
def _out(model, t: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    g = lambda k: t[prefix + k]
    return model(g("hidden_states"), g("timestep").float(), g("encoder_hidden_states"), g("encoder_attention_mask"))


ERRORS: dict[str, float] = {}
#: the fixtures put V3's motion module on a 4-channel (not InP) DiT, which no release is;
#: their config states every field, so the preset supplies nothing to the DiT, and V2's is
#: the one whose release fields (inpaint / CLIP channels) agree with the files
PRESET = "v2-512"


def _check_all(model, name: str) -> None:
    t = load_file(str(MOTION / name / "io.safetensors"))
    for case in _meta(name)["io_sets"]:
        expected = t[f"{case}.output"]
        actual = _out(model, t, f"{case}.")
        assert actual.shape == expected.shape and expected.abs().max() > 0.1
        check_close(actual, expected, "reference_exact")
        ERRORS[f"{name}/{case}"] = float((actual - expected).abs().max())


@pytest.mark.parametrize("name, fields", [
    ("odd-heads", {"temporal_num_heads": 16, "temporal_num_heads_odd": 8, "hybrid_global_attention": True}),
    ("odd-types", {"temporal_num_heads_odd": None, "hybrid_global_attention": False}),
    ("no-tpe", {"temporal_position_encoding": False, "hybrid_global_attention": True}),
    ("photo-no-time", {"remove_time_embedding_in_photo": True, "temporal_position_encoding": True}),
])
def test_supported_motion_settings_reproduce_upstream(tmp_path, name, fields):
    root = _saved(tmp_path, name)
    _, cfg = dit_config(root, PRESET)
    assert {k: getattr(cfg, k) for k in fields} == fields
    model = load_dit(root, cfg).eval()
    _check_all(model, name)
    # the setting matters: the same weights under the V3 preset's motion module differ
    plain = cfg.replace(temporal_num_heads_odd=None, hybrid_global_attention=True, temporal_position_encoding=True,
                        remove_time_embedding_in_photo=False)
    assert plain != cfg
    other = VideoDiT(plain).eval()
    other.load_state_dict(model.state_dict(), strict=False)
    t = load_file(str(MOTION / name / "io.safetensors"))
    case = "f1" if name == "photo-no-time" else "f3"  # the photo rule acts on one frame only
    assert (_out(other, t, f"{case}.") - t[f"{case}.output"]).abs().max() > 1e-3


def test_no_position_encoding_has_no_table(tmp_path):
    """temporal_position_encoding false: upstream builds no pos_encoder (motion_module.py:379-383)."""
    _, cfg = dit_config(_saved(tmp_path, "no-tpe"), PRESET)
    assert not any(k.endswith("pos_encoder.pe") for k in VideoDiT(cfg).state_dict())


@pytest.mark.parametrize("name, field", [
    ("qk-norm", "motion_module_kwargs_even.qk_norm=True"),
    ("global-attention", "motion_module_kwargs_even.global_attention=True"),
])
def test_unsupported_motion_settings_are_refused_by_file_and_field(tmp_path, name, field):
    root = _saved(tmp_path, name)
    with pytest.raises(CheckpointError, match=rf"{root / 'transformer' / 'config.json'}: {field} is not supported"):
        dit_config(root, PRESET)


def test_a_release_module_still_needs_its_release(tmp_path):
    """Only a config stating the whole motion module skips the preset match: a partial one
    that disagrees with the preset is still refused."""
    raw = dict(_meta("odd-types")["full_init_config"])
    del raw["motion_module_kwargs_odd"]
    root = tmp_path / "m"
    (root / "transformer").mkdir(parents=True)
    (root / "transformer" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"describes another release than preset 'v2-512' "
                                              r"\(temporal_num_heads: file 16, preset 8; "
                                              r"hybrid_global_attention: file True, preset False\)"):
        dit_config(root, PRESET)


@pytest.mark.parametrize("change, field", [
    ({"attention_block_types": ["Temporal_Self", "Global_Self"]}, "motion_module_kwargs_even.attention_block_types"),
    ({"attention_block_types": ["Temporal_Cross", "Temporal_Self"]}, "motion_module_kwargs_even.attention_block_types"),
    ({"temporal_position_encoding": False}, "motion_module_kwargs_odd.temporal_position_encoding=True differs"),
    ({"remove_time_embedding_in_photo": True}, "motion_module_kwargs_odd.remove_time_embedding_in_photo=False differs"),
    ({"temporal_position_encoding_max_len": 64}, "motion_module_kwargs_odd.temporal_position_encoding_max_len=4096"),
    ({"bogus": 1}, r"motion_module_kwargs_even has \['bogus'\]"),
])
def test_other_combinations_are_refused(tmp_path, change, field):
    raw = dict(_meta("odd-heads")["full_init_config"])
    raw["motion_module_kwargs_even"] = dict(raw["motion_module_kwargs_even"], **change)
    with pytest.raises(CheckpointError, match=rf"c\.json: {field}"):
        dit_fields(tmp_path / "c.json", raw)


def test_block_size_acts_only_with_grid(tmp_path):
    """upstream reshapes blocks only with grid (motion_module.py:403-410)."""
    raw = dict(_meta("odd-types")["full_init_config"])
    raw["motion_module_kwargs_even"] = dict(raw["motion_module_kwargs_even"], block_size=2)
    raw["motion_module_kwargs_odd"] = dict(raw["motion_module_kwargs_odd"], block_size=2)
    assert dit_fields(tmp_path / "c.json", raw)["temporal_block_size"] == 1
    assert dit_fields(tmp_path / "c.json", dict(raw, motion_module_type="VanillaGrid"))["temporal_block_size"] == 2


# --- VAE default scaling factor ------------------------------------------------------------

def test_vae_default_scale_is_upstreams(tmp_path):
    scale = json.loads((ROUND2 / "vae-default-scale" / "scale.json").read_text())
    assert scale["v3"]["from_pretrained_without_key"]["vae.config.scaling_factor"] == \
        upstream.UPSTREAM_VAE_SCALING_FACTOR == scale["v2"]["init_signature_default"]
    assert all(u["scale"] == "vae.config.scaling_factor" for u in scale["v3"]["pipeline_uses"])
    # V2's text-to-video pipeline decodes with a literal 0.18215 whatever the config says
    assert {"at": "easyanimate/pipeline/pipeline_easyanimate.py:581", "operation": "divide (1 / s * latents or "
            "latents / s)", "scale": "0.18215"} in scale["v2"]["pipeline_uses"]
    v3 = json.loads((ROUND2.parent / "vae-v3" / "vae" / "config.json").read_text())
    v2 = json.loads((ROUND2.parent / "vae-v2" / "vae" / "config.json").read_text())
    for name, raw, preset, want in (("v3", v3, "v3-512", 0.1825), ("v2", v2, "v2-512", 0.18215)):
        raw = {k: v for k, v in raw.items() if k != "scaling_factor"}
        root = tmp_path / name
        (root / "vae").mkdir(parents=True)
        (root / "transformer").mkdir()
        (root / "transformer" / "config.json").write_text(json.dumps({"in_channels": 12 if name == "v3" else 4}))
        (root / "vae" / "config.json").write_text(json.dumps(raw))
        assert vae_config(root, preset)[1].scaling_factor == want
        assert vae_config(root)[1].scaling_factor == want  # release inferred from the VAE
        (root / "vae" / "config.json").write_text(json.dumps(dict(raw, scaling_factor=0.13)))
        assert vae_config(root, preset)[1].scaling_factor == 0.13


# --- every upstream argument: mapped, refused or without effect ----------------------------

#: read into our config: argument -> the field it gives
MAPPED = {
    "num_attention_heads": "num_attention_heads (VAE: refused unless 1)", "attention_head_dim": "attention_head_dim",
    "in_channels": "in_channels / inpaint_channels / clip_channels", "out_channels": "learn_sigma",
    "num_layers": "num_layers", "sample_size": "sample_size", "patch_size": "patch_size", "norm_eps": "norm_eps",
    "caption_channels": "caption_channels", "basic_block_type": "hybrid_global_attention (which kwargs apply)",
    "enable_uvit": "long_skips", "motion_module_type": "temporal_block_size (grid)",
    "motion_module_kwargs": "the motion-module fields", "motion_module_kwargs_odd": "the motion-module fields",
    "motion_module_kwargs_even": "the motion-module fields",
    "ch": "block_out_channels", "ch_mult": "block_out_channels", "down_block_types": "down_block_types",
    "up_block_types": "up_block_types", "mid_block_use_attention": "mid_block_attention",
    "layers_per_block": "layers_per_block / mid_block_layers", "latent_channels": "latent_channels",
    "norm_num_groups": "norm_num_groups (VAE)", "scaling_factor": "scaling_factor",
    "slice_compression_vae": "slicing / padding_mode", "mini_batch_encoder": "slice_frames",
    "mini_batch_decoder": "checked against slice_frames",
    **{k: v for k, v in upstream._MOTION_MAPPED.items()},
}
#: refused at any other value: argument -> a value that must raise
REFUSED_DIT = {"norm_type": "layer_norm", "patch_3d": True, "fake_3d": True, "casual_3d": True, "qk_norm": True,
               "after_norm": True, "time_position_encoding_before_transformer": True, "activation_fn": "geglu",
               "attention_bias": False, "norm_elementwise_affine": True, "num_vector_embeds": 16,
               "only_cross_attention": True, "double_self_attention": True, "upcast_attention": True,
               "attention_type": "gated", "cross_attention_dim": 7}
REFUSED_VAE = {"use_gc_blocks": [1], "mid_block_type": "Other", "mid_block_attention_type": "spatial",
               "mid_block_num_attention_heads": 2, "act_fn": "relu"}
REFUSED_MOTION = {"num_transformer_block": 2, "cross_frame_attention_mode": "x", "temporal_attention_dim_div": 2,
                  "qk_norm": True, "global_attention": True}
#: not changing a loaded checkpoint's output: argument -> why
NO_EFFECT = {
    "dropout": "identity at inference (eval)",
    "norm_num_groups": "Transformer3DModel: only the continuous (un-patched) input path reads it; the motion "
                       "modules' GroupNorm is upstream's fixed 32 (= our motion_norm_groups)",
    "num_embeds_ada_norm": "read only by the ada_norm / ada_norm_zero norms, which norm_type refuses",
    "use_linear_projection": "only the continuous (un-patched) input path reads it",
    "time_patch_size": "only the 3-D patch embeddings read it (patch_3d / casual_3d refused)",
    "casual_3d_upsampler_index": "only casual_3d reads it (refused)",
    "use_tiling": "VAE: warned, not refused (tiles only above 256 px; this reference decodes whole slices)",
    **upstream._MOTION_NO_EFFECT,
}
#: arguments of upstream's inner classes that no config reaches: upstream's own code passes
#: them (from the arguments above, or constants our modules hard-code alike)
INTERNAL = {
    "dim", "query_dim", "d_model", "heads", "dim_head", "max_len", "attention_mode", "in_channels", "args", "kwargs",
    "num_layers", "attention_block_types", "cross_attention_dim", "activation_fn", "attention_bias",
    "upcast_attention", "upcast_softmax", "added_kv_proj_dim", "norm_num_groups", "final_dropout",
    "positional_embeddings", "num_positional_embeddings", "kvcompression", "norm_type", "norm_elementwise_affine",
    "norm_eps", "only_cross_attention", "double_self_attention", "num_embeds_ada_norm", "attention_type",
    "motion_module_type", "motion_module_kwargs", "qk_norm", "after_norm", "dropout", "bias",
}
TOP = ("Transformer3DModel.__init__", "AutoencoderKLMagvit.__init__", "motion_module.VanillaTemporalModule.__init__")


def _signatures():
    s = json.loads((ROUND2 / "signatures.json").read_text())
    return [(v, cls, p["name"], p["default"]) for v in ("v2", "v3") for cls, sig in s[v]["signatures"].items()
            for p in sig["params"]]


def test_every_upstream_argument_is_mapped_refused_or_without_effect():
    unclassified = []
    for version, cls, name, _ in _signatures():
        if cls == "Transformer3DModel.__init__":
            ok = name in MAPPED or name in REFUSED_DIT or name in NO_EFFECT
        elif cls == "AutoencoderKLMagvit.__init__":
            ok = name in MAPPED or name in REFUSED_VAE or name in NO_EFFECT or name in ("in_channels", "out_channels")
        elif cls == "motion_module.VanillaTemporalModule.__init__":
            ok = name == "in_channels" or name in upstream._MOTION_DEFAULTS
        else:  # inner classes: their arguments are the above, passed on, or upstream's constants
            ok = name in INTERNAL or name in upstream._MOTION_DEFAULTS or name in MAPPED or name in NO_EFFECT
        if not ok:
            unclassified.append(f"{version} {cls}({name})")
    assert not unclassified
    # every VanillaTemporalModule argument with upstream's default, as the loader assumes
    for version, cls, name, default in _signatures():
        if cls == "motion_module.VanillaTemporalModule.__init__" and name != "in_channels":
            assert upstream._MOTION_DEFAULTS[name] == default, (version, name)


def _dit_raw():
    return dict(_meta("odd-heads")["full_init_config"])


@pytest.mark.parametrize("name, value", sorted(REFUSED_DIT.items()))
def test_refused_transformer_arguments_name_file_and_field(tmp_path, name, value):
    with pytest.raises(CheckpointError, match=rf"c\.json: {name}={value!r} is not supported"):
        dit_fields(tmp_path / "c.json", dict(_dit_raw(), **{name: value}))


@pytest.mark.parametrize("name, value", sorted(REFUSED_VAE.items()))
def test_refused_vae_arguments_name_file_and_field(tmp_path, name, value):
    with pytest.raises(CheckpointError, match=re.escape(f"c.json: {name}={value!r} is not supported")):
        vae_fields(tmp_path / "c.json", {name: value})


@pytest.mark.parametrize("name, value", sorted(REFUSED_MOTION.items()))
@pytest.mark.parametrize("where", ["motion_module_kwargs_even", "motion_module_kwargs_odd"])
def test_refused_motion_arguments_name_file_and_field(tmp_path, name, value, where):
    raw = _dit_raw()
    raw[where] = dict(raw[where], **{name: value})
    with pytest.raises(CheckpointError, match=rf"c\.json: {where}\.{name}={value!r} is not supported"):
        dit_fields(tmp_path / "c.json", raw)


def test_arguments_without_effect_load_the_same_model(tmp_path, caplog):
    base = dit_fields(tmp_path / "c.json", _dit_raw())
    for name, value in (("dropout", 0.1), ("norm_num_groups", 8), ("num_embeds_ada_norm", 7),
                        ("use_linear_projection", True), ("time_patch_size", 4), ("casual_3d_upsampler_index", [1])):
        assert dit_fields(tmp_path / "c.json", dict(_dit_raw(), **{name: value})) == base, name
    for name, value in (("zero_initialize", False), ("global_num_attention_heads", 4)):
        raw = _dit_raw()
        raw["motion_module_kwargs_odd"] = dict(raw["motion_module_kwargs_odd"], **{name: value})
        assert dit_fields(tmp_path / "c.json", raw) == base, name
    with caplog.at_level(logging.WARNING):
        vae_fields(tmp_path / "v.json", {"use_tiling": True})
    assert "use_tiling" in caplog.text


def test_per_parity_heads_are_validated():
    from easyanimate_rt.errors import ConfigError
    cfg = from_preset("v3-512").dit
    with pytest.raises(ConfigError, match="temporal_num_heads_odd must divide hidden_size"):
        cfg.replace(temporal_num_heads_odd=7)
    with pytest.raises(ConfigError, match="temporal_num_heads_odd must be a positive integer"):
        cfg.replace(temporal_num_heads_odd=0)
    assert cfg.replace(temporal_num_heads_odd=8).motion_heads(1) == 8 and cfg.motion_heads(1) == 16


def test_report_errors():
    """Max |ours - upstream| per fixture case (run with -s to print)."""
    print({k: f"{v:.2e}" for k, v in sorted(ERRORS.items())})
