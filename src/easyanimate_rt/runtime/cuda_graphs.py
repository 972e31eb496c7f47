"""The torch backend's denoising loop on a GPU: device tensors from start to end (no host
round trip inside a step), and one CUDA graph per (request shape) holding the whole
step: model-input scaling, the DiT call, guidance, v -> epsilon and the sampler
update, all table arithmetic with the step index in a device tensor
(reference/samplers.py keeps steps free of host synchronisation for this).

    capture: one eager warm-up step (allocates DPM++'s x0 buffer, picks kernels), then
             ``torch.cuda.graph`` records a step reading static buffers (latents, step
             index, this step's noise) and writing the next latents into the same
             latents buffer;
    replay:  per step, set the index (a device fill, no sync), copy the step's noise in
             (euler_a), replay.

If capture fails (an op that cannot be captured, out of memory), the loop runs eager
with one log line; ``cuda_graph=False`` (``--no-cuda-graphs``) skips capture.

Non-finite latents: each step (inside the graph) writes whether the latents it left are
all finite into a per-step device flag; the host reads the flags once, after the loop
(and at a checkpoint, which reads the latents back anyway), and raises a NumericalError
naming the first bad step. No host sync per step for it.

Step caching (runtime/step_cache.py) runs the DiT as its head and tail modules
(export/graphs.py, the graphs the CPU runtime exports), the decision on the host from
one device -> host scalar per metric; that loop runs eagerly (no capture: which of
head, tail or both runs changes from step to step).
"""

from __future__ import annotations

import logging
from typing import Callable

from ..reference.request import GenerationRequest
from ..reference.schedule import SeededNoise, nonfinite_error

log = logging.getLogger(__name__)


