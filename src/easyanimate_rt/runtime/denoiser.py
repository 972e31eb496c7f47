"""The one denoising loop of the runtime (DESIGN.md 4), for every device and mode.

Batched, sequential and unguided guidance; a batch of prompts (each with its own
seed's noise stream); step caching with its drift guard (runtime/step_cache.py); InP
and CLIP conditioning; checkpoints and resume (runtime/loop_state.py); callbacks and
per-step timings; non-finite latents stopped with the step and sampler named. The
networks are Engines (runtime/engine.py) and nothing else; the sampler definitions are
reference/schedule.py's. The reference pipeline keeps its own loop on purpose: it is the
yardstick this one is checked against.

Arrays stay where the engines keep them (:class:`HostArrays`: numpy on the CPU;
:class:`DeviceArrays`: torch tensors on a CUDA device, the sampler update on the device
from the same tables, no host round trip inside a step, a non-finite flag per step
read once after the loop). CUDA graphs live inside the engines (``prepare(shapes,
cuda_graph=True)``).

Symbols: N prompts in a batch, B = the DiT's batch (2N batched, N per call otherwise),
C latent channels, F latent frames, h x w latent size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..reference.config import ModelConfig
from ..reference.request import GenerationRequest
from ..reference.schedule import NumpySampler, SeededNoise, nonfinite_error, training_schedule
from .engine import Engine, to_host
from .loop_state import LoopState, request_key
from .step_cache import CacheSettings, StepCache, rel_l1

StepCallback = Callable[[int, int], None]  # (steps done, total); may raise to stop the run


@dataclass
class Checkpoints:
    """Where a denoising loop starts and what it saves: ``resume`` (a LoopState from an
    interrupted run of the same request, or None) and ``save`` (called with the loop's
    state after every ``every``-th step, not after the last, and after any step where
    ``urgent()`` is true: a server about to stop keeps the step it reached)."""

    save: Callable[[LoopState], None] | None = None
    every: int = 0
    resume: LoopState | None = None
    urgent: Callable[[], bool] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.every, int) or isinstance(self.every, bool) or self.every < 0:
            raise InputError(f"checkpoint interval must be an integer >= 0 (0: never), got {self.every!r}")

    def due(self, done: int, total: int) -> bool:
        if self.save is None or done >= total:
            return False
        return (self.every > 0 and done % self.every == 0) or (self.urgent is not None and self.urgent())


# --- where the arrays live -------------------------------------------------------------------


class HostArrays:
    """numpy on the CPU: the loop the CPU runtime has always run, operation for operation."""

    def sampler(self, name: str, steps: int, clip_sample: float | None = None,
                prediction_type: str = "epsilon") -> NumpySampler:
        return NumpySampler(name, steps, training_schedule(clip_sample=clip_sample, prediction_type=prediction_type))

    def put(self, a: np.ndarray) -> np.ndarray:
        return a

    def take(self, a: Any) -> np.ndarray:
        return to_host(a)

    def empty(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.empty(shape, np.float32)

    def zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, np.float32)

    def scalar(self, value: float):
        return np.float32(value)

    def concat(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def host(self, a: np.ndarray) -> np.ndarray:
        return a.copy()

    def guard(self, steps: int) -> "_HostGuard":
        return _HostGuard()


class _HostGuard:
    def after(self, i: int, x: np.ndarray, req: GenerationRequest) -> None:
        if not np.isfinite(x).all():  # before any trace, checkpoint or video sees them
            raise nonfinite_error(i + 1, req.calls, req.sampler)

    def verify(self, done: int, req: GenerationRequest) -> None:
        pass


class DeviceArrays:
    """torch tensors on ``device``: the engines' outputs stay there, the sampler update
    runs there (reference/samplers.py on the same tables), float32 latents."""

    def __init__(self, device: str):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def sampler(self, name: str, steps: int, clip_sample: float | None = None, prediction_type: str = "epsilon"):
        from ..reference.samplers import NoiseSchedule, make_sampler

        return make_sampler(name, steps, NoiseSchedule(clip_sample=clip_sample, prediction_type=prediction_type),
                            device=self.device)

    def put(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def take(self, a: Any):
        """An engine's output as a float32 tensor of the loop's own: engines return views
        of their buffers, which their next run overwrites."""
        t = a if isinstance(a, self.torch.Tensor) else self.torch.from_numpy(np.asarray(a))
        t = t.to(self.device)
        return t.float() if t.dtype != self.torch.float32 else t.clone()

    def empty(self, shape: tuple[int, ...]):
        return self.torch.empty(shape, dtype=self.torch.float32, device=self.device)

    def zeros(self, shape: tuple[int, ...]):
        return self.torch.zeros(shape, dtype=self.torch.float32, device=self.device)

    def scalar(self, value: float) -> float:
        return float(value)

    def concat(self, parts):
        return self.torch.cat(list(parts)) if len(parts) > 1 else parts[0]

    def host(self, a) -> np.ndarray:
        return a.detach().float().cpu().numpy()

    def guard(self, steps: int) -> "_DeviceGuard":
        return _DeviceGuard(self.torch.ones(steps, dtype=self.torch.bool, device=self.device))


@dataclass
class _DeviceGuard:
    """A per-step "latents finite" flag written on the device (no sync), read once."""

    finite: Any

    def after(self, i: int, x, req: GenerationRequest) -> None:
        self.finite[i] = x.isfinite().all()

    def verify(self, done: int, req: GenerationRequest) -> None:
        flags = self.finite[:done].cpu()
        if not bool(flags.all()):
            raise nonfinite_error(int(flags.logical_not().nonzero()[0]) + 1, req.calls, req.sampler)


def engine_guidance(req: GenerationRequest) -> str:
    """The DiT engines a request runs: ``batched`` (one call of both guidance branches)
    or ``sequential`` (a call per branch; also unguided requests, which run one)."""
    return "batched" if req.guidance_mode == "batched" and req.guidance_scale != 1.0 else "sequential"


def arrays_for(device: str) -> HostArrays | DeviceArrays:
    return HostArrays() if device == "cpu" else DeviceArrays(device)


# --- the loop --------------------------------------------------------------------------------


@dataclass
class Denoised:
    """What one run of the loop gives: the final latents (N, C, F, h, w) float32 on the
    host, and the step cache's report and (input change, output change) pairs."""

    latents: np.ndarray
    cache_report: dict[str, Any] | None = None
    cache_pairs: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class Conditioning:
    """Per-request inputs besides the text: an InP model's (1, 2C, F, h, w) mask and
    masked-video latents; the CLIP image tokens ((2, K) embeds, (2, T) mask)."""

    inpaint: np.ndarray | None = None
    clip: tuple[np.ndarray, np.ndarray] | None = None


