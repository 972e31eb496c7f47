"""The samplers against diffusers' schedulers, configured with the training schedule.

Two kinds of trajectory comparison:

- closed loop: each implementation denoises its own latents with the same fake model
  (an exact denoiser towards fixed data plus a smooth perturbation), as in a real
  pipeline. Model inputs at every step and the final sample must agree to 1e-5.
- teacher forced: both get the same random eps at every step, whatever their latents.
  Nothing pulls the trajectory back, so float32 rounding from the noisy steps is
  amplified by up to 1 / sqrt(abar_first) (~100x); diffusers' own float32 result is
  ~5e-5 away from its float64 result at 25 steps. The check is therefore relative
  to the trajectory's scale, where a wrong coefficient would still show as >1e-4.
"""

from __future__ import annotations

import pytest
import torch
from needs import require

from easyanimate_rt.errors import InputError
from easyanimate_rt.reference.samplers import SAMPLERS, NoiseSchedule, make_sampler

TOL = {
    "closed_loop_abs": 1e-5,  # model inputs and final sample, closed loop
    "forced_rel": 1e-5,  # max |dx| / max |x_ref| per step, teacher forced
    "add_noise_abs": 1e-6,
    # ~1000 closed-loop steps accumulate float32 rounding in both implementations
    # (measured 1.5e-5 at 999 steps, ddim and dpm++)
    "closed_loop_abs_1000_steps": 5e-5,
    # PLMS at 7 steps: its first step is taken twice from t = 858 (abar 0.02), where float32
    # rounding of the model inputs is amplified; against diffusers' own algorithm run in
    # float64, ours is 1.25e-5 away at worst and diffusers' float32 run 0.82e-5.
    "closed_loop_abs_pndm": 2e-5,
}
STEPS = (7, 25, 30)
# One or two steps jump from t=999 straight to x0, multiplying rounding by 1/sqrt(abar_999)
# ~ 157 in both implementations: only the scale-relative check is meaningful there.
FEW_STEPS = (1, 2)
SHAPE = (1, 4, 2, 8, 8)  # (B, C, F, H, W)
TRAIN = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", steps_offset=1)


def reference(name: str, prediction_type: str = "epsilon"):
    """The diffusers scheduler ``name`` corresponds to, otherwise at its defaults."""
    diffusers = require("diffusers")  # a test-only dependency
    train = dict(TRAIN, prediction_type=prediction_type)
    if name == "ddim":
        return diffusers.DDIMScheduler(**train, clip_sample=False)
    if name == "euler":
        return diffusers.EulerDiscreteScheduler(**train)
    if name == "euler_a":
        return diffusers.EulerAncestralDiscreteScheduler(**train)
    if name == "dpm++":
        return diffusers.DPMSolverMultistepScheduler(
            **train, algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True
        )
    if name in ("pndm", "plms"):  # upstream's PNDMScheduler(**yaml kwargs): skip_prk_steps at its default, False
        return diffusers.PNDMScheduler(**train, skip_prk_steps=name == "plms")
    raise AssertionError(name)


ABAR = NoiseSchedule().alphas_cumprod
DATA = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).clamp(-2, 2)


def fake_model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps of an exact denoiser towards DATA, plus a smooth x- and t-dependent term."""
    abar = float(ABAR[round(float(t))])
    return (x_in - abar**0.5 * DATA) / (1 - abar) ** 0.5 + 0.1 * torch.sin(2 * x_in + float(t) / 100)


def fake_v_model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The same denoiser as ``fake_model`` in the v parameterisation: v = (eps - s x) / a."""
    abar = float(ABAR[round(float(t))])
    return (fake_model(x_in, t) - (1 - abar) ** 0.5 * x_in) / abar**0.5


