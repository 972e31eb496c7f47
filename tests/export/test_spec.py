"""ExportSpec: ranges, shapes, profiles, decoder variants, random inputs, JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest

from easyanimate_rt.errors import ConfigError, ExportError, ShapeError
from easyanimate_rt.export.spec import (
    DECODER_VARIANTS,
    NETWORKS,
    DimSpec,
    ExportSpec,
    decoder_variant,
    decoder_variants,
    dit_spec,
    eval_dim,
    make_specs,
    vae_decoder_spec,
    vae_encoder_spec,
)
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.vae import SliceVAE

TINY = from_preset("tiny")


def test_make_specs_covers_every_graph():
    keys = [s.key for s in make_specs(TINY)]
    assert keys == ["text_encoder", "dit", "vae_encoder/image", "vae_encoder/slice"] + \
        [f"vae_decoder/{v}" for v in DECODER_VARIANTS]
    assert [s.key for s in make_specs(TINY, networks=["dit"])] == ["dit"]
    with pytest.raises(ConfigError, match="unknown network"):
        make_specs(TINY, networks=["unet"])
    assert set(NETWORKS) == {s.network for s in make_specs(TINY)}


def test_dit_spec_contract():
    spec = dit_spec(from_preset("v2-512"), "fp16")
    assert spec.input_names == ["latents", "timestep", "text", "text_mask"]
    assert spec.output_names == ["noise_pred"]
    assert spec.inputs[2].shape == ("batch", 120, 4096)
    assert spec.dim("height").multiple == 2  # patch 2; the release motion module has no Grid Reshape
    # 512 x 512 x 144 frames: V2's VAE gives 48 latent frames (9-frame chunks) of 64 x 64.
    assert spec.opt_dims() == {"batch": 2, "frames": 48, "height": 64, "width": 64}
    assert spec.dim("batch").max == 8  # 4 prompts x (negative + positive)
    assert spec.precision.compute_dtype == "float16"
    shapes = spec.profile_shapes()
    assert shapes["latents"] == ((1, 4, 1, 4, 4), (2, 4, 48, 64, 64), (8, 4, 48, 64, 64))
    assert spec.output_shapes({"batch": 1, "frames": 3, "height": 8, "width": 12})["noise_pred"] == (1, 8, 3, 8, 12)
    grid = from_preset("shapes")  # Grid Reshape: latent sizes in steps of patch x block
    assert dit_spec(grid).dim("height").multiple == 4 == grid.dit.latent_multiple


def test_inp_dit_spec_has_the_extra_inputs():
    """V3 InP (512 x 512 x 144): 36 latent frames; mask + masked-video latents and CLIP."""
    spec = dit_spec(from_preset("v3-512"))
    assert spec.input_names == ["latents", "timestep", "text", "text_mask", "inpaint_latents", "clip_embeds",
                                "clip_mask"]
    assert spec.opt_dims() == {"batch": 2, "frames": 36, "height": 64, "width": 64}
    shapes = spec.input_shapes(spec.opt_dims())
    assert shapes["inpaint_latents"] == (2, 8, 36, 64, 64)
    assert shapes["clip_embeds"] == (2, 768) and shapes["clip_mask"] == (2, 8)
    assert spec.output_shapes(spec.opt_dims())["noise_pred"] == (2, 8, 36, 64, 64)


def test_check_dims_names_the_rule():
    spec = dit_spec(TINY)
    with pytest.raises(ShapeError, match=r"height must be in \[4, 8\] and a multiple of 2, got 5"):
        spec.check_dims({"batch": 1, "frames": 1, "height": 5, "width": 4})
    with pytest.raises(ShapeError, match=r"batch must be in \[1, 8\]"):
        spec.check_dims({"batch": 9, "frames": 1, "height": 4, "width": 4})
    with pytest.raises(ShapeError, match="no value for dimension"):
        spec.check_dims({"batch": 1})


def test_dims_of_inverts_input_shapes():
    spec = vae_encoder_spec(TINY, "slice")
    dims = {"batch": 1, "height": 32, "width": 48}
    assert spec.dims_of(spec.input_shapes(dims)) == dims
    assert spec.output_shapes(dims)["latents"] == (1, 4, 2, 4, 6)
    with pytest.raises(ShapeError, match="must have shape"):
        spec.dims_of({"frames": (1, 3, 1, 32, 32)})  # the slice graph takes 8 frames
    dec = vae_decoder_spec(TINY, "interior")
    assert dec.output_shapes({"batch": 2, "height": 3, "width": 5})["frames"] == (2, 3, 8, 24, 40)
    assert dec.static == {"context_frames": 6, "start": 2, "length": 2}


def expected_variants(latent_frames: int, n: int) -> list[str]:
    """The decoder graphs a plan of ``latent_frames`` latents uses, written out: the lone
    first latent of an odd count, then one ``single`` slice, or ``first``, ``interior``
    ..., ``last``."""
    slices = latent_frames // n
    lone = ["lone"] * (latent_frames % n == 1)
    if slices <= 1:
        return lone + ["single"] * slices
    return lone + ["first"] + ["interior"] * (slices - 2) + ["last"]


# 8-frame slices (2 latents, the presets) and 16-frame slices (4 latents), where 2 and 3
# latents past a multiple of 4 are no valid length: the plan must refuse those.
@pytest.mark.parametrize("slice_frames", [8, 16])
@pytest.mark.parametrize("latent_frames", range(1, 14))
def test_every_slice_of_every_length_has_a_decoder_variant(slice_frames, latent_frames):
    config = TINY.replace(vae=TINY.vae.replace(slice_frames=slice_frames))
    vae_cfg = config.vae
    n = vae_cfg.latents_per_slice
    with __import__("torch").device("meta"):
        vae = SliceVAE(vae_cfg)
    if latent_frames % n > 1:
        with pytest.raises(ShapeError, match=f"latent frames must be a positive multiple of {n} "
                                             f"or a multiple of {n} plus 1, got {latent_frames}"):
            vae.slice_plan(latent_frames)
    else:
        table = decoder_variants(config)
        plan = vae.slice_plan(latent_frames)
        variants = [decoder_variant(config, s) for s in plan]
        assert variants == expected_variants(latent_frames, n)
        for s, variant in zip(plan, variants):
            assert table[variant] == (s.ctx_end - s.ctx_start, s.start, s.length)
            # The variant's graph decodes as many frames as the slice does.
            spec = vae_decoder_spec(config, variant)
            assert spec.static == dict(zip(("context_frames", "start", "length"), table[variant]))
            frames = spec.output_shapes({"batch": 1, "height": 2, "width": 3})["frames"]
            assert frames == (1, 3, vae.decoded_frames(s.length), 16, 24)
        # The slices tile the latents; the decoded video has the length the latents encode.
        first = latent_frames % n
        assert [s.ctx_start + s.start for s in plan] == [0] * first + list(range(first, latent_frames, n))
        assert sum(vae.decoded_frames(s.length) for s in plan) == vae_cfg.video_frames(latent_frames)


@pytest.mark.parametrize("slice_frames", [8, 16])
def test_every_decoder_variant_is_used_by_some_plan(slice_frames):
    config = TINY.replace(vae=TINY.vae.replace(slice_frames=slice_frames))
    n = config.vae.latents_per_slice
    used = {decoder_variant(config, s) for k in range(1, 4 * n + 2) if k % n <= 1
            for s in config.vae.slice_plan(k)}
    assert used == set(decoder_variants(config)) == set(DECODER_VARIANTS)


def test_random_inputs_are_fresh_valid_and_deterministic():
    spec = make_specs(TINY, networks=["text_encoder"])[0]
    a = spec.random_inputs({"batch": 3}, seed=1)
    b = spec.random_inputs({"batch": 3}, seed=1)
    c = spec.random_inputs({"batch": 3}, seed=2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].dtype == np.int64 and a["input_ids"].max() < TINY.text_encoder.vocab_size
    mask = a["attention_mask"]
    assert mask[:, 0].all() and (np.diff(mask, axis=1) <= 0).all()  # 1s then 0s, at least one 1
    dit = dit_spec(TINY).random_inputs({"batch": 2, "frames": 1, "height": 4, "width": 6})
    assert dit["latents"].shape == (2, 4, 1, 4, 6) and ((0 <= dit["timestep"]) & (dit["timestep"] < 1000)).all()
    assert {k: v.dtype for k, v in dit.items()} == {"latents": np.float32, "timestep": np.float32,
                                                    "text": np.float32, "text_mask": np.int64}
    # Unit Gaussians: latents mean 0.013, std 0.964 at seed 0 (std 0.91..1.04 over seeds
    # 0-4, 192 values); uniform [-1, 1] values would have std 0.577.
    for name in ("latents", "text"):
        assert abs(dit[name].mean()) < 0.2 and 0.85 < dit[name].std() < 1.15, name


def test_json_round_trip(tmp_path):
    for spec in make_specs(TINY, "fp8"):
        spec.save(tmp_path)
        again = ExportSpec.load(tmp_path)
        assert again == spec
        assert json.loads((tmp_path / "spec.json").read_text())["network"] == spec.network
    data = json.loads((tmp_path / "spec.json").read_text())
    data["format"] = 99
    with pytest.raises(ExportError, match="unsupported spec format"):
        ExportSpec.from_dict(data)
    with pytest.raises(ExportError, match="no spec.json"):
        ExportSpec.load(tmp_path / "missing")


def test_dim_spec_validation_and_expressions():
    with pytest.raises(ConfigError, match="multiples of 4"):
        DimSpec("height", 4, 10, 4)
    assert eval_dim("8*height", {"height": 3}) == 24
    assert eval_dim("width/8", {"width": 64}) == 8
    with pytest.raises(ShapeError, match="not divisible"):
        eval_dim("width/8", {"width": 60})
    with pytest.raises(ConfigError, match="vae_decoder variant must be one of"):
        vae_decoder_spec(TINY, "middle")


def test_graph_keys_are_values():
    from easyanimate_rt.errors import ConfigError
    from easyanimate_rt.export.spec import GraphKey, encoder_key

    key = GraphKey.parse("vae_decoder/first")
    assert key == GraphKey("vae_decoder", "first") and str(key) == "vae_decoder/first" and key.choice == "vae"
    assert GraphKey.parse("dit_cache/head").choice == "dit" and str(GraphKey.parse("dit")) == "dit"
    assert str(encoder_key(1)) == "vae_encoder/image" and str(encoder_key(8)) == "vae_encoder/slice"
    with pytest.raises(ConfigError, match="unknown graph 'unet'"):
        GraphKey.parse("unet")
