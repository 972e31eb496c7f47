"""Training noise schedule and the four samplers EasyAnimate offers (DESIGN.md 1.4).

Each sampler reproduces the diffusers scheduler of the same name, configured with the
training schedule below and diffusers' defaults otherwise, to float32 precision.

Symbols
    T      number of training timesteps (1000)
    N      number of sampling steps
    i      step index, 0 .. N-1 (a Python int or a 0-d integer tensor)
    t      the model's timestep input at step i (``Sampler.timesteps[i]``)
    abar   cumulative product of (1 - beta) over training steps ("alphas_cumprod")
    sigma  noise level of the variance-exploding view, sqrt((1 - abar) / abar)
    x      latents being denoised; eps the model's epsilon prediction for x
    x0     prediction of the clean latents from x and eps
    K      number of per-step coefficients a sampler keeps

Training schedule: T = 1000, betas linear in 1e-4 .. 0.02, steps_offset 1. Samplers
step on epsilon; a network that predicts v (``DiTConfig.prediction_type``) is converted
by ``Sampler.epsilon`` first: with x_t = alpha x0 + sigma_vp eps (alpha^2 + sigma_vp^2
= 1) and v = alpha eps - sigma_vp x0, eps = alpha v + sigma_vp x_t.

Every coefficient a step needs is computed once, when the sampler is built, into a
float32 table of shape (N, K) on the sampler's device. ``step`` only does arithmetic
with one row of it: no ``.item()``, no Python branch on a tensor value and no host
synchronisation, so a step can be captured in a CUDA graph with ``i`` held in a
device tensor. Tables are derived in float64 from the float32 ``abar`` that diffusers
(and training) use, then rounded to float32.
"""

from __future__ import annotations

import abc
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, InputError
from .config import PREDICTION_TYPES

Index = int | Tensor


