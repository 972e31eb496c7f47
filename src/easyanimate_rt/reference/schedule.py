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

SAMPLER_NAMES = ("ddim", "euler", "euler_a", "dpm++", "pndm", "plms")
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
    prediction_type: str = "epsilon"  # what the network predicts; only samplers that convert v in their step read it


def training_schedule(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                      steps_offset: int = 1, clip_sample: float | None = None,
                      prediction_type: str = "epsilon") -> TrainingSchedule:
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
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ConfigError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    start, end = np.float32(beta_start), np.float32(beta_end)
    step = np.float32((end - start) / np.float32(T - 1))
    i = np.arange(T)
    low = (np.float64(start) + np.float64(step) * i).astype(np.float32)
    high = (np.float64(end) - np.float64(step) * (T - 1 - i)).astype(np.float32)
    betas = np.where(i < T // 2, low, high)
    abar = np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)
    sigmas = np.sqrt((np.float32(1.0) - abar) / abar)
    return TrainingSchedule(T, beta_start, beta_end, steps_offset, betas, abar, sigmas,
                            None if clip_sample is None else float(clip_sample), prediction_type)


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


# PNDM (Liu et al. 2022) as diffusers' PNDMScheduler runs it: "leading" timesteps
# t_j = j (T // N) + steps_offset, a pseudo Runge-Kutta warm-up (three 4-call steps at the
# last four timesteps, with half-ratio midpoints) then the 4th-order linear multistep
# (PLMS) on the rest: N + 9 model calls ("pndm": diffusers' default skip_prk_steps=False,
# what upstream EasyAnimate builds from its yaml). With skip_prk_steps ("plms": crowsonkb's
# PLMS) the first step is a Heun-like pair of calls and the multistep order ramps 1..4:
# N + 1 calls (1 for N = 1). Every call moves a base sample from t to t' along
#   x' = sqrt(abar'/abar) base - (abar' - abar) e / (abar sqrt(1 - abar') + sqrt(abar (1 - abar) abar'))
# (PNDM's eq. 9; abar' = abar[0] past t = 0, diffusers' set_alpha_to_one=False), with e a
# fixed combination of this call's eps and a history H of five arrays like x:
# H0 the base sample, H1 the Runge-Kutta sum, H2..H4 the last three eps kept. A v network's
# outputs go in unconverted (the tables' vp is (1, 0)) and the combined v is converted at the
# base sample inside the step, as diffusers does (folded into s and d).
# Table columns, one row per model call:
_PNDM_COLUMNS = ("s", "d", "u", "k", "w0", "wa", "w1", "w2", "w3", "ra", "va", "a")
#   base = u x + (1 - u) H0;  e = w0 eps + wa H1 + w1 H2 + w2 H3 + w3 H4;  x' = s base - d e
#   H0 <- k x + (1 - k) H0;  H1 <- ra H1 + va eps;  a = 1 pushes eps onto H2..H4 (H2 newest)
_PLMS_WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12),
                 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _pndm_timesteps(s: TrainingSchedule, N: int, prk: bool) -> tuple[np.ndarray, np.ndarray, int]:
    """diffusers' ``set_timesteps`` ("leading"): (the PRK calls' timesteps, PLMS's, T // N)."""
    ratio = s.num_train_timesteps // N
    base = np.arange(N, dtype=np.int64) * ratio + s.steps_offset
    if not prk:
        return np.zeros(0, np.int64), np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1], ratio
    last = np.repeat(base[-4:], 2) + np.tile(np.array([0, ratio // 2]), 4)
    return np.repeat(last[:-1], 2)[1:-1][::-1], base[:-3][::-1], ratio


def _pndm_check_for(prk: bool):
    name = "pndm" if prk else "plms"

    def check(s: TrainingSchedule, N: int) -> None:
        if prk and N < 4:
            raise InputError(f"pndm: its Runge-Kutta warm-up runs on the last four timesteps, so it needs at least 4 "
                             f"steps, got {N} (plms, PNDM without the warm-up, takes any count)")
        P, L, _ = _pndm_timesteps(s, N, prk)
        top, T = int(max(P.max(initial=0), L.max(initial=0))), s.num_train_timesteps
        if top >= T:  # the same leading spacing as DDIM's: N = T with steps_offset 1 reaches T
            fits = next((n for n in range(N - 1, 0, -1) if (n - 1) * (T // n) + s.steps_offset < T), None)
            raise InputError(f"{name}: {N} steps reach timestep {top}, past the schedule's last, {T - 1}"
                             + (f"; use at most {fits} steps" if fits else ""))

    return check


def _pndm_tables_for(prk: bool):
    def tables(s: TrainingSchedule, N: int):
        _pndm_check_for(prk)(s, N)
        P, L, ratio = _pndm_timesteps(s, N, prk)
        abar = s.alphas_cumprod.astype(np.float64)
        alpha = lambda t: abar[t] if t >= 0 else abar[0]  # noqa: E731  (set_alpha_to_one=False)
        rows, kept = [], 0  # kept: eps values in diffusers' ets (it keeps the last 4, we keep 3 + this one)
        for c, t in enumerate(P):  # PRK: four calls per step, all from the step's first sample
            t_from, t_to = int(P[c // 4 * 4]), int(t) - (0 if c % 2 else ratio // 2)
            phase = c % 4
            w0, wa = (1.0, 0.0) if phase < 3 else (1 / 6, 1.0)
            ra, va = ((0.0, 1 / 6), (1.0, 1 / 3), (1.0, 1 / 3), (0.0, 0.0))[phase]
            rows.append((t_from, t_to, 1.0 if phase == 0 else 0.0, 1.0 if phase == 0 else 0.0,
                         w0, wa, 0.0, 0.0, 0.0, ra, va, 1.0 if phase == 0 else 0.0))
            kept += phase == 0
        for j, t in enumerate(L):  # PLMS; call j of skip_prk_steps' counter
            t = int(t)
            if not prk and j == 1:  # the second call re-takes the first step with the mean of both eps
                rows.append((t + ratio, t, 0.0, 0.0, 0.5, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0))
                continue
            kept = min(kept + 1, 4)
            w = _PLMS_WEIGHTS[kept] + (0.0,) * (4 - kept)
            rows.append((t, t - ratio, 1.0, 1.0 if (not prk and j == 0) else 0.0, w[0], 0.0, w[1], w[2], w[3],
                         0.0, 0.0, 1.0))
        out = []
        for t_from, t_to, *rest in rows:
            a_t, a_p = alpha(t_from), alpha(t_to)
            sc = np.sqrt(a_p / a_t)
            d = (a_p - a_t) / (a_t * np.sqrt(1 - a_p) + np.sqrt(a_t * (1 - a_t) * a_p))
            if s.prediction_type == "v_prediction":  # diffusers: e = sqrt(abar) v + sqrt(1 - abar) base, in the step
                sc, d = sc - d * np.sqrt(1 - a_t), d * np.sqrt(a_t)
            out.append((sc, d, *rest))
        return np.concatenate([P, L]).astype(np.int64), np.array(out, np.float64), 1.0

    return tables


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


def _pndm_step(c, x, eps, noise, h):
    """One PNDM/PLMS call (the columns above); updates the history ``h`` (5, ...) in place."""
    s, d, u, k, w0, wa, w1, w2, w3, ra, va, a = c
    e = w0 * eps + wa * h[1] + w1 * h[2] + w2 * h[3] + w3 * h[4]
    out = s * (u * x + (1 - u) * h[0]) - d * e
    h[4] = a * h[3] + (1 - a) * h[4]
    h[3] = a * h[2] + (1 - a) * h[3]
    h[2] = a * eps + (1 - a) * h[2]
    h[1] = ra * h[1] + va * eps
    h[0] = k * x + (1 - k) * h[0]
    return out, None


@dataclass(frozen=True)
class SamplerDef:
    name: str
    tables: Callable[[TrainingSchedule, int], tuple[np.ndarray, np.ndarray, float]]
    step: Callable[..., tuple[Any, Any]]
    check: Callable[[TrainingSchedule, int], None] | None = None  # a step count the sampler cannot take
    needs_noise: bool = False
    scales_input: bool = False  # column 0 of the table scales the model input (Euler samplers)
    multistep: bool = False     # keeps a history between steps (DPM++: the previous x0; PNDM: H)
    v_in_step: bool = False     # with a v network the step takes v and converts it itself (vp = (1, 0))
    history_slots: int = 1      # a multistep history of this many arrays like x (1: x's shape, else stacked first)

    def history_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(shape) if self.history_slots == 1 else (self.history_slots, *shape)


DEFINITIONS: dict[str, SamplerDef] = {
    "ddim": SamplerDef("ddim", _ddim, _ddim_step, check=_ddim_check),
    "euler": SamplerDef("euler", _euler, _euler_step, scales_input=True),
    "euler_a": SamplerDef("euler_a", _euler_a, _euler_a_step, needs_noise=True, scales_input=True),
    "dpm++": SamplerDef("dpm++", _dpm, _dpm_step, multistep=True),
    "pndm": SamplerDef("pndm", _pndm_tables_for(True), _pndm_step, check=_pndm_check_for(True), multistep=True,
                       history_slots=5, v_in_step=True),
    "plms": SamplerDef("plms", _pndm_tables_for(False), _pndm_step, check=_pndm_check_for(False), multistep=True,
                       history_slots=5, v_in_step=True),
}
assert tuple(DEFINITIONS) == SAMPLER_NAMES


def model_calls(name: str, steps: int, schedule: TrainingSchedule | None = None) -> int:
    """How many model calls ``steps`` steps of sampler ``name`` make (a loop's length)."""
    return sampler_tables(name, steps, schedule).calls


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
    def calls(self) -> int:
        """Model calls of the loop (rows of the tables): the steps, but N + 9 for PNDM and
        N + 1 for PLMS."""
        return len(self.timesteps)


def sampler_tables(name: str, steps: int, schedule: TrainingSchedule | None = None) -> Tables:
    schedule = schedule or training_schedule()
    d = check_sampler(name, steps, schedule)
    t, coef, init = d.tables(schedule, steps)
    sigma = interp_sigmas(schedule, t.astype(np.float64))
    alpha = 1 / np.sqrt(sigma**2 + 1)
    vp = np.stack([alpha, sigma * alpha], axis=1).astype(np.float32)
    if d.v_in_step and schedule.prediction_type == "v_prediction":
        vp = np.stack([np.ones_like(alpha), np.zeros_like(alpha)], axis=1).astype(np.float32)
    return Tables(name, t, np.ascontiguousarray(coef, dtype=np.float32), vp, init, d)


class NumpySampler:
    """A sampler over numpy float32 arrays on :func:`sampler_tables` (the runtime's loop)."""

    def __init__(self, name: str, steps: int, schedule: TrainingSchedule | None = None):
        self.tables = sampler_tables(name, steps, schedule)
        self.definition = self.tables.definition
        self.needs_noise = self.definition.needs_noise
        self.timesteps = self.tables.timesteps
        self.calls = self.tables.calls
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
        shape = self.definition.history_shape(x.shape)
        if self.definition.multistep and (self._prev is None or self._prev.shape != shape):
            self._prev = np.zeros(shape, np.float32)  # weighed by 0 on the first step
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