def run_pair(name: str, num_steps: int, forced: bool, prediction_type: str = "epsilon"):
    """Run ours and diffusers side by side; yield (ours, theirs, model inputs, latents) per step."""
    ours, theirs = make_sampler(name, num_steps, NoiseSchedule(prediction_type=prediction_type)), \
        reference(name, prediction_type)
    theirs.set_timesteps(num_steps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.init_noise_sigma == float(theirs.init_noise_sigma)

    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x_a, x_b = latents * ours.init_noise_sigma, latents * theirs.init_noise_sigma
    # Same seed, same draws: diffusers' ancestral step calls torch.randn(shape, generator=...).
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    gen_eps = torch.Generator().manual_seed(2)
    assert ours.calls == len(theirs.timesteps)  # model calls (PNDM: N + 9, PLMS: N + 1)
    for i in range(ours.calls):
        t = theirs.timesteps[i]
        in_a, in_b = ours.scale_model_input(x_a, i), theirs.scale_model_input(x_b, t)
        if forced:
            eps_a = eps_b = torch.randn(SHAPE, generator=gen_eps)
        elif prediction_type == "v_prediction":
            # diffusers converts v inside its step; ours converts before the step.
            eps_a = ours.epsilon(i, in_a, fake_v_model(in_a, ours.timesteps[i]), prediction_type)
            eps_b = fake_v_model(in_b, t)
        else:
            eps_a, eps_b = fake_model(in_a, ours.timesteps[i]), fake_model(in_b, t)
        noise = torch.randn(SHAPE, generator=gen_a) if ours.needs_noise else None
        kwargs = {"generator": gen_b} if name == "euler_a" else {}
        x_a = ours.step(i, x_a, eps_a, noise)
        x_b = theirs.step(eps_b, t, x_b, **kwargs).prev_sample
        yield in_a, in_b, x_a, x_b


@pytest.mark.parametrize("num_steps", STEPS)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_matches_diffusers_closed_loop(name, num_steps):
    worst = 0.0
    for in_a, in_b, x_a, x_b in run_pair(name, num_steps, forced=False):
        worst = max(worst, (in_a - in_b).abs().max().item())
    worst = max(worst, (x_a - x_b).abs().max().item())
    tol = TOL["closed_loop_abs_pndm" if name in ("pndm", "plms") else "closed_loop_abs"]
    assert worst <= tol, f"{name} x{num_steps}: max abs diff {worst:.3g}"
    # The fake model pulls every sampler onto DATA; PNDM's multistep extrapolation over 7
    # steps of 142 overshoots it (diffusers' own result is 0.63 (plms), 0.29 (pndm) away).
    assert (x_b - DATA).abs().max() < (0.7 if name in ("pndm", "plms") and num_steps < 25 else 0.1)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_v_prediction_matches_diffusers_closed_loop(name):
    worst = 0.0
    for in_a, in_b, x_a, x_b in run_pair(name, 25, forced=False, prediction_type="v_prediction"):
        worst = max(worst, (in_a - in_b).abs().max().item())
    worst = max(worst, (x_a - x_b).abs().max().item())
    assert worst <= TOL["closed_loop_abs"], f"{name} v-prediction: max abs diff {worst:.3g}"
    assert (x_b - DATA).abs().max() < 0.1


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_epsilon_from_v_is_exact_at_every_step(name):
    """x_t = alpha x0 + sigma eps and v = alpha eps - sigma x0 give back eps, at every
    step (t = 999 included, where alpha = 0.0064), for int and tensor step indices."""
    sampler = make_sampler(name, 25)
    sigmas = NoiseSchedule().sigmas.double()
    x0, eps = torch.randn(SHAPE).double(), torch.randn(SHAPE).double()
    for i in range(25):
        t = float(sampler.timesteps[i])
        lo = min(int(t), 998)
        sigma = float(sigmas[lo] + (sigmas[lo + 1] - sigmas[lo]) * (t - lo))  # np.interp, independently
        alpha, sigma_vp = (1 + sigma**2) ** -0.5, sigma * (1 + sigma**2) ** -0.5
        x_t, v = (alpha * x0 + sigma_vp * eps).float(), (alpha * eps - sigma_vp * x0).float()
        for index in (i, torch.tensor(i)):
            got = sampler.epsilon(index, x_t, v, "v_prediction")
            assert (got.double() - eps).abs().max() < 1e-5, (i, t)
    assert sampler.epsilon(0, x_t, v, "epsilon") is v
    with pytest.raises(InputError, match="prediction_type"):
        sampler.epsilon(0, x_t, v, "sample")


@pytest.mark.parametrize("num_steps", FEW_STEPS + (4,) + STEPS)
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_matches_diffusers_teacher_forced(name, num_steps):
    if name == "pndm" and num_steps < 4:  # refused: test_pndm_needs_four_steps
        return
    worst = 0.0
    for _, _, x_a, x_b in run_pair(name, num_steps, forced=True):
        worst = max(worst, (x_a - x_b).abs().max().item() / max(1.0, x_b.abs().max().item()))
    assert worst <= TOL["forced_rel"], f"{name} x{num_steps}: max relative diff {worst:.3g}"


# The most steps each sampler takes at T = 1000 (ddim: 1000 would start past timestep 999)
# and one below; dpm++ at 1000 repeats a timestep, where diffusers returns NaN (below).
EDGE = [("ddim", 999), ("euler", 999), ("euler", 1000), ("euler_a", 1000), ("dpm++", 998), ("dpm++", 999),
        ("pndm", 999), ("plms", 999)]


@pytest.mark.parametrize("name,num_steps", EDGE)
def test_matches_diffusers_teacher_forced_at_the_most_steps(name, num_steps):
    worst = 0.0
    for _, _, x_a, x_b in run_pair(name, num_steps, forced=True):
        worst = max(worst, (x_a - x_b).abs().max().item() / max(1.0, x_b.abs().max().item()))
    assert torch.isfinite(x_a).all()
    assert worst <= TOL["forced_rel"], f"{name} x{num_steps}: max relative diff {worst:.3g}"


def _dpm_1000_pair(model, restart: bool):
    """dpm++ at 1000 steps (t = 500 twice) against diffusers on its own 1000 timesteps with
    the repeat removed (999 steps; ``restart``: its multistep history reset after the
    repeat, as ours). Yields (ours, theirs) latents at every timestep both visit."""
    ours, theirs = make_sampler("dpm++", 1000), reference("dpm++")
    theirs.set_timesteps(1000)
    assert torch.equal(ours.timesteps, theirs.timesteps)  # diffusers' timesteps, the repeat included
    t_all = ours.timesteps.tolist()
    repeat = [i for i in range(1, 1000) if t_all[i] == t_all[i - 1]]
    assert repeat == [500] and t_all[500] == 500
    theirs.set_timesteps(timesteps=t_all[:500] + t_all[501:])
    x_a = x_b = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    j = 0
    for i, t in enumerate(ours.timesteps):
        eps = model(x_a, t)
        if i == 499:  # the step onto the repeat is the identity
            assert torch.equal(ours.step(i, x_a, eps), x_a)
            continue
        x_a = ours.step(i, x_a, eps)
        t_b = theirs.timesteps[j]
        assert t_b == t
        if restart and i == 500:
            theirs.lower_order_nums = 0  # first order after the repeat
        x_b = theirs.step(model(x_b, t_b), t_b, x_b).prev_sample
        j += 1
        yield x_a, x_b


def test_dpm_at_1000_steps_is_diffusers_without_the_repeated_timestep():
    """A fixed random eps per timestep (the same eps at both visits of t = 500): equal to
    diffusers on the deduplicated timesteps with the history restarted after the repeat,
    to the teacher-forced tolerance; closed loop, equal to plain deduplicated diffusers
    (diffusers before 0.2x dropped repeats this way), the first-order step costs nothing."""
    table = torch.randn((1000, *SHAPE), generator=torch.Generator().manual_seed(2))
    worst = 0.0
    for x_a, x_b in _dpm_1000_pair(lambda x, t: table[int(t)], restart=True):
        worst = max(worst, (x_a - x_b).abs().max().item() / max(1.0, x_b.abs().max().item()))
    assert torch.isfinite(x_a).all()
    assert worst <= TOL["forced_rel"], f"max relative diff {worst:.3g}"
    worst = 0.0
    for x_a, x_b in _dpm_1000_pair(fake_model, restart=False):
        worst = max(worst, (x_a - x_b).abs().max().item())
    assert worst <= TOL["closed_loop_abs_1000_steps"], f"max abs diff {worst:.3g}"
    assert (x_a - DATA).abs().max() < 0.1


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_tensor_index_equals_int_index(name):
    by_int, by_tensor = make_sampler(name, 9), make_sampler(name, 9)
    gen = torch.Generator().manual_seed(3)
    x_int = x_tensor = torch.randn(SHAPE, generator=gen) * by_int.init_noise_sigma
    for i in range(9):
        eps, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
        index = torch.tensor(i)
        assert torch.equal(by_int.scale_model_input(x_int, i), by_tensor.scale_model_input(x_tensor, index))
        x_int = by_int.step(i, x_int, eps, noise)
        x_tensor = by_tensor.step(index, x_tensor, eps, noise)
        assert torch.equal(x_int, x_tensor), f"{name} step {i}"


def test_dpm_reset_restarts_the_multistep_history():
    sampler = make_sampler("dpm++", 6)
    gen = torch.Generator().manual_seed(4)
    x_start = torch.randn(SHAPE, generator=gen)
    eps = [torch.randn(SHAPE, generator=gen) for _ in range(6)]

    def trajectory():
        x = x_start
        for i in range(6):
            x = sampler.step(i, x, eps[i])
        return x

    first = trajectory()
    sampler.reset()
    assert torch.equal(trajectory(), first)


def test_step_keeps_dtype_and_does_not_touch_inputs():
    sampler = make_sampler("ddim", 5)
    x = torch.randn(SHAPE, dtype=torch.bfloat16)
    eps = torch.randn(SHAPE, dtype=torch.bfloat16)
    x_copy = x.clone()
    out = sampler.step(0, x, eps)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(x, x_copy)
    # Computed in float32 and rounded once: the float32 step of the same values.
    assert torch.equal(out, sampler.step(0, x.float(), eps.float()).bfloat16())


@pytest.mark.parametrize("t", [0, 500, 999, torch.tensor(321), torch.tensor([0, 17, 500, 999])])
def test_add_noise_matches_diffusers(t):
    gen = torch.Generator().manual_seed(5)
    batch = t.numel() if isinstance(t, torch.Tensor) and t.dim() else 1
    x0 = torch.randn(batch, 4, 2, 8, 8, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    expected = reference("ddim").add_noise(x0, noise, torch.as_tensor(t).reshape(-1))
    got = NoiseSchedule().add_noise(x0, noise, t)
    torch.testing.assert_close(got, expected, atol=TOL["add_noise_abs"], rtol=0)


def test_schedule_matches_diffusers_training_tables():
    ours, theirs = NoiseSchedule(), reference("ddim")
    assert torch.equal(ours.betas, theirs.betas)
    assert torch.equal(ours.alphas_cumprod, theirs.alphas_cumprod)


def test_unknown_sampler_lists_known_ones():
    with pytest.raises(InputError) as err:
        make_sampler("heun", 25)
    for name in SAMPLERS:
        assert name in str(err.value)


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, True])
def test_bad_step_count(steps):
    with pytest.raises(InputError, match="num_steps"):
        make_sampler("dpm++", steps)


