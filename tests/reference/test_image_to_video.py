"""InP models end to end: text-to-video as upstream runs it (the encoded all-ones mask
and all -1 masked video, hidden CLIP tokens) and image-to-video (the start image's mask
and masked-video latents, and its CLIP embedding in the last clip_apply_ratio of the
steps)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from easyanimate_rt.errors import InputError
from easyanimate_rt.reference.clip import ClipImageEncoder
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.reference.samplers import NoiseSchedule
from easyanimate_rt.reference.weights import load_model, random_model
from easyanimate_rt.shapes.metrics import psnr
from easyanimate_rt.shapes.world import ShapesDataset

SHAPES_DIR = Path(__file__).resolve().parents[2] / "src" / "easyanimate_rt" / "assets" / "shapes"


def inp_config(base: str = "tiny", clip: int = 24):
    cfg = from_preset(base)
    return cfg.replace(dit=cfg.dit.replace(inpaint_channels=2 * cfg.dit.in_channels, clip_channels=clip))


def live(model):
    """Random values for every zero-initialised DiT parameter, so outputs depend on inputs."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.dit.parameters():
            if not p.abs().any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


class Recorder:
    """Records the InP inputs of every DiT call."""

    def __init__(self, dit):
        self.calls = []
        dit.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, _module, args, kwargs):
        self.calls.append({k: v.clone() for k, v in kwargs.items() if v is not None})


@pytest.fixture(scope="module")
def tiny_inp():
    return ReferencePipeline(live(random_model(inp_config(), seed=2)))


def test_text_to_video_feeds_the_generate_everything_mask_and_hides_clip(tiny_inp):
    rec = Recorder(tiny_inp.model.dit)
    a = tiny_inp.generate("a red circle", steps=3, frames=9, seed=4)
    b = tiny_inp.generate("a red circle", steps=3, frames=9, seed=4)
    c = tiny_inp.generate("a red circle", steps=3, frames=9, seed=5)
    np.testing.assert_array_equal(a.frames, b.frames)
    assert np.abs(a.frames.astype(int) - c.frames).mean() > 1.0  # the seed matters
    call = rec.calls[0]
    vae = tiny_inp.model.vae
    with torch.no_grad():
        expected = torch.cat([vae.encode(torch.ones(1, 3, 9, 64, 64)), vae.encode(-torch.ones(1, 3, 9, 64, 64))], 1)
    assert call["inpaint_latents"].shape == (2, 8, 3, 8, 8)
    torch.testing.assert_close(call["inpaint_latents"], expected.expand(2, -1, -1, -1, -1), rtol=0, atol=0)
    assert call["clip_mask"].shape == (2, 8) and not call["clip_mask"].any() and not call["clip_embeds"].any()


def test_inp_text_to_video_equals_the_dit_without_inp_inputs(tiny_inp):
    """Zero inpaint latents and a zero CLIP mask are what the DiT uses when given none."""
    dit = tiny_inp.model.dit
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 3, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
    mask, t = torch.ones(2, 16), torch.tensor([999.0, 3.0])
    with torch.no_grad():
        plain = dit(x, t, text, mask)
        zero = dit(x, t, text, mask, torch.zeros(2, 8, 3, 8, 8), torch.randn(2, 24, generator=g), torch.zeros(2, 8))
        shown = dit(x, t, text, mask, torch.zeros(2, 8, 3, 8, 8), torch.randn(2, 24, generator=g), torch.ones(2, 8))
        image = dit(x, t, text, mask, torch.randn(2, 8, 3, 8, 8, generator=g))
    torch.testing.assert_close(zero, plain, rtol=0, atol=0)
    assert (shown - plain).abs().max() > 1e-3 and (image - plain).abs().max() > 1e-3