class Denoiser:
    """The loop over ``engine(key, guidance)`` (the DiT, or its step-caching head and
    tail, built for batched or sequential guidance)."""

    def __init__(self, config: ModelConfig, engine: Callable[[str, str], Engine], arrays: HostArrays | DeviceArrays,
                 step_cache: CacheSettings | None = None, cuda_graphs: bool = False):
        self.config = config
        self.engine = engine
        self.arrays = arrays
        self.step_cache = step_cache or CacheSettings()
        self.cuda_graphs = cuda_graphs

    @classmethod
    def on_model(cls, model, arrays: HostArrays | DeviceArrays, cuda_graphs: bool = False,
                 step_cache: CacheSettings | None = None) -> "Denoiser":
        """The loop on a reference model's torch modules (TorchEngines, made on first use
        and kept in ``.engines`` by key; they take either guidance mode)."""
        from ..export.spec import spec_of
        from .backends.torch import TorchEngine

        engines: dict[str, Engine] = {}

        def engine(key: str, guidance: str = "batched") -> Engine:
            if key not in engines:
                engines[key] = TorchEngine(model, spec_of(model.config, key))
            return engines[key]

        loop = cls(model.config, engine, arrays, step_cache, cuda_graphs)
        loop.engines = engines
        return loop

    def run(self, reqs: Sequence[GenerationRequest], emb: np.ndarray, mask: np.ndarray,
            cond: Conditioning | None = None, callback: StepCallback | None = None,
            step_times: list[float] | None = None, trace: list | None = None,
            checkpoints: Checkpoints | None = None) -> Denoised:
        """``reqs``: one batch (requests equal but for prompts and seeds); ``emb``/``mask``:
        the text encoder's [negatives..., positives...] rows. ``trace`` receives each
        step's latents (host); ``checkpoints`` resumes and saves one request's loop."""
        A, req, n = self.arrays, reqs[0], len(reqs)
        checkpoints = checkpoints or Checkpoints()
        c, g = self.config.vae.latent_channels, req.guidance_scale
        guidance = engine_guidance(req)
        calls = req.calls  # model calls: the loop's length (PNDM/PLMS call more than once a step)
        cache = StepCache(self.step_cache, calls) if self.step_cache.enabled else None
        sampler = A.sampler(req.sampler, req.steps, self.config.sampling.clip_sample, self.config.dit.prediction_type)
        streams = [SeededNoise(r.seed) for r in reqs]
        shape = req.latent_shape(self.config)

        def noise():
            return A.put(np.concatenate([s(shape) for s in streams]) if n > 1 else streams[0](shape))

        x = noise() * A.scalar(sampler.init_noise_sigma)
        start = 0
        if checkpoints.resume is not None:  # the interrupted run's latents, sampler history and noise stream
            start, x = checkpoints.resume.step, A.put(checkpoints.resume.latents.astype(np.float32, copy=True))
            sampler.history = checkpoints.resume.history
            streams[0].state = checkpoints.resume.noise
        # the rows of [negatives..., positives...] each DiT call takes
        branches = [slice(0, 2 * n)] if guidance == "batched" else [slice(0, n), slice(n, 2 * n)]
        if g == 1.0:
            branches = [slice(n, 2 * n)]  # unguided: the positive branch alone
        rows = len(range(2 * n)[branches[0]])
        latents = A.empty((rows, *shape[1:]))  # persistent input buffers
        copies = latents.reshape(-1, *x.shape)  # (2 or 1, N, ...): a view the latents go into
        timestep = A.empty((rows,))
        feeds = self._feeds(reqs, emb, mask, cond or Conditioning(), branches, latents, timestep)
        step = self._plain_step(guidance, feeds, len(branches)) if cache is None else \
            self._cached_step(cache, guidance, feeds, len(branches))
        guard = A.guard(calls)
        key = request_key(req)
        for i in range(start, calls):
            t0 = time.perf_counter()
            xin = sampler.scale_model_input(x, i)
            copies[...] = xin
            timestep[...] = sampler.timesteps[i]
            out = A.concat([o[:, :c] for o in step(i)])
            out_u, out_c = (out[:n], out[n:]) if len(out) == 2 * n else (out, out)
            eps = sampler.epsilon(i, xin, out_u + g * (out_c - out_u), self.config.dit.prediction_type)
            x = sampler.step(i, x, eps, noise() if sampler.needs_noise else None)
            guard.after(i, x, req)
            if step_times is not None:
                step_times.append(time.perf_counter() - t0)
            if trace is not None:
                trace.append(A.host(x))
            if checkpoints.due(i + 1, calls):
                guard.verify(i + 1, req)  # never a non-finite state saved
                history = sampler.history
                checkpoints.save(LoopState(key, i + 1, A.host(x), None if history is None else history.copy(),
                                           streams[0].state))
            if callback is not None:
                callback(i + 1, calls)
        guard.verify(calls, req)
        return Denoised(A.host(x), cache.report() if cache is not None else None, cache.pairs if cache else [])

    def _feeds(self, reqs, emb, mask, cond: Conditioning, branches, latents, timestep
               ) -> Callable[[int, int], dict[str, Any]]:
        """The DiT's inputs of branch ``k`` at step ``i``: per branch, built once, the text
        inputs, the InP latents and the CLIP inputs shown (the last clip_apply_ratio of
        the steps) and hidden."""
        A, req, n = self.arrays, reqs[0], len(reqs)
        clip = cond.clip
        if clip is not None and n > 1:  # [negative, positive] -> [negatives..., positives...]
            clip = tuple(np.repeat(a, n, axis=0) for a in clip)
        fixed, shown, hidden = [], [], []
        for b in branches:
            rows = len(range(2 * n)[b])
            fixed.append({"text": A.put(emb[b]), "text_mask": A.put(mask[b])})
            if cond.inpaint is not None:
                fixed[-1]["inpaint_latents"] = A.put(np.ascontiguousarray(
                    np.broadcast_to(cond.inpaint, (rows, *cond.inpaint.shape[1:]))))
            on = {"clip_embeds": clip[0][b], "clip_mask": clip[1][b]} if clip is not None else {}
            shown.append({k: A.put(v) for k, v in on.items()})
            hidden.append({k: A.put(np.zeros_like(v)) for k, v in on.items()})

        def feeds(k: int, i: int) -> dict[str, Any]:
            clip_inputs = shown if i >= req.calls * (1 - req.clip_apply_ratio) else hidden
            return {"latents": latents, "timestep": timestep, **fixed[k], **clip_inputs[k]}

        return feeds

    def _plain_step(self, guidance: str, feeds, n_branches: int) -> Callable[[int], list]:
        """The whole DiT, once per branch; prepared once for the shapes (a CUDA graph
        where the engine captures one)."""
        dit = self.engine("dit", guidance)
        first = feeds(0, 0)
        dit.prepare({name: tuple(v.shape) for name, v in first.items()}, cuda_graph=self.cuda_graphs)
        return lambda i: [self.arrays.take(dit.run(feeds(k, i))["noise_pred"]) for k in range(n_branches)]

    def _cached_step(self, cache: StepCache, guidance: str, feeds, n_branches: int) -> Callable[[int], list]:
        """One step on the head and tail engines (runtime/step_cache.py): the head every
        step, the tail when the cache computes or checks; the guidance branches share the
        decision (signals and errors over all of them)."""
        A = self.arrays
        head, tail = self.engine("dit_cache/head", guidance), self.engine("dit_cache/tail", guidance)
        residual: list = [None] * n_branches  # the tail residual the last computed step left
        tail_inputs = [t.name for t in tail.spec.inputs]
        p, d = self.config.dit.patch_size, self.config.dit.hidden_size

        def step(i: int) -> list:
            heads = []
            for k in range(n_branches):
                f = feeds(k, i)
                if residual[k] is None:
                    b, _, fr, hh, ww = f["latents"].shape
                    residual[k] = A.zeros((b, fr, hh // p, ww // p, d))
                heads.append({name: A.take(v) for name, v in head.run({**f, "cached_residual": residual[k]}).items()})
            signals = {name: A.concat([h[name] for h in heads]) for name in ("first_residual", "modulated")}
            decision = cache.decide(i, signals)
            cached = [h["skip_pred"] for h in heads]
            if decision == "skip":
                return cached
            outs = []
            for k, h in enumerate(heads):
                t = tail.run({name: h[name] for name in tail_inputs})
                outs.append(A.take(t["noise_pred"]))
                residual[k] = A.take(t["tail_residual"])
            pred = A.concat(outs)
            if decision == "check":
                cache.checked(i, rel_l1(A.concat(cached), pred))
            # the step before this one computed too (decisions[-1] is this step's)
            cache.observe(i, pred, consecutive=len(cache.decisions) > 1 and cache.decisions[-2] != "skip")
            cache.computed(i, signals)
            return outs

        return step