def test_ddim_refuses_a_timestep_past_the_schedule():
    # 1000 leading steps plus steps_offset 1 would ask for timestep 1000.
    with pytest.raises(InputError, match="1000 steps reach timestep 1000; use at most 999 steps"):
        make_sampler("ddim", 1000)


def test_euler_ancestral_requires_noise():
    sampler = make_sampler("euler_a", 4)
    assert sampler.needs_noise and not make_sampler("euler", 4).needs_noise
    with pytest.raises(InputError, match="noise"):
        sampler.step(0, torch.zeros(SHAPE), torch.zeros(SHAPE))


def test_int_index_out_of_range():
    with pytest.raises(InputError, match="step index"):
        make_sampler("euler", 4).step(4, torch.zeros(SHAPE), torch.zeros(SHAPE))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_step_is_cuda_graph_capturable(name):
    """A step indexed by a device tensor captures once and replays for every step."""
    device = torch.device("cuda")
    sampler, eager = make_sampler(name, 8, device=device), make_sampler(name, 8, device=device)
    gen = torch.Generator(device=device).manual_seed(6)
    x0 = torch.randn(SHAPE, device=device, generator=gen) * sampler.init_noise_sigma
    eps_all = torch.randn((8, *SHAPE), device=device, generator=gen)
    noise_all = torch.randn((8, *SHAPE), device=device, generator=gen)
    index = torch.zeros((), dtype=torch.int64, device=device)
    x, x_in = x0.clone(), torch.empty_like(x0)
    eps, noise = torch.empty_like(x0), torch.empty_like(x0)

    def body():
        x_in.copy_(sampler.scale_model_input(x, index))
        x.copy_(sampler.step(index, x, eps, noise))

    eps.copy_(eps_all[0])
    noise.copy_(noise_all[0])
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up: allocates the DPM++ history buffer
        body()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()

    sampler.reset()
    x.copy_(x0)
    x_ref = x0.clone()
    torch.cuda.set_sync_debug_mode("error")  # any host sync during replay raises
    try:
        for i in range(8):
            index.fill_(i)
            eps.copy_(eps_all[i])
            noise.copy_(noise_all[i])
            graph.replay()
            in_ref = eager.scale_model_input(x_ref, i)
            x_ref = eager.step(i, x_ref, eps_all[i], noise_all[i])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    scale = max(1.0, x_ref.abs().max().item())
    torch.testing.assert_close(x_in, in_ref, atol=1e-5 * scale, rtol=0)
    torch.testing.assert_close(x, x_ref, atol=1e-5 * scale, rtol=0)


