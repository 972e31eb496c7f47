"""Training noise schedule and the samplers EasyAnimate offers (DESIGN.md 1.4; upstream's
menu: Euler, Euler A, DPM++, PNDM, DDIM; and PLMS, PNDM without its warm-up).

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

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError
from . import schedule
from .config import PREDICTION_TYPES
from .schedule import sampler_tables

Index = int | Tensor


class NoiseSchedule:
    """The DDPM forward process the network was trained with (for either prediction type).

    ``betas``, ``alphas_cumprod`` and ``sigmas`` are float32 on the CPU, bit-equal to
    diffusers' (schedule.training_schedule builds them). They are not the exact values:
    sigma = sqrt((1 - abar) / abar) from float32 abar is up to ~1e-4 off in relative
    terms at the clean end, where 1 - abar cancels. Sampler tables start from these same
    float32 values, which keeps them within 1e-5 of diffusers.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        steps_offset: int = 1,
        clip_sample: float | None = None,
        prediction_type: str = "epsilon",
    ) -> None:
        self.tables = schedule.training_schedule(num_train_timesteps, beta_start, beta_end, steps_offset, clip_sample,
                                                 prediction_type)
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.num_train_timesteps = num_train_timesteps
        self.beta_start = beta_start
        self.beta_end = beta_end
        self.steps_offset = steps_offset
        self.betas = torch.from_numpy(self.tables.betas)  # (T,)
        self.alphas_cumprod = torch.from_numpy(self.tables.alphas_cumprod)  # (T,)
        # Variance-exploding noise level per training step, in float32 like diffusers.
        self.sigmas = torch.from_numpy(self.tables.sigmas)  # (T,)

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


class Sampler:
    """A deterministic-cost sampler: tables built once, a step is table arithmetic.

    The tables and the step formula are schedule.py's (shared with the runtime's numpy
    loop); this class holds them as tensors on ``device``.

    Attributes:
        name: key in ``SAMPLERS``.
        needs_noise: whether ``step`` takes a fresh Gaussian ``noise`` each step.
        timesteps: (N,) the model's timestep input per step, on ``device``. int64 for
            DDIM and DPM++; float32 for the Euler samplers, whose default "linspace"
            spacing gives fractional timesteps (diffusers feeds those to the model).
        init_noise_sigma: scale of the initial Gaussian latents.
        num_steps: N.
        calls: model calls the loop makes, len(timesteps): N, but N + 9 for PNDM and
            N + 1 for PLMS (their index ``i`` counts calls).
    """

    name: ClassVar[str]
    needs_noise: ClassVar[bool] = False

    def __init__(self, schedule: NoiseSchedule, num_steps: int, device: torch.device | str | None = None) -> None:
        tables = sampler_tables(self.name, num_steps, schedule.tables)
        self.definition = tables.definition
        self.schedule = schedule
        self.num_steps = num_steps
        self.calls = tables.calls
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.timesteps = torch.from_numpy(tables.timesteps.copy()).to(self.device)  # (N,)
        self.init_noise_sigma = tables.init_noise_sigma
        self._coef = torch.from_numpy(tables.coef).to(self.device).contiguous()  # (N, K)
        self._vp = torch.from_numpy(tables.vp).to(self.device)  # (N, 2) (alpha, sigma_vp)
        self._prev_x0: Tensor | None = None  # DPM++: x0 of the previous step, updated in place

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
        if not 0 <= i < self.calls:
            raise InputError(f"step index must be in [0, {self.calls}), got {i}")
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
        """The latents as the network should see them at step ``i``."""
        if not self.definition.scales_input:
            return x
        return x * self._row(i)[0].to(x.dtype)

    def step(self, i: Index, x: Tensor, eps: Tensor, noise: Tensor | None = None) -> Tensor:
        """Advance ``x`` from step ``i`` to step ``i + 1`` given the model output ``eps``.

        Computes in float32 and returns a new tensor in ``x``'s dtype.
        """
        x32 = x.float()
        prev = None
        if self.definition.multistep:
            shape = self.definition.history_shape(x32.shape)
            if self._prev_x0 is None or self._prev_x0.shape != shape or self._prev_x0.device != x32.device:
                # Allocated on the first step for this shape, so run one step (a warm-up)
                # before capturing a CUDA graph. Zeros, not empty: the first step weighs the
                # buffer by C = 0, and 0 * NaN would be NaN.
                self._prev_x0 = torch.zeros(shape, dtype=torch.float32, device=x32.device)
            prev = self._prev_x0
        out, x0 = self.definition.step(self._row(i).unbind(), x32, eps.float(),
                                       None if noise is None else noise.float(), prev)
        if x0 is not None:
            self._prev_x0.copy_(x0)
        return out.to(x.dtype)

    @property
    def history(self) -> np.ndarray | None:
        """A multistep sampler's memory of earlier steps (DPM++: the last x0) as a host
        array, or None: what a checkpoint keeps (as NumpySampler.history)."""
        return None if self._prev_x0 is None else self._prev_x0.detach().float().cpu().numpy()

    @history.setter
    def history(self, value: np.ndarray | None) -> None:
        self._prev_x0 = None if value is None else torch.from_numpy(np.asarray(value, np.float32)).to(self.device)

    def reset(self) -> None:
        """Forget multistep state before a new trajectory (harmless: the first step
        weighs the stored x0 by 0)."""
        if self._prev_x0 is not None:
            self._prev_x0.zero_()

    def __len__(self) -> int:
        return self.calls

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_steps={self.num_steps}, device={self.device})"


