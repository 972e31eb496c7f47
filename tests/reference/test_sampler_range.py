"""Every sampler over every step count the request rules accept (issue 24): finite
tables, or a refusal at validation that names the rule and the value. Tables are numpy,
so all of 1 .. T is cheap."""

from __future__ import annotations

import numpy as np
import pytest

from easyanimate_rt.errors import InputError
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.request import GenerationRequest
from easyanimate_rt.reference.schedule import (
    DEFINITIONS,
    SAMPLER_NAMES,
    NumpySampler,
    check_sampler,
    sampler_tables,
    training_schedule,
)

SCHEDULES = {  # the training schedule, and small ones where N = T and rounding edges come often
    "T1000": dict(),
    "T50-offset0": dict(num_train_timesteps=50, beta_start=1e-3, beta_end=0.2, steps_offset=0),
    "T7-offset3": dict(num_train_timesteps=7, beta_start=1e-3, beta_end=0.5, steps_offset=3),
}


def refused(name: str, steps: int, schedule) -> bool:
    try:
        check_sampler(name, steps, schedule)
    except InputError:
        return True
    return False


@pytest.mark.parametrize("which", sorted(SCHEDULES))
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_every_accepted_step_count_has_finite_tables(name, which):
    """No floating-point warning while building, every coefficient finite; a refused step
    count is refused by the table builder too (no table outruns its check)."""
    schedule = training_schedule(**SCHEDULES[which])
    T, refusals = schedule.num_train_timesteps, []
    for steps in range(1, T + 1):
        if refused(name, steps, schedule):
            refusals.append(steps)
            with pytest.raises(InputError):
                sampler_tables(name, steps, schedule)
            continue
        with np.errstate(all="raise"):
            tables = sampler_tables(name, steps, schedule)
        calls = {"pndm": steps + 9, "plms": steps + 1 if steps > 1 else 1}.get(name, steps)  # model calls
        assert tables.calls == calls and tables.coef.shape[0] == calls
        for what, values in (("coef", tables.coef), ("vp", tables.vp), ("timesteps", tables.timesteps)):
            assert np.isfinite(values).all(), f"{name} x{steps} ({which}): non-finite {what}"
        assert np.isfinite(tables.init_noise_sigma) and tables.init_noise_sigma > 0
        assert 0 <= tables.timesteps.min() and tables.timesteps.max() <= T - 1
    if which == "T1000":  # at the training schedule: leading spacing's 1000 (timestep 1000); pndm below 4
        assert refusals == {"ddim": [1000], "plms": [1000], "pndm": [1, 2, 3, 1000]}.get(name, [])
    if DEFINITIONS[name].check is None:
        assert refusals == []


def test_the_refusal_is_a_request_rule_checked_before_any_work():
    config = from_preset("tiny")
    req = GenerationRequest("a red circle", height=32, width=32, frames=1, steps=1000, sampler="ddim")
    with pytest.raises(InputError, match=r"ddim: .*must stay below 1000, but 1000 steps reach timestep 1000; "
                                         r"use at most 999 steps"):
        req.validate(config)
    for name in SAMPLER_NAMES:  # everything else at 1000, and every sampler at 999, is accepted
        GenerationRequest("a red circle", height=32, width=32, frames=1, steps=999, sampler=name).validate(config)
        if name not in ("ddim", "pndm", "plms"):
            GenerationRequest("a red circle", height=32, width=32, frames=1, steps=1000, sampler=name).validate(config)


def test_dpm_at_1000_steps_steps_through_the_repeated_timestep():
    """The default sampler at 1000 steps: t = 500 twice; the step onto the repeat leaves
    x as it is, the one after is first order (C = 0), the others second order."""
    tables = sampler_tables("dpm++", 1000)
    t = tables.timesteps
    assert (np.diff(t) == 0).sum() == 1 and t[499] == t[500] == 500
    ratio, phi, second = tables.coef[:, 2], tables.coef[:, 3], tables.coef[:, 4]
    assert ratio[499] == 1 and phi[499] == 0 and second[499] == 0
    assert second[500] == 0 and second[0] == 0 and second[-1] == 0
    assert (second[1:499] != 0).all() and (second[501:-1] != 0).all()


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_the_most_steps_denoise_a_fake_model(name):
    """Every sampler at its most steps on the numpy loop (the runtime's), with an exact
    denoiser towards fixed data: finite throughout and ends on the data."""
    schedule = training_schedule()
    steps = 999 if name in ("ddim", "pndm", "plms") else 1000
    sampler = NumpySampler(name, steps)
    rng = np.random.default_rng(0)
    data = rng.standard_normal((1, 4, 1, 4, 4)).astype(np.float32).clip(-2, 2)
    abar_table = schedule.alphas_cumprod.astype(np.float64)
    x = rng.standard_normal(data.shape).astype(np.float32) * np.float32(sampler.init_noise_sigma)
    for i in range(sampler.calls):
        xin = sampler.scale_model_input(x, i)
        abar = np.interp(float(sampler.timesteps[i]), np.arange(len(abar_table)), abar_table)
        eps = ((xin - np.sqrt(abar) * data) / np.sqrt(1 - abar)).astype(np.float32)
        noise = rng.standard_normal(x.shape).astype(np.float32) if sampler.needs_noise else None
        x = sampler.step(i, x, eps, noise)
        assert np.isfinite(x).all(), f"{name}: non-finite latents after step {i + 1} of {steps}"
    assert np.abs(x - data).max() < 0.05