@pytest.mark.parametrize("clip", [1.0, 1.5])
@pytest.mark.parametrize("num_steps", (7, 25))
def test_ddim_clip_sample_matches_diffusers(clip, num_steps):
    """Upstream runs diffusers' DDIMScheduler with its default clip_sample=True (range
    1.0): x0 clamped every step. DATA reaches +-2, so the clamp is active (the check can
    fail: without it the trajectories differ by far more than the tolerance)."""
    diffusers = require("diffusers")
    ours = make_sampler("ddim", num_steps, NoiseSchedule(clip_sample=clip))
    plain = make_sampler("ddim", num_steps)
    theirs = diffusers.DDIMScheduler(**TRAIN, clip_sample=True, clip_sample_range=clip)
    theirs.set_timesteps(num_steps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    latents = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x_a = x_b = x_p = latents
    worst = 0.0
    for i in range(num_steps):
        t = theirs.timesteps[i]
        x_a = ours.step(i, x_a, fake_model(x_a, t))
        x_b = theirs.step(fake_model(x_b, t), t, x_b).prev_sample
        x_p = plain.step(i, x_p, fake_model(x_p, t))
        worst = max(worst, (x_a - x_b).abs().max().item())
    assert worst <= TOL["closed_loop_abs"], f"clip {clip} x{num_steps}: max abs diff {worst:.3g}"
    assert x_a.abs().max() <= clip + 1e-6  # the last step returns the clamped x0
    assert (x_a - x_p).abs().max() > 0.1  # without the clamp the result is elsewhere


def test_ddim_clip_sample_is_the_same_on_numpy_and_torch():
    import numpy as np

    from easyanimate_rt.reference.schedule import NumpySampler, training_schedule

    ours = make_sampler("ddim", 10, NoiseSchedule(clip_sample=1.0))
    host = NumpySampler("ddim", 10, training_schedule(clip_sample=1.0))
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 3
    xn = x.numpy()
    for i in range(10):
        eps = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + i))
        x, xn = ours.step(i, x, eps), host.step(i, xn, eps.numpy())
        np.testing.assert_allclose(xn, x.numpy(), rtol=1e-6, atol=1e-6)


