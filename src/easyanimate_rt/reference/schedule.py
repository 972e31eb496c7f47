"""The sampler definitions without torch: the training noise schedule, each sampler's
per-step table and its step formula, and the seeded Gaussian noise of a generation.

``reference/samplers.py`` (torch) and the runtime's numpy loop both read these, so the
two cannot drift apart: a sampler is defined once, here. Symbols as in samplers.py
(T training steps, N sampling steps, i step index, abar, sigma, K coefficients).

Float rules: ``betas``/``alphas_cumprod`` are float32 and bit-equal to diffusers'
(which builds them with ``torch.linspace`` and ``torch.cumprod``): torch's float32
linspace computes ``start + step * i`` with one rounding below the midpoint and
``end - step * (T - 1 - i)`` above it, and its CPU cumprod accumulates in float64;
both are mirrored below (float32 products are exact in float64). ``sigmas`` is a
correctly rounded float32 sqrt, within 1 ulp of torch's ``** 0.5``. Tables are derived
in float64 from those float32 values and rounded to float32.

The step formulas take array-likes (numpy arrays or torch tensors) and only use
arithmetic operators, so the torch samplers and the runtime run the same expression.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..errors import ConfigError, InputError, NumericalError

SAMPLER_NAMES = ("ddim", "euler", "euler_a", "dpm++")
SEED_RANGE = (0, 2**64)  # numpy's PCG64 takes any non-negative integer; this keeps seeds portable


@dataclass(frozen=True)
class TrainingSchedule:
    """float32 (T,) betas, alphas_cumprod ("abar") and sigmas = sqrt((1 - abar) / abar)."""

    num_train_timesteps: int
    beta_start: float
    beta_end: float
    steps_offset: int
    betas: np.ndarray
    alphas_cumprod: np.ndarray
    sigmas: np.ndarray
    clip_sample: float | None = None  # DDIM clamps its predicted x0 to [-c, c] (diffusers' clip_sample range)


def training_schedule(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                      steps_offset: int = 1, clip_sample: float | None = None) -> TrainingSchedule:
    T = num_train_timesteps
    if not isinstance(T, int) or isinstance(T, bool) or T < 2:
        raise ConfigError(f"num_train_timesteps must be an integer >= 2, got {T!r}")
    if not 0.0 < beta_start < beta_end < 1.0:
        raise ConfigError(f"betas must satisfy 0 < beta_start < beta_end < 1, got beta_start={beta_start!r}, "
                          f"beta_end={beta_end!r}")
    if not isinstance(steps_offset, int) or steps_offset < 0:
        raise ConfigError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
    if clip_sample is not None and not (isinstance(clip_sample, (int, float)) and 0 < clip_sample < float("inf")):
        raise ConfigError(f"clip_sample must be a positive number or None, got {clip_sample!r}")
    start, end = np.float32(beta_start), np.float32(beta_end)
    step = np.float32((end - start) / np.float32(T - 1))
    i = np.arange(T)
    low = (np.float64(start) + np.float64(step) * i).astype(np.float32)
    high = (np.float64(end) - np.float64(step) * (T - 1 - i)).astype(np.float32)
    betas = np.where(i < T // 2, low, high)
    abar = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
    sigmas = np.sqrt((np.float32(1.0) - abar) / abar)
    return TrainingSchedule(T, beta_start, beta_end, steps_offset, betas, abar, sigmas,
                            None if clip_sample is None else float(clip_sample))


def _linspace64(stop: float, num: int) -> np.ndarray:
    """numpy.linspace(0, stop, num) in float64 (diffusers builds its timesteps with it)."""
    return np.linspace(0.0, stop, num, dtype=np.float64)


def interp_sigmas(schedule: TrainingSchedule, t: np.ndarray) -> np.ndarray:
    """float64 sigma at fractional training timesteps, linear between integer ones."""
    table = schedule.sigmas.astype(np.float64)
    lo = np.clip(np.floor(t).astype(np.int64), 0, schedule.num_train_timesteps - 2)
    frac = t - lo
    return table[lo] + (table[lo + 1] - table[lo]) * frac


# --- tables: (timesteps (N,), float64 coefficients (N, K), init_noise_sigma) ---------------------


def _ddim_first_timestep(s: TrainingSchedule, N: int) -> int:
    """The first (largest) of DDIM's "leading" timesteps: (N - 1) * (T // N) + steps_offset."""
    return (N - 1) * (s.num_train_timesteps // N) + s.steps_offset


def _ddim_check(s: TrainingSchedule, N: int) -> None:
    """Leading spacing runs past the schedule for some N (with steps_offset 1: N = T,
    whose first timestep would be T; diffusers indexes past its table there)."""
    T, first = s.num_train_timesteps, _ddim_first_timestep(s, N)
    if first >= T:
        fits = next((n for n in range(N - 1, 0, -1) if _ddim_first_timestep(s, n) < T), None)
        hint = f"; use at most {fits} steps" if fits else ""
        raise InputError(f"ddim: its timesteps (steps - 1) * ({T} // steps) + steps_offset {s.steps_offset} "
                         f"must stay below {T}, but {N} steps reach timestep {first}{hint}")


def _ddim(s: TrainingSchedule, N: int):
    """DDIM, eta 0, "leading" spacing; x' = a x + b eps (see samplers.DDIMSampler), or
    through the clamped x0 when the schedule has ``clip_sample``."""
    _ddim_check(s, N)
    ratio = s.num_train_timesteps // N
    t = np.arange(N - 1, -1, -1, dtype=np.int64) * ratio + s.steps_offset
    abar = s.alphas_cumprod.astype(np.float64)
    prev = t - ratio
    abar_t = abar[t]
    abar_prev = np.where(prev >= 0, abar[np.clip(prev, 0, None)], 1.0)
    a = np.sqrt(abar_prev / abar_t)
    b = np.sqrt(1 - abar_prev) - np.sqrt(abar_prev * (1 - abar_t) / abar_t)
    if s.clip_sample is None:
        return t, np.stack([a, b], axis=1), 1.0
    # Clamping x0 cannot fold into a x + b eps: the step goes through x0 (as diffusers'
    # DDIMScheduler with clip_sample=True): x0 = (x - sqrt(1 - abar_t) eps) / sqrt(abar_t),
    # clamped to [-c, c]; x' = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps.
    c = np.full(N, s.clip_sample)
    return t, np.stack([a, b, np.sqrt(abar_t), np.sqrt(1 - abar_t), np.sqrt(abar_prev), np.sqrt(1 - abar_prev), c],
                       axis=1), 1.0


def _euler_sigmas(s: TrainingSchedule, N: int):
    t = _linspace64(s.num_train_timesteps - 1, N)[::-1].astype(np.float32)
    sigma = interp_sigmas(s, t.astype(np.float64)).astype(np.float32)  # diffusers keeps float32 sigmas
    return t, np.concatenate([sigma, np.zeros(1, np.float32)]).astype(np.float64)


def _euler(s: TrainingSchedule, N: int):
    """Euler on the probability-flow ODE: columns (input scale, dt)."""
    t, sigma = _euler_sigmas(s, N)
    scale = 1 / np.sqrt(sigma[:-1] ** 2 + 1)
    return t, np.stack([scale, sigma[1:] - sigma[:-1]], axis=1), float(sigma[0])


def _euler_a(s: TrainingSchedule, N: int):
    """Euler ancestral: columns (input scale, dt to sigma_down, sigma_up)."""
    t, sigma = _euler_sigmas(s, N)
    lo, hi = sigma[1:], sigma[:-1]
    scale = 1 / np.sqrt(hi**2 + 1)
    sigma_up = np.sqrt(lo**2 * (hi**2 - lo**2) / hi**2)
    sigma_down = np.sqrt(np.clip(lo**2 - sigma_up**2, 0, None))
    return t, np.stack([scale, sigma_down - hi, sigma_up], axis=1), float(sigma[0])


def _dpm(s: TrainingSchedule, N: int):
    """DPM-Solver++(2M): columns (alpha, sigma_vp, A, B, C), x' = A x + B x0 + C x0_prev."""
    t = np.round(_linspace64(s.num_train_timesteps - 1, N + 1))[::-1][:N].astype(np.int64)
    sigma = np.concatenate([s.sigmas[t].astype(np.float64), np.zeros(1)])
    alpha = 1 / np.sqrt(sigma**2 + 1)
    sigma_vp = sigma * alpha
    hi, lo = sigma[:-1], sigma[1:]
    ratio = sigma_vp[1:] / sigma_vp[:-1]
    phi = alpha[1:] * (1 - lo / hi)
    with np.errstate(over="ignore"):  # the last step: sigma' = 0, h = inf (first order there)
        h = np.log(hi / np.clip(lo, np.finfo(np.float64).tiny, None))
    # Second order between the first and the last step, except around a repeated
    # timestep (N = T: N + 1 points rounded onto T integers repeat one): the step onto
    # the repeat has h = 0 and is the identity (ratio 1, phi 0), and the step after it
    # is first order, its history being at the same noise level (r = 0; the x0 there is
    # the one this step computes again). diffusers divides by that r = 0 (NaN).
    half_over_r = np.zeros(N)
    if N > 2:
        prev, cur = h[:N - 2], h[1:N - 1]
        second = (prev > 0) & (cur > 0)
        half_over_r[1:N - 1] = np.where(second, 0.5 / (np.where(second, prev, 1.0) / np.where(second, cur, 1.0)),
                                        0.0)
    return t, np.stack([alpha[:-1], sigma_vp[:-1], ratio, phi * (1 + half_over_r), -phi * half_over_r], axis=1), 1.0


# --- step formulas: (row, x, eps, noise, prev_x0) -> (x', x0 or None); array-generic ------------


def _ddim_step(c, x, eps, noise, prev):
    if len(c) == 2:  # no clamp: one fused update
        return c[0] * x + c[1] * eps, None
    x0 = ((x - c[3] * eps) / c[2]).clip(-c[6], c[6])  # numpy and torch both have .clip
    return c[4] * x0 + c[5] * eps, None


def _euler_step(c, x, eps, noise, prev):
    return x + c[1] * eps, None


def _euler_a_step(c, x, eps, noise, prev):
    if noise is None:
        raise InputError("euler_a adds fresh noise every step; pass noise (a standard Gaussian like x)")
    return x + c[1] * eps + c[2] * noise, None


def _dpm_step(c, x, eps, noise, prev):
    x0 = (x - c[1] * eps) / c[0]
    return c[2] * x + c[3] * x0 + c[4] * prev, x0


@dataclass(frozen=True)
class SamplerDef:
    name: str
    tables: Callable[[TrainingSchedule, int], tuple[np.ndarray, np.ndarray, float]]
    step: Callable[..., tuple[Any, Any]]
    check: Callable[[TrainingSchedule, int], None] | None = None  # a step count the sampler cannot take
    needs_noise: bool = False
    scales_input: bool = False  # column 0 of the table scales the model input (Euler samplers)
    multistep: bool = False     # keeps the previous x0 (DPM++)


DEFINITIONS: dict[str, SamplerDef] = {
    "ddim": SamplerDef("ddim", _ddim, _ddim_step, check=_ddim_check),
    "euler": SamplerDef("euler", _euler, _euler_step, scales_input=True),
    "euler_a": SamplerDef("euler_a", _euler_a, _euler_a_step, needs_noise=True, scales_input=True),
    "dpm++": SamplerDef("dpm++", _dpm, _dpm_step, multistep=True),
}
assert tuple(DEFINITIONS) == SAMPLER_NAMES


def check_sampler(name: str, steps: int, schedule: TrainingSchedule) -> SamplerDef:
    if name not in DEFINITIONS:
        raise InputError(f"unknown sampler {name!r}; known samplers: {sorted(DEFINITIONS)}")
    T = schedule.num_train_timesteps
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise InputError(f"{name}: num_steps must be an integer in [1, {T}], got {steps!r}")
    d = DEFINITIONS[name]
    if d.check is not None:  # a sampler's own limits inside [1, T], before any work
        d.check(schedule, steps)
    return d


@dataclass
class Tables:
    """Everything a sampler needs at run time, float32 (timesteps int64 or float32)."""

    name: str
    timesteps: np.ndarray       # (N,)
    coef: np.ndarray            # (N, K) float32
    vp: np.ndarray              # (N, 2) float32: (alpha, sigma_vp) of the model input, for v -> epsilon
    init_noise_sigma: float
    definition: SamplerDef

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)