class OracleDiT(nn.Module):
    """Predicts the exact noise that leads the sampler to x0 = the masked-video latents
    (channels C..2C of ``inpaint_latents``): a stand-in for an InP model that has learnt
    to keep the given frames, to check the conditioning the pipeline builds."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.proj_out = nn.Linear(1, 1)
        self.abar = NoiseSchedule().alphas_cumprod

    def forward(self, latents, timestep, text, text_mask=None, inpaint_latents=None, clip_embeds=None,
                clip_mask=None):
        c = self.config.in_channels
        x0 = inpaint_latents[:, c:]                                          # masked-video latents
        a = self.abar[timestep.long()].view(-1, 1, 1, 1, 1)
        eps = (latents - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], dim=1)               # (B, 2C, F, H, W)


def test_image_to_video_keeps_the_start_image_as_frame_0():
    """The shipped VAE (trained), an oracle InP DiT: frame 0 comes back as the VAE's own
    reconstruction of the start image, and the rest is what the mask says (generated)."""
    model = load_model(SHAPES_DIR)
    cfg = model.config.replace(dit=model.config.dit.replace(inpaint_channels=8, clip_channels=0))
    model.config, model.dit = cfg, OracleDiT(cfg.dit)
    pipe = ReferencePipeline(model)
    image = ShapesDataset("heldout", frames=1, size=64, length=1, seed=3).frames_of(0)[0]  # (64, 64, 3)
    out = pipe.generate("a red circle", steps=10, sampler="ddim", seed=0, image=image)
    with torch.no_grad():
        from easyanimate_rt.media import from_uint8, to_uint8

        recon = to_uint8(model.vae.decode(model.vae.encode(from_uint8(image[None])[None]))[0])[0]
    vae_psnr = psnr(recon, image)
    assert vae_psnr > 25  # the shipped VAE (MODEL_CARD: ~30 dB)
    assert psnr(out.frames[0], image) > vae_psnr - 0.5
    assert psnr(out.frames[0], recon) > 40
    assert out.frames[1:].mean() < 40  # masked frames are the black (-1) masked video


def test_image_to_video_requests_are_checked(tiny_inp):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InputError, match=r"image must be uint8 of shape \(64, 64, 3\).*got uint8 \(32, 64, 3\)"):
        tiny_inp.generate("x", steps=1, frames=9, image=image[:32])
    with pytest.raises(InputError, match="needs an InP model"):
        ReferencePipeline(random_model(from_preset("tiny"))).generate("x", steps=1, frames=9, image=image)
    with pytest.raises(InputError, match="clip_apply_ratio must be in"):
        tiny_inp.generate("x", steps=1, frames=9, image=image, clip_apply_ratio=1.5)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIP vision model saved the transformers way (a stand-in for ViT-L/14)."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=24)
    root = tmp_path_factory.mktemp("clip")
    CLIPVisionModelWithProjection(cfg).eval().save_pretrained(root)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root)
    return root


def test_clip_embedding_conditions_the_positive_branch_late(tiny_inp, clip_dir):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    encoder = ClipImageEncoder.from_pretrained(clip_dir)
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    direct = CLIPVisionModelWithProjection.from_pretrained(clip_dir)(
        pixel_values=CLIPImageProcessor.from_pretrained(clip_dir)(images=image, return_tensors="pt")["pixel_values"]
    ).image_embeds
    torch.testing.assert_close(encoder(image), direct, rtol=0, atol=0)

    pipe = ReferencePipeline(tiny_inp.model, clip_encoder=encoder)
    rec = Recorder(pipe.model.dit)
    with_clip = pipe.generate("x", steps=4, frames=9, image=image, clip_apply_ratio=0.5)
    # steps 0-1 (the first 1 - ratio): CLIP hidden on both branches; steps 2-3: positive only
    masks = [c["clip_mask"] for c in rec.calls[-4:]]
    assert all(not m.any() for m in masks[:2])
    for call in rec.calls[-2:]:
        assert call["clip_mask"][0].sum() == 0 and call["clip_mask"][1].sum() == 8
        torch.testing.assert_close(call["clip_embeds"][1], direct[0].detach())
        assert not call["clip_embeds"][0].any()
    assert rec.calls[-1]["inpaint_latents"][:, 4:].abs().max() > 0.1  # the image's masked-video latents
    without = tiny_inp.generate("x", steps=4, frames=9, image=image)
    assert np.abs(with_clip.frames.astype(int) - without.frames).max() > 0


def test_clip_encoder_width_must_match_the_dit(tiny_inp, clip_dir):
    encoder = ClipImageEncoder.from_pretrained(clip_dir)
    model = random_model(inp_config(clip=16))
    with pytest.raises(InputError, match="24-d embeddings; the DiT takes 16-d"):
        ReferencePipeline(model, clip_encoder=encoder)


def _cli(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "easyanimate_rt", *argv], capture_output=True, text=True, cwd=cwd)


def test_cli_image_errors_are_one_line_and_leave_no_file(tmp_path):
    out = tmp_path / "v.mp4"
    r = _cli("generate", "x", "--model", "tiny", "--image", str(tmp_path / "missing.png"), "--out", str(out),
             cwd=tmp_path)
    assert r.returncode == 2 and "image file not found" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.png").write_bytes(b"not a png")
    r = _cli("generate", "x", "--model", "tiny", "--image", str(tmp_path / "bad.png"), "--out", str(out),
             cwd=tmp_path)
    assert r.returncode == 2 and "cannot read image" in r.stderr and "Traceback" not in r.stderr
    import imageio.v3 as iio

    iio.imwrite(tmp_path / "ok.png", np.zeros((64, 64, 3), np.uint8))
    r = _cli("generate", "x", "--model", "tiny", "--image", str(tmp_path / "ok.png"), "--steps", "1",
             "--out", str(out), cwd=tmp_path)
    assert r.returncode == 2 and "needs an InP model" in r.stderr
    assert not out.exists()
