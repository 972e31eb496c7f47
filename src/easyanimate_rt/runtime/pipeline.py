"""The runtime pipeline: text -> video on engines (DESIGN.md 4), checked against the
reference pipeline it reimplements.

1. tokenize the prompt and the negative prompt (runtime/tokenizer.py); run the
   text-encoder engine;
2. initial latents from the seed: the reference's noise stream (schedule.SeededNoise),
   so a seed gives the reference's video;
3. denoising loop: the reference's sampler definitions (reference/schedule.py) around
   the DiT engine; guidance batched (one batch-2 call) or sequential (two batch-1
   calls); the latents go into one persistent input buffer per step;
4. decode slice by slice through the slice-decoder engines (one per variant), each
   slice's frames streamed to the video writer as they come (constant memory).

Engines come from a directory per (model, backend, precision, guidance) in the engine
cache, named by a fingerprint of the model's files, so a changed model never meets a
stale engine; every engine's manifest is checked on load (engines.build.check_network:
artefact hash, library version, CPU/GPU, source graph). On first use, or for a size no
engine was built for, the missing engines are exported and built (compile on first
use); with ``compile=False`` such a request is a ShapeError naming the built sizes.

With cached ONNX Runtime engines and a model directory, nothing here imports torch or
transformers: start-up is onnxruntime, tokenizers and numpy. The torch backend (and a
preset's random weights) use the reference modules.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

from ..engines.budget import check_bucket_budget, check_budget
from ..engines.buckets import Bucket, bucket_shapes, graphs_needed
from ..engines.cache import MODELS_DIR, EngineCache
from ..engines.manifest import read_index
from ..errors import EasyAnimateError, EngineError, InputError, ShapeError
from ..export.spec import MAX_PROMPTS, decoder_variant
from ..media import VideoWriter, check_output_path, frames_to_uint8, save_video
from ..reference.config import ModelConfig, from_preset, model_fingerprint, preset_name, read_model_config
from ..reference.request import GenerationRequest, default_request
from ..reference.schedule import NumpySampler, SeededNoise, nonfinite_error
from .engine import Engine
from .loop_state import LoopState, request_key
from .step_cache import CacheSettings, StepCache, load_rescale, rel_l1

log = logging.getLogger(__name__)

NETWORKS = ("text_encoder", "dit", "vae")
BACKENDS = ("auto", "torch", "torch-compile", "ort")
TORCH_BACKENDS = ("torch", "torch-compile")  # the reference modules, eager or under torch.compile
ORT_ENGINES = "ort-cpu"  # the engines.build backend of the runtime's "ort"
ORT_PRECISIONS = ("fp32", "fp16")  # fp16 graphs keep their fp32 islands; ORT CPU runs both
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


def parse_backend(text: str) -> dict[str, str]:
    """``"ort"`` -> every network on ONNX Runtime; ``"dit=ort,vae=torch"`` -> per network
    (networks not named run on ``auto``). ``auto`` is ONNX Runtime on this CPU build."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"backend must be one of {list(BACKENDS)} or NETWORK=BACKEND pairs, got {text!r}")
    if "=" not in text:
        choice = dict.fromkeys(NETWORKS, text.strip())
    else:
        choice = dict.fromkeys(NETWORKS, "auto")
        named: set[str] = set()
        for part in text.split(","):
            name, eq, value = part.partition("=")
            name, value = name.strip(), value.strip()
            if not eq:
                raise InputError(f"backend: {part.strip()!r} in {text!r} is not NETWORK=BACKEND; give every network "
                                 f"as NETWORK=BACKEND, e.g. dit=ort,vae=torch")
            if name not in NETWORKS:
                raise InputError(f"backend: unknown network {name!r} in {text!r}; networks: {list(NETWORKS)}")
            if name in named:
                raise InputError(f"backend: network {name!r} is named twice in {text!r}; name each network once")
            named.add(name)
            choice[name] = value
    for name, value in choice.items():
        if value not in BACKENDS:
            raise InputError(f"backend for {name} must be one of {list(BACKENDS)}, got {value!r}")
    return {name: "ort" if value == "auto" else value for name, value in choice.items()}


def uses_torch(backends: Mapping[str, str]) -> bool:
    return any(b in TORCH_BACKENDS for b in backends.values())