def test_clip_sample_is_a_checked_config_field():
    from easyanimate_rt.errors import ConfigError
    from easyanimate_rt.reference.config import SamplingDefaults, from_preset

    assert from_preset("v3-512").sampling.clip_sample == 1.0 and from_preset("v2-512").sampling.clip_sample == 1.0
    assert from_preset("shapes").sampling.clip_sample is None  # our own models: no clamp unless asked
    for bad in (0, -1.0, float("inf"), True, "1"):
        with pytest.raises(ConfigError, match="clip_sample must be a positive number"):
            SamplingDefaults(clip_sample=bad)


def test_pndm_needs_four_steps_and_plms_takes_any():
    """diffusers' PRK warm-up indexes the last four timesteps (it fails below 4 steps); ours
    refuses with the rule and names plms, which takes 1 step (one model call)."""
    with pytest.raises(InputError, match="pndm: .* at least 4 steps, got 3 .*plms"):
        make_sampler("pndm", 3)
    assert make_sampler("plms", 1).calls == 1 and make_sampler("plms", 2).calls == 3
    assert make_sampler("pndm", 4).calls == 13 and make_sampler("pndm", 30).calls == 39
    for name in ("pndm", "plms"):
        with pytest.raises(InputError, match=f"{name}: 1000 steps reach timestep 1000.*use at most 999 steps"):
            make_sampler(name, 1000)


@pytest.mark.parametrize("name", ["pndm", "plms"])
def test_pndm_checkpointed_history_resumes_bit_equal(name):
    """The five-array history (base sample, Runge-Kutta sum, three eps) is the whole state:
    a sampler given another's history mid-run continues bit for bit (the job server's resume)."""
    from easyanimate_rt.reference.schedule import NumpySampler

    a, rng = NumpySampler(name, 6), torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=rng).numpy()
    eps = [torch.randn(SHAPE, generator=rng).numpy() for _ in range(a.calls)]
    xs = [x]
    for i in range(a.calls):
        xs.append(a.step(i, xs[-1], eps[i]))
        if i == 6:
            saved = a.history.copy()
    b = NumpySampler(name, 6)
    b.history = saved
    y = xs[7]
    for i in range(7, b.calls):
        y = b.step(i, y, eps[i])
    assert saved.shape == (5, *SHAPE)
    assert (y == xs[-1]).all()
