"""The torch-free sampler definitions (reference/schedule.py) against the torch samplers
and torch's own float32 arithmetic: the runtime's numpy loop and the reference pipeline
must step the same way."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from easyanimate_rt.errors import InputError
from easyanimate_rt.reference.samplers import SAMPLERS, make_sampler
from easyanimate_rt.reference.schedule import NumpySampler, SeededNoise, check_seed, sampler_tables, training_schedule


@pytest.mark.parametrize("T,start,end", [(1000, 1e-4, 0.02), (1000, 0.00085, 0.012), (999, 1e-4, 0.02), (7, 1e-3, 0.5)])
def test_training_schedule_is_bit_equal_to_torch_float32(T, start, end):
    s = training_schedule(T, start, end)
    betas = torch.linspace(start, end, T, dtype=torch.float32)
    abar = torch.cumprod(1.0 - betas, dim=0)
    assert np.array_equal(s.betas, betas.numpy())
    assert np.array_equal(s.alphas_cumprod, abar.numpy())
    # torch's float32 pow(q, 0.5) and a correctly rounded sqrt differ by at most 1 ulp
    np.testing.assert_allclose(s.sigmas, (((1.0 - abar) / abar) ** 0.5).numpy(), rtol=1.2e-7, atol=0)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("steps", [1, 2, 3, 25, 50])
def test_tables_agree_with_the_torch_sampler(name, steps):
    if name == "pndm" and steps < 4:  # its Runge-Kutta warm-up needs four timesteps
        with pytest.raises(InputError, match="at least 4 steps"):
            sampler_tables(name, steps)
        return
    tables, sampler = sampler_tables(name, steps), make_sampler(name, steps)
    assert np.array_equal(tables.timesteps, sampler.timesteps.numpy())
    assert np.abs(tables.coef - sampler._coef.numpy()).max() <= 1e-6
    assert np.abs(tables.vp - sampler._vp.numpy()).max() <= 1e-6
    assert tables.init_noise_sigma == sampler.init_noise_sigma


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_numpy_sampler_steps_like_the_torch_sampler(name):
    """A 12-step trajectory with a fixed fake model: numpy and torch agree to 1e-6
    (relative to the latents' scale) at every step, v -> epsilon included."""
    steps, shape = 12, (1, 4, 3, 8, 8)
    ours, ref = NumpySampler(name, steps), make_sampler(name, steps)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal(shape, dtype=np.float32) * np.float32(ours.init_noise_sigma)
    x_t = torch.from_numpy(x_np.copy())
    assert ours.calls == ref.calls
    for i in range(ours.calls):
        xin_np, xin_t = ours.scale_model_input(x_np, i), ref.scale_model_input(x_t, i)
        out = (0.3 * xin_np + 0.1).astype(np.float32)
        noise = rng.standard_normal(shape, dtype=np.float32)
        eps_np = ours.epsilon(i, xin_np, out, "v_prediction")
        eps_t = ref.epsilon(i, xin_t, torch.from_numpy(out), "v_prediction")
        x_np = ours.step(i, x_np, eps_np, noise)
        x_t = ref.step(i, x_t, eps_t, torch.from_numpy(noise))
        scale = max(1.0, float(np.abs(x_np).max()))
        assert np.abs(x_np - x_t.numpy()).max() <= 1e-6 * scale, i


def test_seeded_noise_is_the_documented_stream():
    a, b = SeededNoise(7), SeededNoise(7)
    assert np.array_equal(a((2, 3)), np.random.Generator(np.random.PCG64(7)).standard_normal((2, 3), dtype=np.float32))
    b((2, 3))
    assert np.array_equal(a((4,)), b((4,)))  # draws continue the same stream
    assert check_seed(2**64 - 1) == 2**64 - 1
    for bad in (-1, 2**64, 1.5, True, "3"):
        with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*64\)"):
            check_seed(bad)


def test_unknown_sampler_and_steps_are_input_errors():
    with pytest.raises(InputError, match="unknown sampler 'heun'"):
        sampler_tables("heun", 5)
    with pytest.raises(InputError, match=r"num_steps must be an integer in \[1, 1000\], got 0"):
        NumpySampler("ddim", 0)


def test_schedule_imports_no_torch():
    code = ("import sys; import easyanimate_rt.reference.schedule, easyanimate_rt.reference.request; "
            "assert 'torch' not in sys.modules, 'torch'")
    subprocess.run([sys.executable, "-c", code], check=True)