def resolve_device(device: str, cpu_backend: bool = False) -> str:
    """``auto``: cuda when a CUDA device is visible (checked without importing torch on a
    machine with no NVIDIA driver) and no CPU backend was asked for; else cpu."""
    if device != "auto":
        if device != "cpu" and not (device == "cuda" or device.startswith("cuda:")):
            raise InputError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
        if device != "cpu":
            _check_cuda(device)
        return device
    if cpu_backend or not Path("/dev/nvidiactl").exists():
        return "cpu"
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def network_of(key: str) -> str:
    """The backend choice a graph follows: ``vae_decoder/first`` -> vae, ``dit_cache/head`` -> dit."""
    return "vae" if key.startswith("vae") else "dit" if key.startswith("dit") else key


def read_config(source: str | Path) -> ModelConfig | None:
    """The model's config without torch: ``easyanimate_rt.json`` or a preset; None for a
    directory that needs the loader (an upstream release directory)."""
    if Path(source).is_dir():
        return read_model_config(source)
    return from_preset(preset_name(source))


@dataclass
class Video:
    frames: np.ndarray | None  # (F, H, W, 3) uint8; None when streamed to a file
    fps: int
    latents: np.ndarray | None = None
    timings: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def save(self, path: str | Path) -> Path:
        if self.frames is None:
            raise InputError("this video was streamed to a file; it holds no frames to save")
        return save_video(self.frames, path, self.fps)