def denoise_on_device(model, req: GenerationRequest, emb, mask, *, device, cuda_graph: bool = True,
                      callback: Callable[[int, int], None] | None = None, trace: list | None = None,
                      inpaint=None, clip=None, checkpoints=None, step_cache=None, head=None, tail=None):
    """Final latents (1, C, F, h, w) float32 on ``device``; same noise stream and sampler
    tables as the reference pipeline. ``emb``/``mask``: (2, S, E)/(2, S) [negative, positive];
    InP models: ``inpaint`` (1, 2C, F, h, w) and ``clip`` ((2, K) embeds, (2, T) mask), as
    the runtime's ``inpaint_latents``/``clip_condition`` give them (the CLIP inputs are
    buffers refilled before each step: zeros before the last ``clip_apply_ratio``).
    ``checkpoints`` (runtime.pipeline.Checkpoints): start from its ``resume`` state and
    hand a LoopState to its ``save`` every ``every`` steps (one device -> host copy then).
    ``step_cache`` (a StepCache) with the ``head`` and ``tail`` modules
    (export.graphs.graph_module of the ``dit_cache`` specs): cached steps, eagerly.
    Latents that turn NaN or infinite raise a NumericalError naming the first such step
    and the sampler, after the loop (or before a checkpoint would save them)."""
    import torch

    from ..reference.samplers import make_sampler
    from .loop_state import LoopState, request_key

    dit = model.dit
    dtype = dit.proj_out.weight.dtype
    c = model.config.vae.latent_channels
    g = float(req.guidance_scale)
    prediction = model.config.dit.prediction_type
    sampler = make_sampler(req.sampler, req.steps, device=device)
    noise_of = SeededNoise(req.seed)
    shape = req.latent_shape(model.config)
    x = (torch.from_numpy(noise_of(shape)) * sampler.init_noise_sigma).to(device)
    emb = torch.as_tensor(emb).to(device, dtype)
    mask = torch.as_tensor(mask).to(device)
    guided = g != 1.0
    batched = guided and req.guidance_mode == "batched"
    if not guided:
        emb, mask = emb[1:], mask[1:]
    index = torch.zeros((), dtype=torch.int64, device=device)
    finite = torch.ones(req.steps, dtype=torch.bool, device=device)  # per step: latents finite after it
    noise = torch.zeros(shape, device=device)
    if inpaint is not None:
        inpaint = torch.as_tensor(inpaint).to(device, dtype)
    clip_embeds = clip_mask = None
    if clip is not None:
        clip_host = [torch.as_tensor(a) for a in clip]
        clip_embeds = torch.zeros(clip_host[0].shape, device=device, dtype=dtype)
        clip_mask = torch.zeros(clip_host[1].shape, device=device, dtype=dtype)

    def cond(branch: slice) -> dict:
        extra = {}
        n = len(range(2)[branch])
        if inpaint is not None:
            extra["inpaint_latents"] = inpaint.expand(n, *inpaint.shape[1:])
        if clip_embeds is not None:
            extra["clip_embeds"], extra["clip_mask"] = clip_embeds[branch], clip_mask[branch]
        return extra

    def step() -> None:
        """x <- one sampler step at ``index``, in place (the graph's body)."""
        xin = sampler.scale_model_input(x, index).to(dtype)
        t = sampler.timesteps.index_select(0, index.reshape(1))
        if batched:
            out = dit(xin.expand(2, *xin.shape[1:]), t.expand(2), emb, mask, **cond(slice(0, 2)))[:, :c].float()
            out_u, out_c = out.chunk(2)
        elif guided:
            out_u = dit(xin, t, emb[:1], mask[:1], **cond(slice(0, 1)))[:, :c].float()
            out_c = dit(xin, t, emb[1:], mask[1:], **cond(slice(1, 2)))[:, :c].float()
        else:
            out_u = out_c = dit(xin, t, emb, mask, **cond(slice(1, 2)))[:, :c].float()
        eps = sampler.epsilon(index, xin, out_u + g * (out_c - out_u), prediction)
        x.copy_(sampler.step(index, x, eps, noise if sampler.needs_noise else None))
        _flag_finite(finite, index, x)

    def feed(i: int) -> None:
        index.fill_(i)
        if clip_embeds is not None:
            shown = i >= req.steps * (1 - req.clip_apply_ratio)
            clip_embeds.copy_(clip_host[0] if shown else torch.zeros_like(clip_host[0]))
            clip_mask.copy_(clip_host[1] if shown else torch.zeros_like(clip_host[1]))
        if sampler.needs_noise:
            noise.copy_(torch.from_numpy(noise_of(shape)), non_blocking=False)

    if step_cache is not None:
        step = _cached_step(step_cache, head, tail, model.config, x, index, sampler, emb, mask, cond, g, dtype,
                            prediction, noise, guided, batched, finite)
        if cuda_graph:
            log.info("step caching: the GPU denoising loop runs eagerly (no CUDA graph)")
    graph = None
    if cuda_graph and req.steps > 1 and step_cache is None:
        graph = _capture(step, x, sampler)
    start = 0
    resume = checkpoints.resume if checkpoints is not None else None
    if resume is not None:  # after capture: the graph reads these buffers, so fill them in place
        start = resume.step
        x.copy_(torch.from_numpy(resume.latents))
        if resume.history is not None:
            if sampler._prev_x0 is None:
                sampler._prev_x0 = torch.zeros_like(x, dtype=torch.float32)
            sampler._prev_x0.copy_(torch.from_numpy(resume.history))
        noise_of.state = resume.noise
    finite.fill_(True)  # the capture's warm-up step wrote one
    with torch.no_grad():
        for i in range(start, req.steps):
            feed(i)
            if graph is not None:
                graph.replay()
            elif step_cache is not None:
                step(i)
            else:
                step()
            if trace is not None:
                trace.append(x.detach().float().cpu().numpy())
            if checkpoints is not None and checkpoints.due(i + 1, req.steps):
                _check_finite(finite, i + 1, req)  # never a NaN state: this reads back anyway
                history = sampler._prev_x0
                checkpoints.save(LoopState(request_key(req), i + 1, x.detach().float().cpu().numpy(),
                                           None if history is None else history.cpu().numpy(), noise_of.state))
            if callback is not None:
                callback(i + 1, req.steps)
    _check_finite(finite, req.steps, req)  # one device -> host read for the whole loop
    return x