def sampler_tables(name: str, steps: int, schedule: TrainingSchedule | None = None) -> Tables:
    schedule = schedule or training_schedule()
    d = check_sampler(name, steps, schedule)
    t, coef, init = d.tables(schedule, steps)
    sigma = interp_sigmas(schedule, t.astype(np.float64))
    alpha = 1 / np.sqrt(sigma**2 + 1)
    vp = np.stack([alpha, sigma * alpha], axis=1).astype(np.float32)
    return Tables(name, t, np.ascontiguousarray(coef, dtype=np.float32), vp, init, d)


class NumpySampler:
    """A sampler over numpy float32 arrays on :func:`sampler_tables` (the runtime's loop)."""

    def __init__(self, name: str, steps: int, schedule: TrainingSchedule | None = None):
        self.tables = sampler_tables(name, steps, schedule)
        self.definition = self.tables.definition
        self.needs_noise = self.definition.needs_noise
        self.timesteps = self.tables.timesteps
        self.init_noise_sigma = self.tables.init_noise_sigma
        self._prev: np.ndarray | None = None

    def scale_model_input(self, x: np.ndarray, i: int) -> np.ndarray:
        return x * self.tables.coef[i, 0] if self.definition.scales_input else x

    def epsilon(self, i: int, model_input: np.ndarray, output: np.ndarray, prediction_type: str) -> np.ndarray:
        if prediction_type == "epsilon":
            return output
        alpha, sigma_vp = self.tables.vp[i]
        return alpha * output + sigma_vp * model_input

    def step(self, i: int, x: np.ndarray, eps: np.ndarray, noise: np.ndarray | None = None) -> np.ndarray:
        if self.definition.multistep and (self._prev is None or self._prev.shape != x.shape):
            self._prev = np.zeros_like(x, dtype=np.float32)  # weighed by 0 on the first step
        out, x0 = self.definition.step(self.tables.coef[i], x, eps, noise, self._prev)
        if x0 is not None:
            self._prev = x0
        return np.asarray(out, np.float32)

    @property
    def history(self) -> np.ndarray | None:
        """A multistep sampler's memory of earlier steps (DPM++: the last x0), or None."""
        return self._prev

    @history.setter
    def history(self, value: np.ndarray | None) -> None:
        self._prev = None if value is None else np.asarray(value, np.float32)


def nonfinite_error(step: int, steps: int, sampler: str) -> NumericalError:
    """What a denoising loop raises when its latents are NaN or infinite after ``step``
    (1-based) of ``steps``; every loop (reference, runtime, GPU) says it the same way."""
    return NumericalError(f"denoising stopped: the latents became NaN or infinite at step {step} of {steps} "
                          f"(sampler {sampler})")


def check_seed(seed: Any) -> int:
    lo, hi = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not lo <= int(seed) < hi:
        raise InputError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return int(seed)


class SeededNoise:
    """The Gaussian noise of one generation: initial latents, then one draw per
    ancestral step, from numpy's PCG64 seeded with the request's seed. The reference
    pipeline and the runtime draw from this same stream, so a seed gives one video."""

    def __init__(self, seed: int):
        self._rng = np.random.Generator(np.random.PCG64(check_seed(seed)))

    def __call__(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._rng.standard_normal(shape, dtype=np.float32)

    @property
    def state(self) -> dict:
        """The generator's position in the stream (JSON-serialisable), for a resumed loop."""
        return self._rng.bit_generator.state

    @state.setter
    def state(self, value: dict) -> None:
        self._rng.bit_generator.state = value
