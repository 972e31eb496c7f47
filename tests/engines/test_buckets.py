"""Bucket -> latent shapes -> profiles, for every release preset and the shipped model."""

from __future__ import annotations

import pytest

from easyanimate_rt.engines.buckets import (Bucket, bucket_shapes, find_profile, graphs_needed, parse_buckets,
                                            profiles_for)
from easyanimate_rt.errors import InputError
from easyanimate_rt.export.spec import dit_spec, text_encoder_spec, vae_decoder_spec
from easyanimate_rt.reference.config import PRESETS, from_preset


@pytest.mark.parametrize("preset, bucket, frames, tokens, decoders", [
    ("v3-512", "512x512x144", 36, 36 * 32 * 32, {"first", "interior", "last"}),   # 36,864 tokens
    ("v3-768", "384x672x144", 36, 36 * 24 * 42, {"first", "interior", "last"}),
    ("v3-960", "960x960x144", 36, 36 * 60 * 60, {"first", "interior", "last"}),
    ("v3-512", "512x512x1", 1, 32 * 32, {"lone"}),
    ("v3-512", "512x512x17", 5, 5 * 32 * 32, {"lone", "first", "last"}),          # 8k+1: lone first latent
    ("v2-512", "512x512x144", 48, 48 * 32 * 32, {"chunk"}),                       # 9-frame chunks -> 3 latents
    ("v2-768", "384x672x9", 3, 3 * 24 * 42, {"chunk"}),
    ("v2-512", "512x512x1", 1, 32 * 32, {"lone"}),
    ("shapes", "64x64x17", 5, 5 * 4 * 4, {"lone", "first", "last"}),              # the shipped default: 80 tokens
    ("shapes", "64x64x8", 2, 2 * 4 * 4, {"single"}),
    ("tiny", "64x64x9", 3, 3 * 4 * 4, {"lone", "single"}),
])
@pytest.mark.parametrize("guidance, batch", [("batched", 2), ("sequential", 1)])
def test_bucket_shapes(preset, bucket, frames, tokens, decoders, guidance, batch):
    cfg = from_preset(preset)
    s = bucket_shapes(cfg, Bucket.parse(bucket), guidance)
    b = Bucket.parse(bucket)
    assert s.dims["dit"] == {"batch": batch, "frames": frames, "height": b.height // 8, "width": b.width // 8}
    assert s.tokens == tokens
    assert s.dims["text_encoder"] == {"batch": batch}
    assert {k.split("/")[1] for k in s.dims if k.startswith("vae_decoder/")} == decoders
    assert all(v == {"batch": 1, "height": b.height // 8, "width": b.width // 8}
               for k, v in s.dims.items() if k.startswith("vae_decoder/"))
    assert not any(k.startswith("vae_encoder") for k in s.dims)  # text-to-video needs no encoder


def test_dit_tokens_at_release_size():
    s = bucket_shapes(from_preset("v3-512"), Bucket(512, 512, 144))
    assert s.tokens == 36_864  # 36 latent frames x 32 x 32 patches (DESIGN.md 1.3)
    i2v = bucket_shapes(from_preset("v3-512"), Bucket(512, 512, 144), image_to_video=True)
    assert i2v.dims["vae_encoder/slice"] == {"batch": 1, "height": 512, "width": 512}


@pytest.mark.parametrize("preset, bucket, rule", [
    ("v3-512", "500x512x144", "height must be a positive multiple of 16, got 500"),
    ("shapes", "48x64x17", "height must be a positive multiple of 32, got 48"),   # Grid Reshape
    ("v3-512", "512x512x10", "frames must be 1, a multiple of 8 or a multiple of 8 plus 1, got 10"),
    ("v2-512", "512x512x16", "frames must be 1 or a multiple of 9"),
    ("shapes", "64x64x129", "33 latent frames need 132 temporal positions; the model's position table holds 64"),
])
def test_impossible_buckets_name_the_rule(preset, bucket, rule):
    with pytest.raises(InputError, match=rule):
        bucket_shapes(from_preset(preset), Bucket.parse(bucket))


@pytest.mark.parametrize("text", ["512x512", "512x512x", "axbxc", "", " , "])
def test_bucket_syntax(text):
    with pytest.raises(InputError):
        parse_buckets(text)


def test_parse_sorts_and_dedupes():
    assert [b.name for b in parse_buckets("512x512x1, 384x672x144,512x512x1")] == ["384x672x144", "512x512x1"]


def test_static_profiles_share_shapes_and_ranged_spans_them():
    cfg = PRESETS["v3-512"]
    buckets = parse_buckets("384x672x144,512x512x144,512x512x1")
    shapes = [bucket_shapes(cfg, b) for b in buckets]
    spec = dit_spec(cfg)
    profiles, index = profiles_for(spec, shapes)
    assert len(profiles) == 3 and index == {"384x672x144": 0, "512x512x1": 1, "512x512x144": 2}
    assert profiles[0].dims == {"batch": (2, 2, 2), "frames": (36, 36, 36), "height": (48, 48, 48),
                                "width": (84, 84, 84)}
    ranged, rindex = profiles_for(spec, shapes, ranged=True)
    assert len(ranged) == 1 and set(rindex.values()) == {0}
    assert ranged[0].dims == {"batch": (2, 2, 2), "frames": (1, 36, 36), "height": (48, 64, 64),
                              "width": (64, 64, 84)}
    # the text encoder varies only in batch: one profile serves every bucket
    tprof, tindex = profiles_for(text_encoder_spec(cfg), shapes)
    assert len(tprof) == 1 and set(tindex) == {b.name for b in buckets}
    # decoder variants vary only in height and width
    dprof, dindex = profiles_for(vae_decoder_spec(cfg, "interior"), shapes)
    assert [p.dims["height"] for p in dprof] == [(48, 48, 48), (64, 64, 64)] and "512x512x1" not in dindex
    assert find_profile(profiles, {"batch": 2, "frames": 36, "height": 64, "width": 64}) == 2
    assert find_profile(profiles, {"batch": 2, "frames": 8, "height": 64, "width": 64}) is None
    assert graphs_needed(shapes)[:2] == ["text_encoder", "dit"]


def test_prompt_batch_buckets():
    """``HxWxFbN``: N prompts in one call; the DiT's and text encoder's batch profile spans
    one prompt's batch to N prompts' (opt = max), the decoders stay batch 1."""
    cfg = from_preset("shapes")
    b = Bucket.parse("64x64x17b4")
    assert (b.height, b.width, b.frames, b.prompts) == (64, 64, 17, 4) and b.name == "64x64x17b4"
    assert Bucket.parse(b.name) == b and Bucket.parse("64x64x17").prompts == 1
    assert [x.name for x in parse_buckets("64x64x17b4,64x64x17")] == ["64x64x17", "64x64x17b4"]
    for guidance, one in (("batched", 2), ("sequential", 1)):
        s = bucket_shapes(cfg, b, guidance)
        assert s.dims["dit"]["batch"] == s.dims["text_encoder"]["batch"] == 4 * one
        assert s.tokens == bucket_shapes(cfg, Bucket(64, 64, 17), guidance).tokens  # per prompt
        assert all(v["batch"] == 1 for k, v in s.dims.items() if k.startswith("vae_decoder/"))
        profiles, _ = profiles_for(dit_spec(cfg), [s])
        assert profiles[0].dims["batch"] == (one, 4 * one, 4 * one)
        assert profiles[0].dims["frames"] == (5, 5, 5)
        tprof, _ = profiles_for(text_encoder_spec(cfg), [s])
        assert tprof[0].dims["batch"] == (one, 4 * one, 4 * one)
    both = [bucket_shapes(cfg, x) for x in parse_buckets("64x64x17,64x64x17b4")]
    static, index = profiles_for(dit_spec(cfg), both)
    assert [p.dims["batch"] for p in static] == [(2, 2, 2), (2, 8, 8)] and index == {"64x64x17": 0, "64x64x17b4": 1}
    ranged, _ = profiles_for(dit_spec(cfg), both, ranged=True)
    assert ranged[0].dims["batch"] == (2, 8, 8)
    assert find_profile(static, {"batch": 6, "frames": 5, "height": 8, "width": 8}) == 1  # 3 prompts
    # the exported graphs take the largest batch
    assert dit_spec(cfg).dims[0].max == text_encoder_spec(cfg).dims[0].max == 8


@pytest.mark.parametrize("text, rule", [("64x64x17b0", "prompts per batch must be 1 .. 4, got 0"),
                                        ("64x64x17b5", "prompts per batch must be 1 .. 4, got 5")])
def test_prompt_batch_limits(text, rule):
    with pytest.raises(InputError, match=rule):
        bucket_shapes(from_preset("shapes"), Bucket.parse(text))