class Pipeline:
    """Text -> video on a set of engines (see the module docstring)."""

    def __init__(self, config: ModelConfig, source: str | Path, tokenizer: Callable, backends: Mapping[str, str], *,
                 cache: EngineCache, engine_dir: Path | None = None, precision: str = "fp32",
                 threads: int | None = None, seed: int = 0, compile: bool = True, fingerprint: str = "",
                 progress: Callable[[str], None] | None = None, model=None, device: str = "cpu",
                 cuda_graphs: bool = True, clip_encoder=None, step_cache: CacheSettings | None = None):
        self.config = config
        self.source = source
        self.tokenize = tokenizer  # prompts -> (input_ids, attention_mask) int64 (B, S)
        self.backends = dict(backends)
        self.cache = cache
        self.precision = precision
        self.threads = threads
        self.seed = seed
        self.compile = compile
        self.fingerprint = fingerprint
        self.progress = progress
        self._engine_dir = Path(engine_dir) if engine_dir is not None else None
        self._model = model
        self.engines: dict[tuple[str, str], Engine] = {}  # (guidance, key) -> engine
        self.timings: dict[str, float] = {}
        self.device = device
        self.cuda_graphs = cuda_graphs
        self.clip_encoder = clip_encoder  # image (H, W, 3) uint8 -> (1, K) torch; InP image-to-video
        self.step_cache = step_cache or CacheSettings()  # runtime/step_cache.py; "none": the whole DiT
        self._load_problem = ""  # why the last engine directory could not be loaded ("" when absent)
        self.last_cache_report: dict[str, Any] | None = None
        self.last_cache_pairs: list[tuple[float, float]] = []

    # --- construction --------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str | Path, backend: str = "auto", engine_dir: str | Path | None = None,
                        cache_dir: str | Path | None = None, precision: str | None = None,
                        buckets: list[Bucket] | None = None, threads: int | None = None, seed: int = 0,
                        compile: bool = True, guidance: str = "batched",
                        progress: Callable[[str], None] | None = None, device: str = "auto",
                        cuda_graphs: bool = True, clip_model: str | Path | None = None,
                        cache: str | CacheSettings = "none", cache_threshold: float | None = None) -> "Pipeline":
        """``source``: a model directory or preset name. Loads (or, on first use, builds)
        the engines ``buckets`` need (default: the model's default size). ``device``
        "cuda" runs the torch backend on the GPU (``precision`` fp32, bf16 or fp16) with
        its denoising step in a CUDA graph (runtime/cuda_graphs.py) unless
        ``cuda_graphs=False``; "auto" is cuda where a CUDA device is visible (then
        ``precision`` defaults to bf16), else cpu (fp32). ``cache``: step caching
        (runtime/step_cache.py: "fbcache", "teacache" or CacheSettings) with its
        ``cache_threshold``; the DiT then runs as its head and tail engines."""
        t0 = time.perf_counter()
        settings = cache if isinstance(cache, CacheSettings) else CacheSettings(
            cache, cache_threshold, rescale=load_rescale(source) if cache == "teacache" else None)
        explicit = backend != "auto"
        backends = parse_backend(backend)
        device = resolve_device(device, explicit and "ort" in backends.values())
        precision = precision or ("fp32" if device == "cpu" else "bf16")
        if device != "cpu":
            if not set(backends.values()) <= {"torch"}:
                backends = dict.fromkeys(NETWORKS, "torch")  # the GPU path here is the torch backend
                log.info("device %s: running every network on the torch backend", device)
        elif precision not in ORT_PRECISIONS or (precision != "fp32" and uses_torch(backends)):
            raise InputError(f"CPU engines run {list(ORT_PRECISIONS)} (ONNX Runtime) or fp32 (torch); got "
                             f"precision {precision!r}")
        path = Path(source)
        config = read_config(source)
        if config is not None and device == "cpu":  # a bucket this machine cannot run: before any work
            for b in buckets or ():
                check_bucket_budget(config, b.height, b.width, b.frames, b.prompts, guidance)
        model = None
        if config is None or uses_torch(backends):
            model = _load_model(source, seed)
            config = model.config
            if device != "cpu":
                model = model.to(device, _torch_dtype(precision))
        fingerprint = model_fingerprint(source, seed)
        cache = EngineCache(cache_dir)
        tok_dir = path / "tokenizer" if path.is_dir() else None
        clip_encoder = None
        if clip_model is not None:
            if not config.dit.clip_channels:
                raise InputError(f"a CLIP image encoder was given, but {config.name!r} takes no CLIP input")
            from ..reference.clip import ClipImageEncoder

            clip_encoder = ClipImageEncoder.from_pretrained(clip_model, "cpu")
        pipe = cls(config, source, None, backends, cache=cache, engine_dir=engine_dir, precision=precision,
                   threads=threads, seed=seed, compile=compile, fingerprint=fingerprint, progress=progress,
                   model=model, device=device, cuda_graphs=cuda_graphs, clip_encoder=clip_encoder,
                   step_cache=settings)
        wanted = buckets or [Bucket(config.sampling.height, config.sampling.width, config.sampling.frames)]
        for b in wanted:  # one build for all of them, when any is missing
            pipe.ensure(b, guidance, build_with=wanted)
        if tok_dir is None and pipe._model is not None:  # a preset in memory: its own tokenizer
            text = pipe._model.text_encoder
            pipe.tokenize = lambda prompts: tuple(t.numpy().astype(np.int64) for t in text.tokenize(prompts))
        else:
            from .tokenizer import Tokenizer

            # A preset's tokenizer is saved beside the engines it was built with.
            tok_dir = tok_dir or pipe.engine_dir(guidance) / "tokenizer"
            pipe.tokenize = Tokenizer(tok_dir, config.text_encoder.max_length)
        pipe.timings["load"] = time.perf_counter() - t0
        log.info("runtime: %s on %s (%.2fs to load)", config.name, pipe.describe(), pipe.timings["load"])
        return pipe

    def describe(self) -> str:
        if len(set(self.backends.values())) == 1:
            return next(iter(self.backends.values()))
        return ",".join(f"{k}={v}" for k, v in self.backends.items())

    def engine_dir(self, guidance: str) -> Path:
        if self._engine_dir is not None:
            return self._engine_dir / guidance
        return (self.cache.root / MODELS_DIR / f"{self.config.name}-{self.fingerprint[:16]}"
                / f"{ORT_ENGINES}-{self.precision}-{guidance}{'-split' if self.step_cache.enabled else ''}")

    def model(self):
        """The reference model (torch), loaded on first need: the torch backend, builds."""
        if self._model is None:
            self._model = _load_model(self.source, self.seed)
        return self._model

    # --- engines ---------------------------------------------------------------------------

    def ensure(self, bucket: Bucket, guidance: str = "batched", build_with: Sequence[Bucket] = ()) -> None:
        """Engines for every graph ``bucket`` runs with ``guidance``: loaded, built into the
        engine cache (compile on first use; together with ``build_with``, so several
        buckets cost one build), or a ShapeError naming what was built."""
        # An InP model encodes a mask and a masked video for every request (text-to-video too).
        shapes = bucket_shapes(self.config, bucket, guidance, image_to_video=self.config.dit.inpaint,
                               step_cache=self.step_cache.enabled)
        missing = [k for k in graphs_needed([shapes]) if not self._covers(guidance, k, shapes.dims[k])]
        ort_missing = [k for k in missing if self.backends[network_of(k)] == "ort"]
        for key in missing:
            backend = self.backends[network_of(key)]
            if backend in TORCH_BACKENDS:
                from .backends.torch import TorchEngine

                self.engines[(guidance, key)] = TorchEngine(self.model(), _spec(self.config, key),
                                                            compiled=backend == "torch-compile")
        if not ort_missing:
            return
        directory = self.engine_dir(guidance)
        if self._load_dir(directory, guidance, ort_missing, shapes.dims):
            return
        built = self._built_buckets(directory)
        if not self.compile:
            if self._load_problem:  # engines exist but cannot be used: say which file and why
                raise EngineError(f"the engines in {directory} cannot be used: {self._load_problem}; allow "
                                  f"compile on first use (drop --no-compile) to rebuild them")
            raise ShapeError(f"no engines for {bucket.name} ({guidance} guidance); built: "
                             f"{', '.join(built) or 'none'}; build them with `easyanimate-rt build --buckets "
                             f"{bucket.name}` or allow compile on first use")
        # a batch of prompts: engines for the largest batch, which every smaller one loads too
        target = replace(bucket, prompts=MAX_PROMPTS) if bucket.prompts > 1 else bucket
        self._build(directory, sorted(set(built) | {target.name} | {b.name for b in build_with}), guidance)
        if not self._load_dir(directory, guidance, ort_missing, shapes.dims):
            raise EngineError(f"{directory}: the engines just built do not cover {bucket.name}")

    def _covers(self, guidance: str, key: str, dims: Mapping[str, int]) -> bool:
        engine = self.engines.get((guidance, key))
        return engine is not None and engine.covers(dims)

    @staticmethod
    def _built_buckets(directory: Path) -> list[str]:
        try:
            return list(read_index(directory).get("buckets", []))
        except EasyAnimateError:
            return []

    def _load_dir(self, directory: Path, guidance: str, keys: list[str], dims: Mapping[str, Mapping[str, int]]
                  ) -> bool:
        """Load ``keys`` from an engine directory built for this model; False when it is
        missing, for another model, stale for this machine, or lacks a shape."""
        from ..export.index import load_export
        from .backends.ort import OrtEngine

        self._load_problem = ""
        try:
            index = read_index(directory)
        except EasyAnimateError as exc:
            if (Path(directory) / "engines.json").exists():
                self._load_problem = str(exc)
            return False
        if index.get("source_sha256") != self.fingerprint:
            log.info("%s was built for another model; rebuilding", directory)
            return False
        try:
            export = load_export(index["export"])
            loaded = {}
            for key in keys:
                entry = index["networks"].get(key)
                if entry is None:
                    return False
                # The DiT's threads spin between the loop's small ops (1.6x on the shipped
                # model; with step caching the tail's, not the head's: two spinning
                # sessions take the cores from each other, 2x slower); the others' must not, as spinning pools of idle sessions take the
                # cores from the running one (decode 45 -> 99 ms). One activation arena for
                # all engines: the decoder variants do not each keep a slice's peak.
                engine = OrtEngine(directory / entry["dir"], export.specs[key], export.path(key), self.threads,
                                   spinning=key in ("dit", "dit_cache/tail"), shared_arena=True)
                if not engine.covers(dims[key]):
                    return False
                loaded[key] = engine
        except EngineError as exc:  # a library upgrade, another CPU, a changed file: rebuild
            log.warning("cached engines in %s cannot be used (%s); rebuilding", directory, exc)
            self._load_problem = str(exc)
            return False
        except (KeyError, TypeError, OSError, EasyAnimateError) as exc:
            log.warning("engine directory %s is incomplete (%s); rebuilding", directory, exc)
            self._load_problem = f"{type(exc).__name__}: {exc}" if isinstance(exc, (KeyError, TypeError)) else str(exc)
            return False
        for key, engine in loaded.items():
            self.engines[(guidance, key)] = engine
        return True

    def _build(self, directory: Path, buckets: list[str], guidance: str) -> None:
        from ..engines.build import build_engines

        t0 = time.perf_counter()
        if self.progress:
            self.progress(f"first use: exporting and building engines for {', '.join(buckets)} into {directory}")
        build_engines(self.source, directory, ORT_ENGINES, [Bucket.parse(b) for b in buckets],
                      guidance=guidance, precision=self.precision, cache=self.cache, model=self.model(),
                      threads=self.threads, seed=self.seed, progress=self.progress,
                      index_info={"source_sha256": self.fingerprint}, encoders=self.config.dit.inpaint,
                      export_dir=directory.parent / f"export-{self.precision}",  # shared by both guidance modes
                      step_cache=self.step_cache.enabled)
        if not Path(self.source).is_dir():
            self.model().text_encoder.tokenizer.save_pretrained(str(directory / "tokenizer"))
        self.timings["build"] = self.timings.get("build", 0.0) + time.perf_counter() - t0

    def engine(self, key: str, guidance: str = "batched") -> Engine:
        try:
            return self.engines[(guidance, key)]
        except KeyError:
            raise ShapeError(f"no {key} engine for {guidance} guidance; build engines for this size "
                             f"(`easyanimate-rt build --buckets HxWxF`)") from None

    # --- generation ------------------------------------------------------------------------

    def request(self, prompt: str, **kwargs) -> GenerationRequest:
        return default_request(self.config, prompt, **kwargs)

    def prepare(self, req: GenerationRequest, max_tokens: int | None = None, prompts: int = 1) -> None:
        """Every check a request (``prompts`` of its kind in one batch) must pass before
        any work: the request's rules, the memory budget, engines for its size and batch
        (built now if compile on first use)."""
        req.validate(self.config)  # an image needs an InP model
        memory = None
        if self.device != "cpu":
            import torch

            memory = torch.cuda.mem_get_info(torch.device(self.device))[0]
        check_budget(self.config, req, max_tokens, memory, prompts)
        self.ensure(Bucket(req.height, req.width, req.frames, prompts), self.guidance_of(req))

    @staticmethod
    def guidance_of(req: GenerationRequest) -> str:
        """The engines' guidance mode for ``req``: batch-2 or batch-1 DiT calls."""
        return "sequential" if req.guidance_mode == "sequential" or req.guidance_scale == 1.0 else "batched"

    def encode(self, req: GenerationRequest | Sequence[GenerationRequest]) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings (2N, S, E), mask (2N, S)) for the N requests' [negatives...,
        positives...]: one text-encoder call (batched guidance) or one per half."""
        reqs = [req] if isinstance(req, GenerationRequest) else list(req)
        n, guidance = len(reqs), self.guidance_of(reqs[0])
        ids, mask = self.tokenize([r.negative_prompt for r in reqs] + [r.prompt for r in reqs])
        engine = self.engine("text_encoder", guidance)
        halves = [slice(0, 2 * n)] if guidance == "batched" else [slice(0, n), slice(n, 2 * n)]
        emb = np.concatenate([np.asarray(engine.run({"input_ids": ids[h], "attention_mask": mask[h]})
                                         ["text_embeddings"], np.float32) for h in halves])
        return emb, mask

    def denoise(self, req: GenerationRequest | Sequence[GenerationRequest], emb: np.ndarray, mask: np.ndarray,
                callback: StepCallback | None = None, step_times: list[float] | None = None,
                trace: list | None = None, checkpoints: Checkpoints | None = None) -> np.ndarray:
        """The reference's denoising loop on the DiT engine; float32 latents (N, C, F, h, w)
        for N requests of one batch (``batch_key``; ``emb``/``mask`` from ``encode`` of
        them), each from its own seed's noise stream, so each equals its own run.
        ``step_times`` and ``trace`` (lists) receive each step's seconds and latents;
        ``checkpoints`` resumes from and saves LoopStates (runtime/loop_state.py; one
        request only). Latents that turn NaN or infinite stop the loop with a
        NumericalError naming the step and the sampler (no state is saved past it)."""
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
        if self.device != "cpu":  # device tensors throughout, the step in a CUDA graph
            from .cuda_graphs import denoise_on_device

            if n > 1:
                raise InputError(f"the GPU loop takes one request at a time; got a batch of {n}")
            cached: dict[str, Any] = {}
            if self.step_cache.enabled:  # the head and tail modules (TorchEngine) ensure() made
                guidance = self.guidance_of(req)
                cached = dict(step_cache=StepCache(self.step_cache, req.steps),
                              head=self.engine("dit_cache/head", guidance).module,
                              tail=self.engine("dit_cache/tail", guidance).module)
            x = denoise_on_device(self.model(), req, emb, mask, device=self.device, cuda_graph=self.cuda_graphs,
                                  callback=callback, trace=trace, inpaint=self.inpaint_latents(req),
                                  clip=self.clip_condition(req), checkpoints=checkpoints, **cached)
            self.last_cache_report = cached["step_cache"].report() if cached else None
            self.last_cache_pairs = cached["step_cache"].pairs if cached else []
            return x.float().cpu().numpy()
        c = self.config.vae.latent_channels
        g = req.guidance_scale
        guidance = self.guidance_of(req)
        batched = guidance == "batched"
        cache = StepCache(self.step_cache, req.steps) if self.step_cache.enabled else None
        dit = self.engine("dit", guidance) if cache is None else None
        sampler = NumpySampler(req.sampler, req.steps)
        streams = [SeededNoise(r.seed) for r in reqs]
        shape = req.latent_shape(self.config)

        def noise() -> np.ndarray:
            return np.concatenate([s(shape) for s in streams]) if n > 1 else streams[0](shape)

        x = noise() * np.float32(sampler.init_noise_sigma)
        start, key = 0, request_key(req)
        if checkpoints.resume is not None:  # the interrupted run's latents, sampler history and noise stream
            start, x = checkpoints.resume.step, checkpoints.resume.latents.astype(np.float32, copy=True)
            sampler.history = checkpoints.resume.history
            streams[0].state = checkpoints.resume.noise
        batch = (2 if batched else 1) * n
        latents = np.empty((batch, *shape[1:]), np.float32)  # persistent input buffers
        copies = latents.reshape(-1, *x.shape)  # (2 or 1, N, ...): a view the latents go into
        timestep = np.empty((batch,), np.float32)
        # the rows of [negatives..., positives...] each DiT call takes
        branches = [slice(0, 2 * n)] if batched else [slice(0, n), slice(n, 2 * n)]
        if g == 1.0:
            branches = [slice(n, 2 * n)]  # unguided: the positive branch alone
        inpaint = self.inpaint_latents(req, guidance)
        clip = self.clip_condition(req)
        if clip is not None and n > 1:  # [negative, positive] -> [negatives..., positives...]
            clip = tuple(np.repeat(c, n, axis=0) for c in clip)

        # Per branch, built once: the text inputs, the InP latents and the CLIP inputs with
        # the image shown (the last clip_apply_ratio of the steps) and hidden.
        fixed, clip_shown, clip_hidden = [], [], []
        for b in branches:
            rows = len(range(2 * n)[b])
            fixed.append({"text": emb[b], "text_mask": mask[b]})
            if inpaint is not None:
                fixed[-1]["inpaint_latents"] = np.ascontiguousarray(np.broadcast_to(inpaint,
                                                                                    (rows, *inpaint.shape[1:])))
            shown = {"clip_embeds": clip[0][b], "clip_mask": clip[1][b]} if clip is not None else {}
            clip_shown.append(shown)
            clip_hidden.append({k: np.zeros_like(v) for k, v in shown.items()})

        def feeds(k: int, i: int) -> dict[str, np.ndarray]:
            clip_inputs = clip_shown if i >= req.steps * (1 - req.clip_apply_ratio) else clip_hidden
            return {"latents": latents, "timestep": timestep, **fixed[k], **clip_inputs[k]}

        step = (lambda i: [np.asarray(dit.run(feeds(k, i))["noise_pred"]) for k in range(len(branches))]
                ) if cache is None else self._cached_step(cache, guidance, feeds, len(branches))
        for i in range(start, req.steps):
            t0 = time.perf_counter()
            xin = sampler.scale_model_input(x, i)
            copies[:] = xin
            timestep[:] = sampler.timesteps[i]
            outs = [o[:, :c] for o in step(i)]
            out = np.concatenate(outs) if len(outs) > 1 else outs[0]
            out_u, out_c = (out[:n], out[n:]) if len(out) == 2 * n else (out, out)
            eps = sampler.epsilon(i, xin, out_u + g * (out_c - out_u), self.config.dit.prediction_type)
            x = sampler.step(i, x, eps, noise() if sampler.needs_noise else None)
            if not np.isfinite(x).all():  # before any trace, checkpoint or video sees them
                raise nonfinite_error(i + 1, req.steps, req.sampler)
            if step_times is not None:
                step_times.append(time.perf_counter() - t0)
            if trace is not None:
                trace.append(x.copy())
            if checkpoints.due(i + 1, req.steps):
                history = sampler.history
                checkpoints.save(LoopState(key, i + 1, x.copy(), None if history is None else history.copy(),
                                           streams[0].state))
            if callback is not None:
                callback(i + 1, req.steps)
        self.last_cache_report = cache.report() if cache is not None else None
        self.last_cache_pairs = cache.pairs if cache is not None else []
        return x

    def _cached_step(self, cache: StepCache, guidance: str, feeds: Callable[[int, int], dict[str, np.ndarray]],
                     n_branches: int) -> Callable[[int], list[np.ndarray]]:
        """One denoising step on the head and tail engines (runtime/step_cache.py): the
        head every step, the tail when the cache computes or checks; both guidance
        branches share the decision (signals and errors over all of them)."""
        head, tail = self.engine("dit_cache/head", guidance), self.engine("dit_cache/tail", guidance)
        residual: list[np.ndarray | None] = [None] * n_branches  # the tail residual the last computed step left
        tail_inputs = [t.name for t in tail.spec.inputs]

        def step(i: int) -> list[np.ndarray]:
            heads = []
            for k in range(n_branches):
                f = feeds(k, i)
                if residual[k] is None:
                    b, _, fr, hh, ww = f["latents"].shape
                    p, d = self.config.dit.patch_size, self.config.dit.hidden_size
                    residual[k] = np.zeros((b, fr, hh // p, ww // p, d), np.float32)
                heads.append(head.run({**f, "cached_residual": residual[k]}))
            signals = {name: np.concatenate([np.asarray(h[name]) for h in heads])
                       for name in ("first_residual", "modulated")}
            decision = cache.decide(i, signals)
            cached = [np.asarray(h["skip_pred"]) for h in heads]
            if decision == "skip":
                return cached
            outs = []
            for k, h in enumerate(heads):
                t = tail.run({name: h[name] for name in tail_inputs})
                outs.append(np.asarray(t["noise_pred"]))
                residual[k] = np.asarray(t["tail_residual"])
            pred = np.concatenate(outs)
            if decision == "check":
                cache.checked(i, rel_l1(np.concatenate(cached), pred))
            # the step before this one computed too (decisions[-1] is this step's)
            cache.observe(i, pred, consecutive=len(cache.decisions) > 1 and cache.decisions[-2] != "skip")
            cache.computed(i, signals)
            return outs

        return step

    def inpaint_latents(self, req: GenerationRequest, guidance: str = "batched") -> np.ndarray | None:
        """(1, 2C, F', h, w) mask + masked-video latents for an InP model, else None; as
        the reference builds them (ReferencePipeline.inpaint_latents), through the VAE
        encoder engines slice by slice."""
        if not self.config.dit.inpaint:
            return None
        shape = (1, 3, req.frames, req.height, req.width)
        generate = np.ones((1, 1, req.frames, 1, 1), np.float32)  # 1 = to generate
        if req.image is None:
            video = np.full(shape, -1.0, np.float32)
        else:
            image = (np.asarray(req.image, np.float32) / np.float32(127.5) - np.float32(1.0)).transpose(2, 0, 1)
            video = np.broadcast_to(image[None, :, None], shape)
            generate[:, :, 0] = 0.0
        mask = np.broadcast_to(generate, shape)
        masked = np.where(mask < 0.5, video, np.float32(-1.0)).astype(np.float32)

        def encode(x: np.ndarray) -> np.ndarray:
            parts = []
            for a, b in self.config.vae.frame_slices(req.frames):
                engine = self.engine(f"vae_encoder/{'image' if b - a == 1 else 'slice'}", guidance)
                parts.append(np.asarray(engine.run({"frames": np.ascontiguousarray(x[:, :, a:b])})["latents"]))
            return np.concatenate(parts, axis=2)

        return np.concatenate([encode(np.ascontiguousarray(mask, np.float32)), encode(masked)], axis=1)

    def clip_condition(self, req: GenerationRequest) -> tuple[np.ndarray, np.ndarray] | None:
        """(embeds (2, K), mask (2, T)) for [negative, positive], or None without CLIP input:
        zeros (hidden) except the positive branch of image-to-video with a CLIP encoder."""
        d = self.config.dit
        if not d.clip_channels:
            return None
        embeds = np.zeros((2, d.clip_channels), np.float32)
        clip_mask = np.zeros((2, d.clip_tokens), np.float32)
        if req.image is not None:
            if self.clip_encoder is None:
                log.warning("image-to-video without a CLIP vision model: the DiT gets no CLIP image embedding "
                            "(as upstream without a clip_image); pass clip_model= to add it")
            else:
                embeds[1] = self.clip_encoder(np.asarray(req.image))[0].float().numpy()
                clip_mask[1] = 1.0
        return embeds, clip_mask

    def iter_frames(self, latents: np.ndarray, guidance: str = "batched") -> Iterator[np.ndarray]:
        """uint8 frames (n, H, W, 3), one decoder slice at a time."""
        z = np.asarray(latents, np.float32)
        for s in self.config.vae.slice_plan(z.shape[2]):
            engine = self.engine(f"vae_decoder/{decoder_variant(self.config, s)}", guidance)
            frames = engine.run({"context": np.ascontiguousarray(z[:, :, s.ctx_start:s.ctx_end])})["frames"]
            yield frames_to_uint8(np.asarray(frames)[0])

    def _run(self, reqs: Sequence[GenerationRequest], callback: StepCallback | None,
             sink: Callable[[np.ndarray], None] | None, max_tokens: int | None,
             checkpoints: Checkpoints | None = None) -> list[Video]:
        """One batch (``batch_key``-equal requests): text, loop, then each video's decode."""
        t0 = time.perf_counter()
        n = len(reqs)
        self.prepare(reqs[0], max_tokens, n)
        timings: dict[str, Any] = {"load": self.timings.get("load", 0.0), "prepare": time.perf_counter() - t0}
        if n > 1:
            timings["prompts"] = n  # the text and loop times below are the batch's
        t = time.perf_counter()
        emb, mask = self.encode(reqs)
        timings["text"] = time.perf_counter() - t
        t = time.perf_counter()
        steps: list[float] = []
        latents = self.denoise(reqs, emb, mask, callback, steps, checkpoints=checkpoints)
        timings["denoise"], timings["steps"] = time.perf_counter() - t, steps
        if self.last_cache_report is not None:
            timings["step_cache"] = self.last_cache_report
        videos = []
        for k in range(n):
            t, write = time.perf_counter(), 0.0
            chunks = []
            for chunk in self.iter_frames(latents[k:k + 1], self.guidance_of(reqs[k])):
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
        (within float tolerance); step caching takes one decision for the whole batch.
        On the GPU loop they run one after another."""
        reqs = list(reqs)
        if not 1 <= len(reqs) <= MAX_PROMPTS:
            raise InputError(f"a batch holds 1 .. {MAX_PROMPTS} requests, got {len(reqs)}")
        for req in reqs:
            req.validate(self.config)
        first = batch_key(reqs[0])
        for req in reqs[1:]:
            other = batch_key(req)
            for name, value in first.items():
                if not _same(value, other[name]):
                    raise InputError(f"requests in one batch differ only in prompt, negative prompt and seed; "
                                     f"{name} is {value!r} in the first and {other[name]!r} in another")
        if self.device != "cpu" and len(reqs) > 1:
            return [self.run(req, callback, max_tokens) for req in reqs]
        return self._run(reqs, callback, None, max_tokens)

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
            for req in reqs:
                req.validate(self.config)
            return [video for k in range(0, len(reqs), size) for video in self.run_batch(reqs[k:k + size], callback)]
        if batch_size is not None:
            raise InputError("batch_size applies to a list of prompts; got one prompt")
        return self.run(self.request(prompt, **kwargs), callback)

    generate = __call__

    def generate_to(self, path: str | Path, req: GenerationRequest, callback: StepCallback | None = None,
                    max_tokens: int | None = None, checkpoints: Checkpoints | None = None) -> Video:
        """Generate ``req`` and stream its frames into ``path`` as each decoder slice comes
        (the file appears complete or not at all). Returns the timings, no frames."""
        check_output_path(path)
        req.validate(self.config)
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
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()


TORCH_PRECISIONS = ("fp32", "bf16", "fp16")


def batch_key(req: GenerationRequest) -> dict[str, Any]:
    """What requests of one batch share: everything but the prompts and the seed."""
    return {f.name: getattr(req, f.name) for f in fields(req) if f.name not in ("prompt", "negative_prompt", "seed")}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return a is b or (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and np.array_equal(a, b))
    return a == b


def _torch_dtype(precision: str):
    import torch

    if precision not in TORCH_PRECISIONS:
        raise InputError(f"precision for the torch backend must be one of {list(TORCH_PRECISIONS)}, got {precision!r}")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]



def _check_cuda(device: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is visible (torch.cuda.is_available() is False)")


def _spec(config: ModelConfig, key: str):
    from ..export.spec import CACHE_NETWORK, NETWORKS, make_specs

    return next(s for s in make_specs(config, networks=NETWORKS + (CACHE_NETWORK,)) if s.key == key)


def _load_model(source: str | Path, seed: int):
    from ..reference.weights import load_model_or_preset

    return load_model_or_preset(source, seed=seed)