class DDIMSampler(Sampler):
    """DDIM with eta = 0 (Song et al. 2021, eq. 12), as diffusers' DDIMScheduler.

    Timesteps use "leading" spacing: t_i = (N - 1 - i) * (T // N) + steps_offset. The
    step to t - T // N is x' = sqrt(abar') x0 + sqrt(1 - abar') eps with
    x0 = (x - sqrt(1 - abar) eps) / sqrt(abar); folded into x' = a x + b eps. Past
    t = 0 abar' is 1 (diffusers' set_alpha_to_one), so the last step returns x0.
    With a schedule's ``clip_sample`` c (diffusers' clip_sample=True, range c) x0 is
    clamped to [-c, c] before the update, which then cannot be folded; upstream EasyAnimate
    runs it so (its DDIMScheduler(**yaml kwargs) never sets clip_sample, and diffusers'
    default is True, range 1.0), and the release presets set c = 1.0. A step count
    whose first timestep would pass T - 1 (N = T with steps_offset 1) is an InputError
    (schedule.check_sampler: request validation refuses it before any work).
    """

    name = "ddim"


class EulerSampler(Sampler):
    """Euler's method on the probability-flow ODE dx/dsigma = eps (no churn),
    (Karras et al. 2022, Algorithm 1).

    diffusers' default "linspace" spacing: t_i = linspace(0, T - 1, N) reversed, kept
    fractional, sigma_i interpolated linearly in t, sigma_N = 0 ("zero" final sigma).
    The sampler runs on the variance-exploding latents x = x_vp * sqrt(1 + sigma^2),
    so the model input is x / sqrt(1 + sigma^2) and the initial latents are drawn
    with std sigma_0 (diffusers uses sigma_max, not sqrt(1 + sigma_max^2), here).
    x' = x + (sigma_{i+1} - sigma_i) eps; diffusers' EulerDiscreteScheduler with
    s_churn = 0 is the same update written through x0.
    """

    name = "euler"


class EulerAncestralSampler(Sampler):
    """Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up.

    Timesteps and sigmas as EulerSampler. sigma_up = sqrt(s'^2 (s^2 - s'^2) / s^2) and
    sigma_down = sqrt(s'^2 - sigma_up^2) (k-diffusion's get_ancestors with eta 1), as
    EulerAncestralDiscreteScheduler. diffusers draws the noise itself on every step,
    the last included (where sigma_up = 0); here the caller passes it.
    """

    name = "euler_a"
    needs_noise = True


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

    At N = T the N + 1 linspace points round onto T integers, so one timestep repeats
    (t = 500 twice for T = 1000). The step onto the repeat has h = 0: A = 1, B = C = 0,
    the identity. The step after it is first order (its history x0 is at the same
    noise level, r = 0). diffusers divides by that r and returns NaN from there on; this
    trajectory equals diffusers' on the timesteps with the repeat removed and its
    multistep history restarted after it.
    """

    name = "dpm++"


class PNDMSampler(Sampler):
    """PNDM (Liu et al. 2022) as diffusers' PNDMScheduler with its defaults, which is how
    upstream EasyAnimate builds it (``PNDMScheduler(**noise_scheduler_kwargs)``: no
    skip_prk_steps, so it is False): "leading" timesteps j (T // N) + steps_offset; a
    pseudo Runge-Kutta warm-up of three steps of four model calls each at the last
    four timesteps (midpoints half a step down), then the 4th-order linear multistep
    update on the remaining N - 3: N + 9 model calls, N >= 4. Every call's update is
    PNDM's eq. 9 from a base sample (this call's input, or the warm-up step's first)
    with a fixed combination of this call's eps and a kept history (schedule.py lists
    the table's columns). Past t = 0 abar' is abar[0] (set_alpha_to_one=False).
    For v-prediction networks each call's output is converted to eps first (diffusers
    combines the raw v outputs and converts at the base sample: the same for epsilon
    networks, a different discretisation for v).
    """

    name = "pndm"


class PLMSSampler(Sampler):
    """PNDM with diffusers' ``skip_prk_steps=True`` (crowsonkb's PLMS): no Runge-Kutta
    warm-up; the first step is taken twice (from the first call's eps, then again from
    the same start with the mean of both calls' eps) and the multistep order ramps from
    1 to 4: N + 1 model calls (1 for N = 1). Otherwise as PNDMSampler.
    """

    name = "plms"


SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (DDIMSampler, EulerSampler, EulerAncestralSampler, DPMSolverPP2MSampler,
                              PNDMSampler, PLMSSampler)
}


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
    "PLMSSampler",
    "PNDMSampler",
    "Sampler",
    "make_sampler",
]
