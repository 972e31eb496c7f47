"""The runtime pipeline: text -> video on engines (DESIGN.md 4), checked against the
reference pipeline it reimplements.

1. tokenize the prompt and the negative prompt; run the text-encoder engine;
2. initial latents from the seed (the reference's generator, so the same seed gives the
   same video);
3. denoising loop: the reference samplers (reference/samplers.py) around the DiT
   engine, batched classifier-free guidance;
4. decode slice by slice through the slice-decoder engines (one per variant), frames
   streamed to uint8.

First slice of the runtime issue: the torch and ONNX Runtime CPU backends; compile on
first use builds the ORT engines for the request's bucket into the engine cache.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import torch

from ..engines.buckets import Bucket
from ..engines.cache import EngineCache
from ..errors import InputError
from ..export.spec import decoder_variant, make_specs
from ..media import save_video, to_uint8
from ..reference.config import ModelConfig
from ..reference.pipeline import GenerationRequest, default_request
from ..reference.samplers import make_sampler
from .engine import Engine

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "ort")


@dataclass
class Video:
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: int
    latents: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        return save_video(self.frames, path, self.fps)


class Pipeline:
    """Text -> video on a set of engines (see the module docstring)."""

    def __init__(self, config: ModelConfig, engines: Mapping[str, Engine], tokenize: Callable, backend: str):
        self.config = config
        self.engines = dict(engines)
        self.tokenize = tokenize  # prompts -> (input_ids, attention_mask) int64 (B, S)
        self.backend = backend

    @classmethod
    def from_pretrained(cls, source: str | Path, backend: str = "auto", engine_dir: str | Path | None = None,
                        cache_dir: str | Path | None = None, buckets: list[Bucket] | None = None,
                        threads: int | None = None, seed: int = 0) -> "Pipeline":
        """``source``: a model directory or preset. ``ort`` (``auto`` on a CPU machine)
        builds the engines the buckets need on first use (default: the model's default
        size) into the engine cache; later calls load them."""
        from ..reference.weights import load_model_or_preset

        if backend not in BACKENDS:
            raise InputError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        backend = "ort" if backend == "auto" else backend
        model = load_model_or_preset(source, seed=seed)
        config = model.config
        if config.dit.inpaint:
            raise InputError(f"the runtime does not run InP models yet ({config.name!r}); use the reference "
                             f"pipeline (easyanimate_rt.ReferencePipeline)")

        def tokenize(prompts):
            ids, mask = model.text_encoder.tokenize(prompts)
            return ids.numpy().astype(np.int64), mask.numpy().astype(np.int64)

        if backend == "torch":
            from .backends.torch import TorchEngine

            engines = {s.key: TorchEngine(model, s) for s in make_specs(config)}
            return cls(config, engines, tokenize, backend)
        from ..engines.build import build_engines
        from ..export.index import load_export
        from .backends.ort import OrtEngine

        s = config.sampling
        buckets = buckets or [Bucket(s.height, s.width, s.frames)]
        cache = EngineCache(cache_dir)
        out = Path(engine_dir) if engine_dir is not None else cache.root / "dirs" / config.name
        results = build_engines(source, out, "ort-cpu", buckets, cache=cache, model=model, threads=threads, seed=seed)
        index = load_export(out / "export") if (out / "export").is_dir() else load_export(source)
        engines = {r.key: OrtEngine(out / r.key, index.specs[r.key], index.path(r.key), threads) for r in results}
        return cls(config, engines, tokenize, backend)

    def request(self, prompt: str, **kwargs) -> GenerationRequest:
        return default_request(self.config, prompt, **kwargs)

    def _engine(self, key: str) -> Engine:
        if key not in self.engines:
            raise InputError(f"no {key} engine for this request; build engines for its size "
                             f"(`easyanimate-rt build --buckets HxWxF`)")
        return self.engines[key]

    @torch.no_grad()
    def denoise(self, req: GenerationRequest, emb: np.ndarray, mask: np.ndarray,
                callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
        c = self.config.vae.latent_channels
        gen = torch.Generator("cpu").manual_seed(req.seed)
        sampler = make_sampler(req.sampler, req.steps)
        shape = req.latent_shape(self.config)
        x = torch.randn(shape, generator=gen) * sampler.init_noise_sigma
        dit = self._engine("dit")
        dit.prepare({"latents": (2, *shape[1:]), "timestep": (2,), "text": emb.shape, "text_mask": mask.shape})
        for i in range(req.steps):
            t = sampler.timesteps[i]
            xin = sampler.scale_model_input(x, i).float()
            feeds = {"latents": np.repeat(xin.numpy(), 2, axis=0),
                     "timestep": np.full((2,), float(t), np.float32), "text": emb, "text_mask": mask}
            out = torch.from_numpy(np.asarray(dit.run(feeds)["noise_pred"])[:, :c].copy())
            out_u, out_c = out.chunk(2)
            eps = sampler.epsilon(i, xin, out_u + req.guidance_scale * (out_c - out_u),
                                  self.config.dit.prediction_type)
            noise = torch.randn(shape, generator=gen) if sampler.needs_noise else None
            x = sampler.step(i, x, eps, noise)
            if callback is not None:
                callback(i + 1, req.steps)
        return x

    def iter_frames(self, latents: torch.Tensor) -> Iterator[np.ndarray]:
        """uint8 frames (n, H, W, 3), one decoder slice at a time."""
        z = latents.numpy()
        for s in self.config.vae.slice_plan(z.shape[2]):
            engine = self._engine(f"vae_decoder/{decoder_variant(self.config, s)}")
            frames = engine.run({"context": z[:, :, s.ctx_start:s.ctx_end]})["frames"]
            yield to_uint8(torch.from_numpy(np.asarray(frames)[0]))

    def __call__(self, prompt: str, callback: Callable[[int, int], None] | None = None, **kwargs) -> Video:
        req = self.request(prompt, **kwargs)
        req.validate(self.config)
        if req.guidance_mode != "batched" or req.image is not None:
            raise InputError("the runtime runs batched guidance text-to-video for now (guidance_mode='batched', "
                             "no image)")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        ids, mask = self.tokenize([req.negative_prompt, req.prompt])
        emb = self._engine("text_encoder").run({"input_ids": ids, "attention_mask": mask})["text_embeddings"]
        timings["text"] = time.perf_counter() - t0
        latents = self.denoise(req, np.asarray(emb, np.float32), mask, callback)
        timings["denoise"] = time.perf_counter() - t0 - timings["text"]
        frames = np.concatenate(list(self.iter_frames(latents)), axis=0)
        timings["decode"] = time.perf_counter() - t0 - timings["text"] - timings["denoise"]
        return Video(frames, self.config.sampling.fps, latents, timings)

    generate = __call__
