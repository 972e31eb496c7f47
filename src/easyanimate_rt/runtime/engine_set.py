"""The engines a pipeline runs: (model source, backend per network, precision, guidance,
buckets) resolved to loaded Engines, one per (guidance, graph key), built on first use.

Engine-building backends (runtime/backends: ort-*, trt, rtx) keep one engine directory
per (model fingerprint, backend, precision, guidance) in the engine cache; every load is
checked against the manifests (engines.build.check_network), and an engine that was
never gated on this machine (an ahead-of-time TensorRT-RTX plan) passes the parity gate
through its own Engine class before it is used. The torch backends run the reference
modules (TorchEngine) and need no directory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Mapping, Sequence


from ..engines.buckets import Bucket, BucketShapes, bucket_shapes, graphs_needed
from ..engines.cache import MODELS_DIR, EngineCache
from ..engines.manifest import Manifest, read_index
from ..errors import EasyAnimateError, EngineError, ShapeError
from ..export.spec import MAX_PROMPTS, ExportSpec, spec_of
from .backends import gate_runner
from .backends import backend as backend_entry
from .engine import Engine, first_output
from .choice import TORCH, network_of
from .source import ModelSource

log = logging.getLogger(__name__)


class EngineSet:
    """Engines by (guidance, key), loaded or built on demand (:meth:`ensure`)."""

    def __init__(self, source: ModelSource, config, backends: Mapping[str, str], model: Callable[[], object], *,
                 cache: EngineCache, engine_dir: Path | None = None, precision: str = "fp32",
                 threads: int | None = None, compile: bool = True, device: str = "cpu", split: bool = False,
                 progress: Callable[[str], None] | None = None):
        self.source, self.config, self.backends, self.model = source, config, dict(backends), model
        self.cache, self.root, self.precision, self.threads = cache, engine_dir, precision, threads
        self.compile, self.device, self.split, self.progress = compile, device, split, progress
        self.engines: dict[tuple[str, str], Engine] = {}
        self.build_seconds = 0.0
        self._problem = ""  # why the last engine directory could not be loaded ("" when absent)

    def directory(self, guidance: str, backend: str = "ort-cpu") -> Path:
        """Where ``backend``'s engines of this model, precision and guidance live: in the
        engine cache, or under ``engine_dir=`` (``DIR/guidance`` for ort-cpu, else
        ``DIR/<backend>-<guidance>``)."""
        split = "-split" if self.split else ""
        if self.root is not None:
            return Path(self.root) / (guidance if backend == "ort-cpu" else f"{backend}-{guidance}{split}")
        return (self.cache.root / MODELS_DIR / f"{self.config.name}-{self.source.fingerprint[:16]}"
                / f"{backend}-{self.precision}-{guidance}{split}")

    def engine(self, key: str, guidance: str = "batched") -> Engine:
        try:
            return self.engines[(guidance, key)]
        except KeyError:
            raise ShapeError(f"no {key} engine for {guidance} guidance; build engines for this size "
                             f"(`easyanimate-rt build --buckets HxWxF`)") from None

    def ensure(self, bucket: Bucket, guidance: str = "batched", build_with: Sequence[Bucket] = (),
               encoders: bool = False) -> None:
        """Engines for every graph ``bucket`` runs with ``guidance``: loaded, built into the
        engine cache (compile on first use; together with ``build_with``, so several
        buckets cost one build), or a ShapeError naming what was built. ``encoders``: the
        VAE encoder slices too (the smoothed decode re-encodes the video)."""
        # An InP model encodes a mask and a masked video for every request (text-to-video too).
        encoders = encoders or self.config.dit.inpaint
        shapes = bucket_shapes(self.config, bucket, guidance, image_to_video=encoders, step_cache=self.split)
        built_by: dict[str, list[str]] = {}  # engine-building backend -> its missing graphs
        for key in graphs_needed([shapes]):
            engine = self.engines.get((guidance, key))
            if engine is not None and engine.covers(shapes.dims[key]):
                continue
            backend = self.backends[network_of(key)]
            if backend in TORCH:
                from .backends.torch import TorchEngine

                self.engines[(guidance, key)] = TorchEngine(self.model(), spec_of(self.config, key),
                                                            compiled=backend == "torch-compile")
            else:
                built_by.setdefault(backend, []).append(key)
        for backend, keys in built_by.items():
            self._ensure_built(backend, keys, bucket, shapes, guidance, build_with, encoders)

    def _ensure_built(self, backend: str, keys: list[str], bucket: Bucket, shapes: BucketShapes, guidance: str,
                      build_with: Sequence[Bucket], encoders: bool = False) -> None:
        """``keys`` from ``backend``'s engine directory: loaded, or built on first use."""
        directory = self.directory(guidance, backend)
        if self._load(directory, backend, guidance, keys, shapes.dims):
            return
        built = _built_buckets(directory)
        if not self.compile:
            if self._problem:  # engines exist but cannot be used: say which file and why
                raise EngineError(f"the engines in {directory} cannot be used: {self._problem}; allow "
                                  f"compile on first use (drop --no-compile) to rebuild them")
            raise ShapeError(f"no engines for {bucket.name} ({guidance} guidance); built: "
                             f"{', '.join(built) or 'none'}; build them with `easyanimate-rt build --buckets "
                             f"{bucket.name}` or allow compile on first use")
        if self._swap_lora(directory, backend, guidance, keys, shapes):
            return
        # a batch of prompts: engines for the largest batch, which every smaller one loads too
        target = replace(bucket, prompts=MAX_PROMPTS) if bucket.prompts > 1 else bucket
        self._build(directory, backend, sorted(set(built) | {target.name} | {b.name for b in build_with}), guidance,
                    encoders or _has_encoders(directory))
        if not self._load(directory, backend, guidance, keys, shapes.dims):
            raise EngineError(f"{directory}: the engines just built do not cover {bucket.name}")

    def _swap_lora(self, directory: Path, backend: str, guidance: str, keys: list[str], shapes: BucketShapes
                   ) -> bool:
        """A LoRA set's ONNX Runtime CPU engines made from the base model's engines with the
        merged weights swapped into the optimised graphs (engines/ort_swap.py: no export,
        no graph optimisation, each swapped graph parity-gated against the merged
        reference; ~0.5 s against a ~30 s build on the shipped model). False (then a full
        build) without base engines, with ``engine_dir=`` (one folder for every set), or
        where a weight is not found unchanged in them (logged)."""
        if backend != "ort-cpu" or not self.source.adapters or self.root is not None:
            return False
        from ..engines.ort_swap import derive_lora_engines

        base_dir = directory.parent.with_name(f"{self.config.name}-{self.source.base_fingerprint[:16]}") \
            / directory.name
        t0 = time.perf_counter()
        if not derive_lora_engines(self.model(), self.source.adapters, base_dir, directory, runner=gate_runner,
                                   threads=self.threads, index_info={"source_sha256": self.source.fingerprint}):
            return False
        self.build_seconds += time.perf_counter() - t0
        if self.progress:
            self.progress(f"LoRA: engines derived from the base model's in {time.perf_counter() - t0:.1f}s")
        return self._load(directory, backend, guidance, keys, shapes.dims)

    def _load(self, directory: Path, backend: str, guidance: str, keys: list[str],
              dims: Mapping[str, Mapping[str, int]]) -> bool:
        """Load ``keys`` from an engine directory built for this model; False when it is
        missing, for another model, stale for this machine, or lacks a shape."""
        from ..export.index import load_export

        self._problem = ""
        try:
            index = read_index(directory)
        except EasyAnimateError as exc:
            if (Path(directory) / "engines.json").exists():
                self._problem = str(exc)
            return False
        if index.get("source_sha256") != self.source.fingerprint:
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
                # model; with step caching the tail's, not the head's: two spinning sessions
                # take the cores from each other, 2x slower); the others' must not, as
                # spinning pools of idle sessions take the cores from the running one
                # (decode 45 -> 99 ms).
                engine = backend_entry(backend).load(directory / entry["dir"], export.specs[key], export.path(key),
                                                     threads=self.threads, device=self.device,
                                                     spinning=key in ("dit", "dit_cache/tail"))
                if not engine.covers(dims[key]):
                    return False
                self._gate_once(engine, directory / entry["dir"], export.specs[key], export.root / key)
                loaded[key] = engine
        except EngineError as exc:  # a library upgrade, another CPU, a changed file: rebuild
            log.warning("cached engines in %s cannot be used (%s); rebuilding", directory, exc)
            self._problem = str(exc)
            return False
        except (KeyError, TypeError, OSError, EasyAnimateError) as exc:
            log.warning("engine directory %s is incomplete (%s); rebuilding", directory, exc)
            self._problem = f"{type(exc).__name__}: {exc}" if isinstance(exc, (KeyError, TypeError)) else str(exc)
            return False
        for key, engine in loaded.items():
            self.engines[(guidance, key)] = engine
        return True

    def _gate_once(self, engine: Engine, entry: Path, spec: ExportSpec, graph_dir: Path) -> None:
        """An engine never gated where it now runs (built ahead of time, or on a machine
        that could not run it) passes the parity gate through this Engine before use; the
        figures go into its manifest. A miss is an EngineError with the figures."""
        manifest = getattr(engine, "manifest", None)
        if not isinstance(manifest, Manifest) or manifest.parity.get("ok"):
            return
        from ..engines.build import parity_feeds, parity_gate

        spec = spec.replace(profiles=tuple(engine.profiles()))  # the shapes this engine was built for
        log.info("%s: first use of an engine not gated here (%s); running the parity gate", spec.key,
                 manifest.parity.get("skipped", "no figures"))
        run = first_output(engine, spec.output_names[0])
        manifest.parity = {**parity_gate(run, spec, self.model(), parity_feeds(spec, graph_dir)),
                           "gated_at_load": self.device}
        manifest.save(entry)

    def _build(self, directory: Path, backend: str, buckets: list[str], guidance: str, encoders: bool) -> None:
        from ..engines.build import build_engines

        t0 = time.perf_counter()
        if self.progress:
            self.progress(f"first use: exporting and building engines for {', '.join(buckets)} into {directory}")
        build_engines(self.source.name, directory, backend_entry(backend).builder,
                      [Bucket.parse(b) for b in buckets], guidance=guidance, precision=self.precision,
                      cache=self.cache, model=self.model(), threads=self.threads, seed=self.source.seed,
                      progress=self.progress, index_info={"source_sha256": self.source.fingerprint},
                      encoders=encoders or self.config.dit.inpaint,
                      export_dir=directory.parent / f"export-{self.precision}",  # shared by both guidance modes
                      step_cache=self.split, runner=gate_runner, adapters=self.source.adapters)
        if self.source.path is None:  # a preset's tokenizer, beside the engines it was built with
            self.model().text_encoder.tokenizer.save_pretrained(str(directory / "tokenizer"))
        self.build_seconds += time.perf_counter() - t0

    #: engine sets of recent sources kept loaded (a server's workers switch LoRA sets per job)
    KEEP_SOURCES = 2

    def use_source(self, source: ModelSource) -> None:
        """The same model with other adapters from now on: its engines are its own (their
        directory is named by the source's fingerprint), loaded or built on demand; the
        engines of the last :attr:`KEEP_SOURCES` sources stay loaded (a small LRU)."""
        if source.fingerprint == self.source.fingerprint:
            return
        kept = vars(self).setdefault("_kept", {})  # fingerprint -> engines, oldest first
        if self.engines:
            kept[self.source.fingerprint] = self.engines
        self.engines = kept.pop(source.fingerprint, {})
        while len(kept) > self.KEEP_SOURCES - 1:
            for engine in kept.pop(next(iter(kept))).values():
                engine.close()
        self.source = source

    def close(self) -> None:
        for engines in vars(self).pop("_kept", {}).values():
            for engine in engines.values():
                engine.close()
        for engine in self.engines.values():
            engine.close()
        self.engines.clear()


def _has_encoders(directory: Path) -> bool:
    """Whether an engine directory holds VAE encoder engines (a rebuild keeps them)."""
    try:
        return any(str(k).startswith("vae_encoder/") for k in read_index(directory).get("networks", {}))
    except EasyAnimateError:
        return False


def _built_buckets(directory: Path) -> list[str]:
    try:
        return list(read_index(directory).get("buckets", []))
    except EasyAnimateError:
        return []
