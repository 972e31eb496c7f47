"""The runtime pipeline: text -> video on engines (DESIGN.md 4), checked against the
reference pipeline it reimplements.

1. tokenize the prompt and the negative prompt (runtime/tokenizer.py); run the
   text-encoder engine;
2. the denoising loop (runtime/denoiser.py): the reference's noise stream and sampler
   definitions around the DiT engine, its arrays where the engines keep them;
3. decode slice by slice through the slice-decoder engines (one per variant), each
   slice's frames streamed to the video writer as they come (constant memory).

What runs is decided once: the model source (runtime/source.py), the backend of each
network and the device (runtime/choice.py, the registry's names), and the engines
(runtime/engine_set.py: loaded from the engine cache, checked against their manifests,
built on first use; with ``compile=False`` a size without engines is a ShapeError
naming the built sizes).

With cached ONNX Runtime engines and a model directory, nothing here imports torch or
transformers: start-up is onnxruntime, tokenizers and numpy. The torch backends (and a
preset's random weights) use the reference modules.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..engines.budget import check_bucket_budget, check_budget
from ..engines.buckets import Bucket
from ..engines.cache import EngineCache
from ..errors import InputError
from ..export.spec import MAX_PROMPTS, decoder_variant, encoder_key
from ..media import VideoWriter, check_output_path, frames_to_uint8
from ..reference.config import ModelConfig
from ..reference.request import GenerationRequest, Video, check_batch, default_request
from ..reference.smooth import check_decode, iter_smoothed
from .backends import backend as backend_entry
from .choice import NETWORKS, parse_backend, resolve_backends, resolve_device, torch_dtype, uses_torch  # noqa: F401
from .conditioning import conditioning
from .denoiser import Checkpoints, Denoised, Denoiser, StepCallback, arrays_for, engine_guidance
from .engine import Engine, to_host
from .engine_set import EngineSet
from .source import ModelSource, read_config  # noqa: F401 (re-exported)
from .step_cache import CacheSettings, load_rescale

log = logging.getLogger(__name__)


class Pipeline:
    """Text -> video on a set of engines (see the module docstring)."""

    def __init__(self, config: ModelConfig, source: ModelSource, tokenizer: Callable | None, engines: EngineSet, *,
                 device: str = "cpu", precision: str = "fp32", cuda_graphs: bool = True, clip_encoder=None,
                 step_cache: CacheSettings | None = None):
        self.config, self.source, self.engine_set = config, source, engines
        self.tokenize = tokenizer  # prompts -> (input_ids, attention_mask) int64 (B, S)
        self.device, self.precision, self.cuda_graphs = device, precision, cuda_graphs
        self.clip_encoder = clip_encoder  # image (H, W, 3) uint8 -> (1, K) torch; InP image-to-video
        self.step_cache = step_cache or CacheSettings()  # runtime/step_cache.py; "none": the whole DiT
        self.timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(cls, source: str | Path | ModelSource, backend: str = "auto",
                        engine_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                        precision: str | None = None, buckets: list[Bucket] | None = None,
                        threads: int | None = None, seed: int = 0, compile: bool = True, guidance: str = "batched",
                        progress: Callable[[str], None] | None = None, device: str = "auto",
                        cuda_graphs: bool = True, clip_model: str | Path | None = None,
                        cache: str | CacheSettings = "none", cache_threshold: float | None = None,
                        loras: Sequence[Any] = ()) -> "Pipeline":
        """``source``: a model directory or preset name. Loads (or, on first use, builds)
        the engines ``buckets`` need (default: the model's default size). ``backend``:
        runtime/choice.py (``auto``, a registry name, or per network); ``device`` "cuda"
        runs the GPU backends (``precision`` fp32, bf16 or fp16) with each engine's launch
        in a CUDA graph where it can capture one, unless ``cuda_graphs=False``; "auto" is
        cuda where a CUDA device is visible (then ``precision`` defaults to bf16), else cpu
        (fp32). ``cache``: step caching (runtime/step_cache.py: "fbcache", "teacache" or
        CacheSettings) with its ``cache_threshold``; the DiT then runs as its head and
        tail engines. ``loras``: LoRA adapters merged into the model (``PATH[:WEIGHT]``,
        (path, weight) or reference.lora.Adapter; :meth:`set_loras` switches them later);
        they are part of the model source, so their engines are their own."""
        t0 = time.perf_counter()
        choice = parse_backend(backend)
        source = ModelSource.of(source, seed, loras)
        source_holder = SimpleNamespace(source=source)
        settings = cache if isinstance(cache, CacheSettings) else CacheSettings(
            cache, cache_threshold, rescale=load_rescale(source.path) if cache == "teacache" else None)
        # an explicit CPU backend keeps device auto on the CPU
        device = resolve_device(device, any(v != "auto" and backend_entry(v).device == "cpu" for v in choice.values()))
        precision = precision or ("fp32" if device == "cpu" else "bf16")
        backends = resolve_backends(choice, device, precision)
        if device == "cpu" and precision != "fp32" and uses_torch(backends):
            raise InputError(f"the torch backend runs fp32 on the CPU; got precision {precision!r}")
        if source.config is not None and device == "cpu":  # a bucket this machine cannot run: before any work
            for b in buckets or ():
                check_bucket_budget(source.config, b.height, b.width, b.frames, b.prompts, guidance)
        loaded: list = [None]
        engine_set: list = [None]  # the EngineSet once made: its source carries set_loras' adapters

        def model():
            """The reference model (torch), loaded on first need: the torch backends, builds."""
            if loaded[0] is None:
                loaded[0] = (engine_set[0] or source_holder).source.load()  # the adapters of the moment
                if device != "cpu":
                    loaded[0] = loaded[0].to(device, torch_dtype(precision))
            return loaded[0]

        config = source.config if source.config is not None else model().config
        if uses_torch(backends):
            model()
        clip_encoder = None
        if clip_model is not None:
            if not config.dit.clip_channels:
                raise InputError(f"a CLIP image encoder was given, but {config.name!r} takes no CLIP input")
            from ..reference.clip import ClipImageEncoder

            clip_encoder = ClipImageEncoder.from_pretrained(clip_model, "cpu")
        engines = EngineSet(source, config, backends, model, cache=EngineCache(cache_dir), engine_dir=engine_dir,
                            precision=precision, threads=threads, compile=compile, device=device,
                            split=settings.enabled, progress=progress)
        engine_set[0] = engines
        pipe = cls(config, source, None, engines, device=device, precision=precision, cuda_graphs=cuda_graphs,
                   clip_encoder=clip_encoder, step_cache=settings)
        pipe._loaded = loaded
        wanted = buckets or [Bucket(config.sampling.height, config.sampling.width, config.sampling.frames)]
        for b in wanted:  # one build for all of them, when any is missing (the encoders too for a smooth decode)
            engines.ensure(b, guidance, build_with=wanted, encoders=config.sampling.decode == "smooth")
        pipe.tokenize = source.tokenizer(config, loaded[0], engines.directory(guidance, backends["text_encoder"]))
        if engines.build_seconds:
            pipe.timings["build"] = engines.build_seconds
        pipe.timings["load"] = time.perf_counter() - t0
        log.info("runtime: %s on %s (%.2fs to load)", config.name, pipe.describe(), pipe.timings["load"])
        return pipe

    # --- the engines (runtime/engine_set.py) -------------------------------------------------

    @property
    def backends(self) -> dict[str, str]:
        return self.engine_set.backends

    @property
    def engines(self) -> dict[tuple[str, str], Engine]:
        return self.engine_set.engines

    def describe(self) -> str:
        if len(set(self.backends.values())) == 1:
            return next(iter(self.backends.values()))
        return ",".join(f"{k}={v}" for k, v in self.backends.items())

    def engine_dir(self, guidance: str, backend: str = "ort-cpu") -> Path:
        return self.engine_set.directory(guidance, backend)

    def engine(self, key: str, guidance: str = "batched") -> Engine:
        return self.engine_set.engine(key, guidance)

    def ensure(self, bucket: Bucket, guidance: str = "batched", build_with: Sequence[Bucket] = (),
               encoders: bool = False) -> None:
        """Engines for ``bucket`` (and the VAE encoder's with ``encoders``: the smoothed decode)."""
        self.engine_set.ensure(bucket, guidance, build_with, encoders)
        if self.engine_set.build_seconds:
            self.timings["build"] = self.engine_set.build_seconds

    def model(self):
        """The reference model (torch), loaded on first need."""
        return self.engine_set.model()

    def set_loras(self, loras: Sequence[Any]) -> None:
        """Switch the LoRA adapters (none: the base model). Every file and weight is checked
        before anything changes; the engines of the new set are loaded or built on the next
        request (their own cache entry); a loaded reference model is re-merged in place
        from its kept base weights (the torch backends' CUDA graphs keep their addresses)."""
        source = self.source.with_loras(loras)
        if source.fingerprint == self.source.fingerprint:
            return
        loaded = getattr(self, "_loaded", [None])[0]
        if loaded is not None:
            from .source import merge_into

            merge_into(loaded, source.adapters)
        self.engine_set.use_source(source)
        self.source = source

    # --- generation ------------------------------------------------------------------------

    def request(self, prompt: str, **kwargs) -> GenerationRequest:
        return default_request(self.config, prompt, **kwargs)

    def prepare(self, req: GenerationRequest, max_tokens: int | None = None, prompts: int = 1,
                validated: bool = False) -> None:
        """Every check a request (``prompts`` of its kind in one batch) must pass before
        any work: the request's rules (unless ``validated`` already), the memory budget,
        engines for its size and batch (built now if compile on first use)."""
        if not validated:
            req.validate(self.config)  # an image needs an InP model
        memory = None
        if self.device != "cpu":
            import torch

            memory = torch.cuda.mem_get_info(torch.device(self.device))[0]
        check_budget(self.config, req, max_tokens, memory, prompts)
        self.ensure(Bucket(req.height, req.width, req.frames, prompts), self.guidance_of(req),
                    encoders=req.decode == "smooth")

    @staticmethod
    def guidance_of(req: GenerationRequest) -> str:
        """The engines' guidance mode for ``req``: batch-2 or batch-1 DiT calls."""
        return engine_guidance(req)

    def encode(self, req: GenerationRequest | Sequence[GenerationRequest]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (2N, S, E), mask (2N, S)) for the N requests' [negatives...,
        positives...]: one text-encoder call (batched guidance) or one per half."""
        reqs = [req] if isinstance(req, GenerationRequest) else list(req)
        n, guidance = len(reqs), self.guidance_of(reqs[0])
        ids, mask = self.tokenize([r.negative_prompt for r in reqs] + [r.prompt for r in reqs])
        engine = self.engine("text_encoder", guidance)
        halves = [slice(0, 2 * n)] if guidance == "batched" else [slice(0, n), slice(n, 2 * n)]
        emb = np.concatenate([to_host(engine.run({"input_ids": ids[h], "attention_mask": mask[h]})
                                      ["text_embeddings"]).astype(np.float32, copy=False) for h in halves])
        return emb, mask

    def denoise(self, req: GenerationRequest | Sequence[GenerationRequest], emb: np.ndarray, mask: np.ndarray,
                callback: StepCallback | None = None, step_times: list[float] | None = None,
                trace: list | None = None, checkpoints: Checkpoints | None = None) -> np.ndarray:
        """The final latents of :meth:`denoised` (as the reference pipeline's ``denoise``)."""
        return self.denoised(req, emb, mask, callback, step_times, trace, checkpoints).latents

    def denoised(self, req: GenerationRequest | Sequence[GenerationRequest], emb: np.ndarray, mask: np.ndarray,
                 callback: StepCallback | None = None, step_times: list[float] | None = None,
                 trace: list | None = None, checkpoints: Checkpoints | None = None) -> Denoised:
        """The denoising loop (runtime/denoiser.py) on this pipeline's engines, for N
        requests of one batch (``batch_key``; ``emb``/``mask`` from ``encode`` of them),
        each from its own seed's noise stream, so each equals its own run: float32 latents
        (N, C, F, h, w) and the step cache's report. ``step_times`` and ``trace`` (lists)
        receive each step's seconds and latents; ``checkpoints`` resumes from and saves
        LoopStates (one request only). Latents that turn NaN or infinite stop the loop with
        a NumericalError naming the step and the sampler (no state is saved past it)."""
        reqs = [req] if isinstance(req, GenerationRequest) else list(req)
        req, n = reqs[0], len(reqs)
        checkpoints = checkpoints or Checkpoints()
        if n > 1 and (checkpoints.resume is not None or checkpoints.save is not None):
            raise InputError(f"checkpoints resume and save one request's loop; got a batch of {n}")
        if checkpoints.resume is not None:
            checkpoints.resume.check(req)
            if checkpoints.resume.latents.shape != req.latent_shape(self.config):
                raise InputError(f"resume: the state's latents are {checkpoints.resume.latents.shape}, this "
                                 f"request's are {req.latent_shape(self.config)}")
        guidance = self.guidance_of(req)
        loop = Denoiser(self.config, self.engine, arrays_for(self.device), self.step_cache,
                        cuda_graphs=self.cuda_graphs and self.device != "cpu")
        cond = conditioning(self.config, req, lambda key: self.engine(key, guidance), self.clip_encoder)
        return loop.run(reqs, emb, mask, cond, callback, step_times, trace, checkpoints)

    def iter_frames(self, latents: np.ndarray, guidance: str = "batched", decode: str = "plain"
                    ) -> Iterator[np.ndarray]:
        """uint8 frames (n, H, W, 3), one decoder slice at a time; ``decode="smooth"``:
        upstream's smoothed decode (reference/smooth.py) on the VAE encoder and decoder
        engines, streamed in order."""
        z = np.asarray(latents, np.float32)
        vae = self.config.vae

        def decode_slice(context: np.ndarray, s) -> np.ndarray:
            engine = self.engine(f"vae_decoder/{decoder_variant(self.config, s)}", guidance)
            return to_host(engine.run({"context": np.ascontiguousarray(context)})["frames"]).astype(np.float32)

        def encode_slice(frames: np.ndarray) -> np.ndarray:
            engine = self.engine(str(encoder_key(frames.shape[2])), guidance)
            return to_host(engine.run({"frames": np.ascontiguousarray(frames, np.float32)})["latents"]
                           ).astype(np.float32)

        plain = (decode_slice(z[:, :, s.ctx_start:s.ctx_end], s) for s in vae.slice_plan(z.shape[2]))
        if check_decode(decode) == "smooth":
            plain = iter_smoothed(plain, vae.video_frames(z.shape[2]), vae, encode_slice, decode_slice,
                                  lambda xs: np.concatenate(xs, axis=2))
        for frames in plain:
            yield frames_to_uint8(frames[0])

    def _run(self, reqs: Sequence[GenerationRequest], callback: StepCallback | None,
             sink: Callable[[np.ndarray], None] | None, max_tokens: int | None,
             checkpoints: Checkpoints | None = None, validated: bool = False) -> list[Video]:
        """One batch (``batch_key``-equal requests): text, loop, then each video's decode."""
        t0 = time.perf_counter()
        n = len(reqs)
        self.prepare(reqs[0], max_tokens, n, validated)
        timings: dict[str, Any] = {"load": self.timings.get("load", 0.0), "prepare": time.perf_counter() - t0}
        if n > 1:
            timings["prompts"] = n  # the text and loop times below are the batch's
        t = time.perf_counter()
        emb, mask = self.encode(reqs)
        timings["text"] = time.perf_counter() - t
        t = time.perf_counter()
        steps: list[float] = []
        done = self.denoised(reqs, emb, mask, callback, steps, checkpoints=checkpoints)
        latents = done.latents
        timings["denoise"], timings["steps"] = time.perf_counter() - t, steps
        if done.cache_report is not None:
            timings["step_cache"] = done.cache_report
        videos = []
        for k in range(n):
            t, write = time.perf_counter(), 0.0
            chunks = []
            for chunk in self.iter_frames(latents[k:k + 1], self.guidance_of(reqs[k]), reqs[k].decode):
                if sink is None:
                    chunks.append(chunk)
                else:
                    w = time.perf_counter()
                    sink(chunk)
                    write += time.perf_counter() - w
            own = dict(timings, decode=time.perf_counter() - t - write, write=write)
            frames = np.concatenate(chunks) if chunks else None
            videos.append(Video(frames, self.config.sampling.fps, latents[k:k + 1], own))
        return videos

    def run(self, req: GenerationRequest, callback: StepCallback | None = None, max_tokens: int | None = None,
            checkpoints: Checkpoints | None = None) -> Video:
        return self._run([req], callback, None, max_tokens, checkpoints)[0]

    def run_batch(self, reqs: Sequence[GenerationRequest], callback: StepCallback | None = None,
                  max_tokens: int | None = None) -> list[Video]:
        """1 .. MAX_PROMPTS requests that differ only in prompt, negative prompt and seed,
        generated as one batch: one text-encoder call and, per step, DiT calls of batch
        2N (batched guidance) or two of N (sequential). Each video equals its own run
        (within float tolerance); step caching takes one decision for the whole batch."""
        reqs = list(reqs)
        check_batch(reqs, self.config, MAX_PROMPTS)
        return self._run(reqs, callback, None, max_tokens, validated=True)

    def __call__(self, prompt: str | list[str], callback: StepCallback | None = None, batch_size: int | None = None,
                 **kwargs) -> Video | list[Video]:
        """One video, or a list for a list of prompts: generated in batches of
        ``batch_size`` (default: up to MAX_PROMPTS at a time; 1: one after another), every
        request checked before the first starts; seeds ``seed``, ``seed + 1``, ..."""
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise InputError("the list of prompts is empty")
            size = min(len(prompt), MAX_PROMPTS) if batch_size is None else batch_size
            if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_PROMPTS:
                raise InputError(f"batch_size must be an integer in 1 .. {MAX_PROMPTS}, got {batch_size!r}")
            seed = kwargs.pop("seed", None)
            seed = 0 if seed is None else seed
            reqs = [self.request(p, seed=seed + k, **kwargs) for k, p in enumerate(prompt)]
            batches = [reqs[k:k + size] for k in range(0, len(reqs), size)]
            for batch in batches:  # every request checked before the first starts
                check_batch(batch, self.config, MAX_PROMPTS)
            return [video for batch in batches for video in self._run(batch, callback, None, None, validated=True)]
        if batch_size is not None:
            raise InputError("batch_size applies to a list of prompts; got one prompt")
        return self.run(self.request(prompt, **kwargs), callback)

    generate = __call__

    def generate_to(self, path: str | Path, req: GenerationRequest, callback: StepCallback | None = None,
                    max_tokens: int | None = None, checkpoints: Checkpoints | None = None) -> Video:
        """Generate ``req`` and stream its frames into ``path`` as each decoder slice comes
        (the file appears complete or not at all). Returns the timings, no frames."""
        check_output_path(path)
        writer = VideoWriter(path, self.config.sampling.fps).__enter__()
        try:
            video = self._run([req], callback, writer.write, max_tokens, checkpoints)[0]
        except BaseException as exc:  # Ctrl-C included: no partial file
            writer.__exit__(type(exc), exc, exc.__traceback__)
            raise
        t = time.perf_counter()
        writer.__exit__(None, None, None)  # ffmpeg's flush, then the rename into place
        video.timings["write"] += time.perf_counter() - t
        video.path = Path(path)
        return video

    def close(self) -> None:
        self.engine_set.close()