def _flag_finite(finite, index, x) -> None:
    """finite[index] <- whether ``x`` is all finite, on the device (capturable, no sync)."""
    import torch

    finite.index_copy_(0, index.reshape(1), torch.isfinite(x).all().reshape(1))


def _check_finite(finite, done: int, req: GenerationRequest) -> None:
    """Raise the NumericalError of the first of steps 1 .. ``done`` whose flag is down."""
    flags = finite[:done].cpu()
    if not bool(flags.all()):
        raise nonfinite_error(int(flags.logical_not().nonzero()[0]) + 1, req.steps, req.sampler)


def _cached_step(cache, head, tail, config, x, index, sampler, emb, mask, cond, g: float, dtype, prediction, noise,
                 guided: bool, batched: bool, finite) -> Callable[[int], None]:
    """The loop's step with step caching: the head on every branch, the cache's decision
    over all of them (as the CPU runtime's Pipeline._cached_step), the tail when it
    computes or checks, then guidance and the sampler update in place."""
    import torch

    from .step_cache import rel_l1

    c = config.vae.latent_channels
    # (rows of emb, rows of [negative, positive] for cond): unguided, emb holds the positive alone
    branches = ([(slice(0, 2), slice(0, 2))] if batched else
                [(slice(0, 1), slice(0, 1)), (slice(1, 2), slice(1, 2))] if guided else [(slice(0, 1), slice(1, 2))])
    d = config.dit
    residual: list = [None] * len(branches)  # the tail residual of the last computed step, per branch

    def step(i: int) -> None:
        xin = sampler.scale_model_input(x, index).to(dtype)
        t = sampler.timesteps.index_select(0, index.reshape(1))
        heads = []
        for k, (b, cb) in enumerate(branches):
            n = len(range(2)[cb])
            extra = cond(cb)
            inp = [extra[name] for name in ("inpaint_latents", "clip_embeds", "clip_mask") if name in extra]
            if residual[k] is None:
                _, _, f, hh, ww = xin.shape
                residual[k] = torch.zeros((n, f, hh // d.patch_size, ww // d.patch_size, d.hidden_size),
                                          device=x.device, dtype=dtype)
            heads.append(head(xin.expand(n, *xin.shape[1:]), t.expand(n), emb[b], mask[b], *inp, residual[k]))
        signals = {"first_residual": torch.cat([h[1] for h in heads]), "modulated": torch.cat([h[2] for h in heads])}
        decision = cache.decide(i, signals)
        cached = [h[3] for h in heads]
        outs = cached
        if decision != "skip":
            outs = []
            for k, h in enumerate(heads):
                pred, residual[k] = tail(h[0], *h[4:])
                outs.append(pred)
            full = torch.cat(outs)
            if decision == "check":
                cache.checked(i, rel_l1(torch.cat(cached), full))
            cache.observe(i, full, consecutive=len(cache.decisions) > 1 and cache.decisions[-2] != "skip")
            cache.computed(i, signals)
        out = torch.cat(outs)[:, :c].float()
        out_u, out_c = (out[:1], out[1:]) if len(out) == 2 else (out, out)
        eps = sampler.epsilon(index, xin, out_u + g * (out_c - out_u), prediction)
        x.copy_(sampler.step(index, x, eps, noise if sampler.needs_noise else None))
        _flag_finite(finite, index, x)

    return step


def _capture(step: Callable[[], None], x, sampler):
    """A CUDA graph of ``step``, or None (eager) with one log line when capture fails.
    The warm-up step's effects are undone: ``x`` and the sampler's history restored."""
    import torch

    saved = x.clone()
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            step()  # warm-up: lazy buffers, cuBLAS handles, kernel selection
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            step()
    except Exception as exc:  # capture is an optimisation: never a failed generation
        log.warning("CUDA graph capture failed (%s: %s); running the denoising loop eagerly",
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        graph = None
    x.copy_(saved)
    sampler.reset()
    torch.cuda.synchronize()
    return graph
