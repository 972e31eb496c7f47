"""Upstream's smoothed decode (reference/smooth.py) against upstream's own numbers: the
vae-v3 (slice) and vae-v2 (chunk) fixtures hold ``decode_latents``' result (clamp,
smooth_output, clamp, /2 + 0.5, clamp) and the noise its ``.sample()`` drew; given that
noise, the streaming smoother reproduces it to 1e-5. With the posterior mean (ours) it
stays a smoothing of the same frames; the runtime's engines give the reference's frames."""

from __future__ import annotations

import pytest
import torch
from test_upstream_fixtures import FIXTURES, io, vae

from easyanimate_rt.reference.smooth import iter_smoothed, smooth_window


def _smooth(model, plain: torch.Tensor, noise: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """The streaming smoother over ``plain`` fed ``chunk`` frames at a time (any chunking
    gives one result); the re-encode draws ``noise`` like upstream, or takes the mean."""
    s, used = model.config.scaling_factor, [0]

    def encode(x):
        mean, logvar = model._moments(x)
        if noise is None:
            return mean * s
        n = noise[:, :, used[0]:used[0] + mean.shape[2]]
        used[0] += mean.shape[2]
        return (mean + torch.exp(0.5 * logvar) * n) * s

    chunks = [plain[:, :, k:k + chunk] for k in range(0, plain.shape[2], chunk)]
    out = torch.cat(list(iter_smoothed(chunks, plain.shape[2], model.config, encode,
                                       lambda z, spec: model.decode_slice(z, spec.start, spec.length),
                                       lambda xs: torch.cat(list(xs), dim=2))), dim=2)
    assert noise is None or used[0] == noise.shape[2]  # every drawn latent used, in order
    return out


@pytest.mark.parametrize("name, preset, frames", [("vae-v3", "v3-512", f) for f in (1, 8, 9, 16, 17, 25)]
                         + [("vae-v2", "v2-512", f) for f in (1, 9, 18)])
@pytest.mark.parametrize("chunk", [1, 8])
@torch.no_grad()
def test_smoothed_decode_matches_upstream(name, preset, frames, chunk):
    model, t = vae(name, preset), io(name)
    plain = t[f"decode_out_{frames}"]
    noise = t.get(f"smooth_noise_{frames}")
    assert (noise is not None) == (smooth_window(model.config, frames) is not None)  # upstream smooths past E
    got = (_smooth(model, plain, noise, chunk) / 2 + 0.5).clamp(0, 1)
    want = t[f"decode_pipeline_{frames}"]
    assert got.shape == want.shape
    assert (got - want).abs().max() <= 1e-5
    if noise is not None:  # the smoothing changed the window, and only the window
        lo, hi = smooth_window(model.config, frames)
        plain01 = (plain.clamp(-1, 1) / 2 + 0.5)
        assert (want[:, :, lo:hi] - plain01[:, :, lo:hi]).abs().max() > 1e-3
        torch.testing.assert_close(want[:, :, :lo], plain01[:, :, :lo], rtol=0, atol=1e-6)
        torch.testing.assert_close(want[:, :, hi:], plain01[:, :, hi:], rtol=0, atol=1e-6)


@torch.no_grad()
def test_the_mean_is_what_we_encode_and_it_stays_close_to_upstream():
    """Ours re-encodes the posterior mean: frames outside the window are upstream's; inside,
    upstream's sampled re-encode differs (a random VAE's posterior is wide: up to 0.65)."""
    model, t = vae("vae-v3", "v3-512"), io("vae-v3")
    plain, want = t["decode_out_25"], t["decode_pipeline_25"]
    got = (_smooth(model, plain, None, 8) / 2 + 0.5).clamp(0, 1)
    lo, hi = smooth_window(model.config, 25)
    assert (lo, hi) == (4, 21)
    torch.testing.assert_close(got[:, :, :lo], want[:, :, :lo], rtol=0, atol=1e-6)
    torch.testing.assert_close(got[:, :, hi:], want[:, :, hi:], rtol=0, atol=1e-6)
    assert (got[:, :, lo:hi] - want[:, :, lo:hi]).abs().max() > 1e-2


def test_the_window_is_upstreams():
    from easyanimate_rt.reference.config import from_preset

    assert smooth_window(from_preset("v3-512").vae, 144) == (4, 140)
    assert smooth_window(from_preset("v3-512").vae, 8) is None
    assert smooth_window(from_preset("v2-512").vae, 18) == (4, 13)  # E = 9: 4 before, 5 after
    assert FIXTURES.is_dir()