class NoiseSchedule:
    """The DDPM forward process the network was trained with (for either prediction type).

    ``betas``, ``alphas_cumprod`` and ``sigmas`` are float32 on the CPU, computed with
    the same float32 operations as diffusers (and so as training). They are not the
    exact values: sigma = sqrt((1 - abar) / abar) from float32 abar is up to ~1e-4 off
    in relative terms at the clean end, where 1 - abar cancels. Sampler tables start
    from these same float32 values, which keeps them within 1e-5 of diffusers.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        steps_offset: int = 1,
    ) -> None:
        if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ConfigError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        if not 0.0 < beta_start < beta_end < 1.0:
            raise ConfigError(
                f"betas must satisfy 0 < beta_start < beta_end < 1, got beta_start={beta_start!r}, "
                f"beta_end={beta_end!r}"
            )
        if not isinstance(steps_offset, int) or steps_offset < 0:
            raise ConfigError(f"steps_offset must be a non-negative integer, got {steps_offset!r}")
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.steps_offset = steps_offset
        self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)  # (T,)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)  # (T,)
        # Variance-exploding noise level per training step, in float32 like diffusers.
        self.sigmas = ((1.0 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (T,)

    def add_noise(self, x0: Tensor, noise: Tensor, t: Index) -> Tensor:
        """Sample q(x_t | x0) = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise.

        ``t`` is an int, a 0-d tensor or a (B,) tensor of timesteps, one per sample
        along the first dimension of ``x0``.
        """
        abar = self.alphas_cumprod.to(device=x0.device, dtype=x0.dtype)
        t = torch.as_tensor(t, device=x0.device)
        abar_t = abar[t].reshape(-1, *([1] * (x0.dim() - 1)))  # (B, 1, ...)
        return abar_t**0.5 * x0 + (1.0 - abar_t) ** 0.5 * noise

    def __repr__(self) -> str:
        return (
            f"NoiseSchedule(num_train_timesteps={self.num_train_timesteps}, beta_start={self.beta_start}, "
            f"beta_end={self.beta_end}, steps_offset={self.steps_offset})"
        )


def _linspace64(stop: float, num: int) -> Tensor:
    """``num`` points from 0 to ``stop`` in float64, rounded exactly as numpy.linspace.

    numpy multiplies arange(num) by one step and pins the last point to ``stop``;
    diffusers builds its timesteps with numpy, and a last-bit difference can flip a
    ``round()`` and move a whole timestep, so the arithmetic is mirrored here.
    """
    if num == 1:
        return torch.zeros(1, dtype=torch.float64)
    y = torch.arange(num, dtype=torch.float64) * (stop / (num - 1))  # (num,)
    y[-1] = stop
    return y


def _interp_sigmas(schedule: NoiseSchedule, t: Tensor) -> Tensor:
    """sigma at fractional training timesteps, linear between integer ones (np.interp's rule)."""
    table = schedule.sigmas.to(torch.float64)  # (T,)
    lo = t.floor().long().clamp(0, schedule.num_train_timesteps - 2)
    frac = t - lo.to(torch.float64)
    return table[lo] + (table[lo + 1] - table[lo]) * frac


class Sampler(abc.ABC):
    """A deterministic-cost sampler: tables built once, a step is table arithmetic.

    Attributes:
        name: key in ``SAMPLERS``.
        needs_noise: whether ``step`` takes a fresh Gaussian ``noise`` each step.
        timesteps: (N,) the model's timestep input per step, on ``device``. int64 for
            DDIM and DPM++; float32 for the Euler samplers, whose default "linspace"
            spacing gives fractional timesteps (diffusers feeds those to the model).
        init_noise_sigma: scale of the initial Gaussian latents.
        num_steps: N.
    """

    name: ClassVar[str]
    needs_noise: ClassVar[bool] = False

    def __init__(self, schedule: NoiseSchedule, num_steps: int, device: torch.device | str | None = None) -> None:
        _check_steps(self.name, num_steps, schedule)
        self.schedule = schedule
        self.num_steps = num_steps
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        timesteps, coef, self.init_noise_sigma = self._build()
        self.timesteps = timesteps.to(self.device)  # (N,)
        self._coef = coef.to(device=self.device, dtype=torch.float32).contiguous()  # (N, K)
        # (alpha, sigma_vp) of the model input at each step, for v -> epsilon.
        sigma = _interp_sigmas(schedule, timesteps.to(torch.float64))  # (N,)
        alpha = 1 / (sigma**2 + 1).sqrt()
        self._vp = torch.stack([alpha, sigma * alpha], dim=1).to(device=self.device, dtype=torch.float32)

    @abc.abstractmethod
    def _build(self) -> tuple[Tensor, Tensor, float]:
        """Return (timesteps (N,), float64 coefficients (N, K), init_noise_sigma)."""

    def _row(self, i: Index, table: Tensor | None = None) -> Tensor:
        """Row ``i`` of a per-step table (default: the step coefficients, (K,)), for an
        int or a 0-d integer tensor index.

        A tensor index should live on the sampler's device (for CUDA graphs).
        """
        table = self._coef if table is None else table
        if isinstance(i, Tensor):
            # index_select stays on the device; plain table[i] with a 0-d CUDA tensor
            # reads the index back to the host (a sync, which breaks graph capture).
            return table.index_select(0, i.reshape(1).to(table.device)).squeeze(0)
        if not 0 <= i < self.num_steps:
            raise InputError(f"step index must be in [0, {self.num_steps}), got {i}")
        return table[i]

    def epsilon(self, i: Index, model_input: Tensor, output: Tensor, prediction_type: str) -> Tensor:
        """The epsilon ``step`` expects from the network's (guided) ``output`` at step ``i``.

        ``model_input`` is what the network saw (``scale_model_input``'s result). Identity
        for epsilon networks; eps = alpha v + sigma_vp x_t for v networks, in float32.
        """
        if prediction_type == "epsilon":
            return output
        if prediction_type not in PREDICTION_TYPES:
            raise InputError(f"prediction_type must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
        alpha, sigma_vp = self._row(i, self._vp).unbind()
        return alpha * output.float() + sigma_vp * model_input.float()

    def scale_model_input(self, x: Tensor, i: Index) -> Tensor:
        """The latents as the network should see them at step ``i`` (identity here)."""
        return x

    @abc.abstractmethod
    def step(self, i: Index, x: Tensor, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        """Advance ``x`` from step ``i`` to step ``i + 1`` given the model output ``eps``.

        Computes in float32 and returns a new tensor in ``x``'s dtype.
        """

    def reset(self) -> None:
        """Forget multistep state before a new trajectory (no state here)."""

    def __len__(self) -> int:
        return self.num_steps

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, device={self.device})"


class DDIMSampler(Sampler):
    """DDIM with eta = 0 (Song et al. 2021, eq. 12), as diffusers' DDIMScheduler.

    Timesteps use "leading" spacing: t_i = (N - 1 - i) * (T // N) + steps_offset. The
    step to t - T // N is x' = sqrt(abar') x0 + sqrt(1 - abar') eps with
    x0 = (x - sqrt(1 - abar) eps) / sqrt(abar); folded into x' = a x + b eps. Past
    t = 0 abar' is 1 (diffusers' set_alpha_to_one), so the last step returns x0.
    No clipping of x0 (clip_sample=False, as EasyAnimate configures it).
    """

    name = "ddim"

    def _build(self) -> tuple[Tensor, Tensor, float]:
        T, N = self.schedule.num_train_timesteps, self.num_steps
        ratio = T // N
        t = torch.arange(N - 1, -1, -1, dtype=torch.int64) * ratio + self.schedule.steps_offset  # (N,)
        if int(t[0]) >= T:
            raise InputError(
                f"ddim with steps_offset {self.schedule.steps_offset} reaches timestep {int(t[0])} >= {T} "
                f"at {N} steps; use fewer steps"
            )
        abar = self.schedule.alphas_cumprod.to(torch.float64)
        prev = t - ratio
        abar_t = abar[t]
        abar_prev = torch.where(prev >= 0, abar[prev.clamp(min=0)], torch.ones_like(abar_t))
        a = (abar_prev / abar_t).sqrt()
        b = (1 - abar_prev).sqrt() - (abar_prev * (1 - abar_t) / abar_t).sqrt()
        return t, torch.stack([a, b], dim=1), 1.0  # (N,), (N, 2)

    def step(self, i: Index, x: Tensor, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        a, b = self._row(i).unbind()
        return (a * x.float() + b * eps.float()).to(x.dtype)


class _EulerBase(Sampler):
    """Shared set-up of the two Euler samplers (Karras et al. 2022, Algorithm 1 / 2).

    diffusers' default "linspace" spacing: t_i = linspace(0, T - 1, N) reversed, kept
    fractional, sigma_i interpolated linearly in t, sigma_N = 0 ("zero" final sigma).
    The sampler runs on the variance-exploding latents x = x_vp * sqrt(1 + sigma^2),
    so the model input is x / sqrt(1 + sigma^2) and the initial latents are drawn
    with std sigma_0 (diffusers uses sigma_max, not sqrt(1 + sigma_max^2), here).
    """

    def _sigmas(self) -> tuple[Tensor, Tensor]:
        T = self.schedule.num_train_timesteps
        t = _linspace64(T - 1, self.num_steps).flip(0).to(torch.float32)  # (N,)
        # diffusers stores sigmas as float32; the step coefficients derive from those.
        sigma = _interp_sigmas(self.schedule, t.to(torch.float64)).to(torch.float32)
        sigma = torch.cat([sigma, sigma.new_zeros(1)]).to(torch.float64)  # (N+1,)
        return t, sigma

    def scale_model_input(self, x: Tensor, i: Index) -> Tensor:
        return x * self._row(i)[0].to(x.dtype)


class EulerSampler(_EulerBase):
    """Euler's method on the probability-flow ODE dx/dsigma = eps (no churn).

    x' = x + (sigma_{i+1} - sigma_i) eps; diffusers' EulerDiscreteScheduler with
    s_churn = 0 is the same update written through x0.
    """

    name = "euler"

    def _build(self) -> tuple[Tensor, Tensor, float]:
        t, sigma = self._sigmas()
        scale = 1 / (sigma[:-1] ** 2 + 1).sqrt()
        dt = sigma[1:] - sigma[:-1]
        return t, torch.stack([scale, dt], dim=1), float(sigma[0])  # (N,), (N, 2)

    def step(self, i: Index, x: Tensor, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        _, dt = self._row(i).unbind()
        return (x.float() + dt * eps.float()).to(x.dtype)


class EulerAncestralSampler(_EulerBase):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up.

    sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2) and sigma_down = sqrt(s'^2 - sigma_up^2)
    (k-diffusion's get_ancestors with eta 1), as EulerAncestralDiscreteScheduler.
    diffusers draws the noise itself on every step, the last included (where
    sigma_up = 0); here the caller passes it.
    """

    name = "euler_a"
    needs_noise = True

    def _build(self) -> tuple[Tensor, Tensor, float]:
        t, sigma = self._sigmas()
        s, s_next = sigma[:-1], sigma[1:]
        scale = 1 / (s**2 + 1).sqrt()
        sigma_up = (s_next**2 * (s**2 - s_next**2) / s**2).sqrt()
        sigma_down = (s_next**2 - sigma_up**2).clamp(min=0).sqrt()
        dt = sigma_down - s
        return t, torch.stack([scale, dt, sigma_up], dim=1), float(sigma[0])  # (N,), (N, 3)

    def step(self, i: Index, x: Tensor, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        if noise is None:
            raise InputError("euler_a adds fresh noise every step; pass noise (a standard Gaussian like x)")
        _, dt, sigma_up = self._row(i).unbind()
        return (x.float() + dt * eps.float() + sigma_up * noise.float()).to(x.dtype)


class DPMSolverPP2MSampler(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2, midpoint form), data prediction.

    Matches DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
    solver_type="midpoint", lower_order_final=True) with its defaults: "linspace"
    spacing t_i = round(linspace(0, T - 1, N + 1))[::-1][:N] (steps_offset is ignored
    by that spacing) and final sigma 0.

    With lambda = log(alpha / sigma_vp) = -log(sigma) and h = lambda' - lambda,
        x0 = (x - sigma_vp eps) / alpha
        x' = (sigma_vp' / sigma_vp) x + phi (x0 + (x0 - x0_prev) / (2 r)),
        phi = alpha' (1 - e^-h),  r = h_prev / h,
    tabulated as x' = A x + B x0 + C x0_prev. Steps that are first order get C = 0,
    B = phi: the first one (no history yet) and the last one. diffusers makes the last
    step first order whenever the final sigma is 0, whatever N (lower_order_final
    alone would only do so below 15 steps); there h is infinite, r = 0 and the
    second-order term would be 0 * inf. That last step returns x0 exactly.
    """

    name = "dpm++"

    def __init__(self, schedule: NoiseSchedule, num_steps: int, device: torch.device | str | None = None) -> None:
        super().__init__(schedule, num_steps, device)
        self._prev_x0: Tensor | None = None  # x0 of the previous step, updated in place

    def _build(self) -> tuple[Tensor, Tensor, float]:
        T, N = self.schedule.num_train_timesteps, self.num_steps
        t = _linspace64(T - 1, N + 1).round().flip(0)[:N].to(torch.int64)  # (N,)
        sigma = self.schedule.sigmas[t].to(torch.float64)
        sigma = torch.cat([sigma, sigma.new_zeros(1)])  # (N+1,)
        alpha = 1 / (sigma**2 + 1).sqrt()  # VP signal scale
        sigma_vp = sigma * alpha
        s, s_next = sigma[:-1], sigma[1:]
        ratio = sigma_vp[1:] / sigma_vp[:-1]  # (N,)
        phi = alpha[1:] * (1 - s_next / s)  # e^-h = sigma' / sigma
        # r_i = h_{i-1} / h_i, defined for 0 < i < N-1 (finite sigmas on both sides).
        h = torch.log(s / s_next.clamp(min=torch.finfo(torch.float64).tiny))  # (N,)
        second = torch.zeros(N, dtype=torch.bool)
        second[1 : N - 1] = True
        r = torch.ones(N, dtype=torch.float64)
        r[1 : N - 1] = h[: N - 2] / h[1 : N - 1]
        half_over_r = torch.where(second, 0.5 / r, torch.zeros_like(r))
        coef = torch.stack(
            [alpha[:-1], sigma_vp[:-1], ratio, phi * (1 + half_over_r), -phi * half_over_r], dim=1
        )  # (N, 5)
        return t, coef, 1.0

    def reset(self) -> None:
        """Zero the stored x0; harmless anyway, as the first step weighs it by 0."""
        if self._prev_x0 is not None:
            self._prev_x0.zero_()

    def step(self, i: Index, x: Tensor, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        alpha, sigma_vp, a, b, c = self._row(i).unbind()
        x32 = x.float()
        x0 = (x32 - sigma_vp * eps.float()) / alpha
        if self._prev_x0 is None or self._prev_x0.shape != x0.shape or self._prev_x0.device != x0.device:
            # Allocated on the first step for this shape, so run one step (a warm-up)
            # before capturing a CUDA graph. Zeros, not empty: the first step weighs the
            # buffer by C = 0, and 0 * NaN would be NaN.
            self._prev_x0 = torch.zeros_like(x0)
        out = a * x32 + b * x0 + c * self._prev_x0
        self._prev_x0.copy_(x0)
        return out.to(x.dtype)


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDIMSampler, EulerSampler, EulerAncestralSampler, DPMSolverPP2MSampler)
}


def _check_steps(name: str, num_steps: int, schedule: NoiseSchedule) -> None:
    T = schedule.num_train_timesteps
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= T:
        raise InputError(f"{name}: num_steps must be an integer in [1, {T}], got {num_steps!r}")


def make_sampler(
    name: str,
    num_steps: int,
    schedule: NoiseSchedule | None = None,
    device: torch.device | str | None = None,
) -> Sampler:
    """Build the sampler ``name`` (a key of ``SAMPLERS``) for ``num_steps`` steps."""
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; known samplers: {sorted(SAMPLERS)}")
    return SAMPLERS[name](schedule if schedule is not None else NoiseSchedule(), num_steps, device)


__all__ = [
    "SAMPLERS",
    "DDIMSampler",
    "DPMSolverPP2MSampler",
    "EulerAncestralSampler",
    "EulerSampler",
    "NoiseSchedule",
    "Sampler",
    "make_sampler",
]
