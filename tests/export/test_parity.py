"""Validation ladder step 1 (DESIGN.md 4): ONNX Runtime CPU fp32 vs the torch reference
on fresh random inputs at shapes other than the export sample (1 frame, non-square),
for every graph of every CI-exportable model, and the exported VAE slices driven slice
by slice against the reference encode/decode of multi-slice videos."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from exported import ci_models, ort_session, parity_dims

from easyanimate_rt.export.graphs import run_torch
from easyanimate_rt.export.spec import DECODER_VARIANTS, decoder_variant
from easyanimate_rt.tolerances import check_close

GRAPHS = ["text_encoder", "dit", "vae_encoder/image", "vae_encoder/slice"] + \
         [f"vae_decoder/{v}" for v in DECODER_VARIANTS]


def _check(exports, name: str, key: str) -> None:
    spec, path = exports.written(name, key)
    model = exports.model(name)
    session = ort_session(path)
    assert [i.name for i in session.get_inputs()] == spec.input_names
    assert [o.name for o in session.get_outputs()] == spec.output_names
    for seed, dims in enumerate(parity_dims(spec), start=1):
        feeds = spec.random_inputs(dims, seed=seed)
        expected = run_torch(model, spec, feeds)
        (actual,) = session.run(None, feeds)
        out = spec.outputs[0]
        assert actual.shape == spec.output_shapes(dims)[out.name] == expected[out.name].shape
        assert actual.dtype == np.float32
        check_close(torch.from_numpy(actual), torch.from_numpy(expected[out.name]), "onnx_fp32")


@pytest.mark.parametrize("key", GRAPHS)
@pytest.mark.parametrize("name", ci_models())
def test_onnxruntime_matches_torch_fp32(exports, name, key):
    _check(exports, name, key)


@pytest.mark.slow
def test_dit_release_paths_grid_reshape_and_hybrid_attention(exports):
    """Grid Reshape (V2, block 2) and the hybrid motion module (V3) at the tiny size."""
    _check(exports, "tiny-grid", "dit")


def test_inp_dit_graph_takes_the_inpaint_and_clip_inputs(exports):
    """An InP DiT (V3 release layout) exports with its extra inputs, and they matter."""
    spec, _ = exports.written("tiny-inp", "dit")
    assert spec.input_names == ["latents", "timestep", "text", "text_mask", "inpaint_latents", "clip_embeds",
                                "clip_mask"]
    _check(exports, "tiny-inp", "dit")
    model = exports.model("tiny-inp")
    feeds = spec.random_inputs(seed=7)
    hidden = dict(feeds, clip_mask=np.zeros_like(feeds["clip_mask"]), clip_embeds=np.zeros_like(feeds["clip_embeds"]))
    base = run_torch(model, spec, feeds)["noise_pred"]
    assert np.abs(run_torch(model, spec, hidden)["noise_pred"] - base).max() > 1e-4
    moved = dict(feeds, inpaint_latents=feeds["inpaint_latents"] + 1.0)
    assert np.abs(run_torch(model, spec, moved)["noise_pred"] - base).max() > 1e-4


@pytest.mark.parametrize("key", ["vae_encoder/image", "vae_encoder/slice", "vae_decoder/chunk", "vae_decoder/lone"])
def test_chunked_v2_vae_graphs(exports, key):
    _check(exports, "tiny-v2", key)


def test_parity_dims_cover_the_contract(exports):
    spec = exports.spec("tiny", "dit")
    dims = parity_dims(spec)
    assert len(dims) >= 3
    assert any(d["frames"] == 1 for d in dims)
    assert any(d["height"] != d["width"] for d in dims)
    assert all(d != dict(spec.sample) for d in dims)


def _ort(exports, name, key):
    spec, path = exports.written(name, key)
    session = ort_session(path)
    return lambda x: session.run(None, {spec.input_names[0]: x.numpy()})[0]


@pytest.mark.parametrize("frames", [25, 16, 8])
@pytest.mark.parametrize("name", ci_models())
@torch.no_grad()
def test_exported_slices_reproduce_reference_encode_and_decode(exports, name, frames):
    """25 frames -> 7 latents: lone, first, interior, last slices; 16 -> first, last;
    8 -> single. The exported encoder (image + slice graphs) and decoder variants,
    driven slice by slice, reproduce SliceVAE.encode / SliceVAE.decode."""
    model = exports.model(name)
    vae, cfg = model.vae, model.config
    sc = cfg.vae.spatial_compression
    gen = torch.Generator().manual_seed(frames)
    # A smooth video (what a VAE sees), non-square, batch 1.
    coarse = torch.rand(1, 3, frames, 3, 4, generator=gen) * 2 - 1
    video = torch.nn.functional.interpolate(coarse, size=(frames, 4 * sc, 6 * sc), mode="trilinear")

    encoders = {"image": _ort(exports, name, "vae_encoder/image"), "slice": _ort(exports, name, "vae_encoder/slice")}
    parts = []
    for a, b in vae.frame_slices(frames):
        graph = "image" if b - a == 1 else "slice"
        parts.append(torch.from_numpy(encoders[graph](video[:, :, a:b].contiguous())))
    latents = torch.cat(parts, dim=2)
    check_close(latents, vae.encode(video), "onnx_fp32")

    used, decoded = set(), []
    for s in vae.slice_plan(latents.shape[2]):
        variant = decoder_variant(cfg, s)
        used.add(variant)
        context = latents[:, :, s.ctx_start:s.ctx_end].contiguous()
        decoded.append(torch.from_numpy(_ort(exports, name, f"vae_decoder/{variant}")(context)))
    check_close(torch.cat(decoded, dim=2), vae.decode(latents), "onnx_fp32")
    expected_variants = {25: {"lone", "first", "interior", "last"}, 16: {"first", "last"}, 8: {"single"}}
    assert used == expected_variants[frames]


@pytest.mark.parametrize("frames", [1, 18])
@torch.no_grad()
def test_exported_chunks_reproduce_the_v2_encode_and_decode(exports, frames):
    """V2: every 9-frame chunk encoded whole (-> 3 latents), every 3-latent chunk decoded
    whole (-> 9 frames, the chunk's first frame not doubled)."""
    model = exports.model("tiny-v2")
    vae, cfg = model.vae, model.config
    gen = torch.Generator().manual_seed(frames)
    video = torch.rand(1, 3, frames, 32, 48, generator=gen) * 2 - 1
    encoders = {"image": _ort(exports, "tiny-v2", "vae_encoder/image"),
                "slice": _ort(exports, "tiny-v2", "vae_encoder/slice")}
    parts = [torch.from_numpy(encoders["image" if b - a == 1 else "slice"](video[:, :, a:b].contiguous()))
             for a, b in vae.frame_slices(frames)]
    latents = torch.cat(parts, dim=2)
    assert latents.shape[2] == cfg.vae.latent_frames(frames) == (1 if frames == 1 else 6)
    check_close(latents, vae.encode(video), "onnx_fp32")
    decoded = [torch.from_numpy(_ort(exports, "tiny-v2", f"vae_decoder/{decoder_variant(cfg, s)}")(
        latents[:, :, s.ctx_start:s.ctx_end].contiguous())) for s in vae.slice_plan(latents.shape[2])]
    out = torch.cat(decoded, dim=2)
    assert out.shape[2] == frames
    check_close(out, vae.decode(latents), "onnx_fp32")
