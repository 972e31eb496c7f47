"""``build``: exported graphs (or a model, exported first) -> engines for a set of buckets.

1. read the export (or export exactly the graphs the buckets need from a model
   directory or preset);
2. turn the buckets into shapes and optimisation profiles per graph (engines.buckets),
   refusing impossible buckets before any work;
3. per graph, look the build up in the engine cache by its key, else build it (ONNX
   Runtime session + optimised model, or a TensorRT / TensorRT-RTX plan);
4. parity gate where the backend runs on this machine: the engine's outputs on the
   spec's saved sample and at each profile's shape against the float32 torch reference,
   within the precision's tolerance; the figures go into the manifest, and a failed
   gate leaves nothing in the cache;
5. copy the entries into the engine directory and write ``engines.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import EngineError, ExportError, InputError
from ..export.index import INDEX_NAME as EXPORT_INDEX
from ..export.index import ExportIndex, load_export
from ..export.spec import CACHE_NETWORK, INPUTS_NAME, NETWORKS, DimSpec, ExportSpec, Profile
from ..fileio import claim_dir, mark_dir, sha256_files, staged_dir
from ..reference.config import ModelConfig
from ..tolerances import TOLERANCES, error_stats, within
from . import onnxruntime as ortb
from .budget import check_bucket_budget
from .buckets import Bucket, bucket_shapes, graphs_needed, profiles_for
from .cache import EngineCache, cache_key
from .manifest import BACKENDS, INDEX_NAME, Manifest, cpu_name, cuda_visible, digest, onnx_files, write_index

#: What a build may export from a model: every network and the DiT's step-caching split.
EXPORT_NETWORKS = NETWORKS + (CACHE_NETWORK,)
log = logging.getLogger(__name__)

PLAN_NAME = "engine.plan"


@dataclass
class NetworkBuild:
    key: str
    entry: Path          # the cache entry
    manifest: Manifest
    built: bool          # False: reused from the cache


def _versions(backend: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg: str) -> str:
        try:
            return version(pkg)
        except PackageNotFoundError:
            return "absent"

    out = {"easyanimate_rt": v("easyanimate-rt")}
    if backend.startswith("ort"):
        out["onnxruntime"] = ortb.version()
    elif backend == "rtx":
        from . import tensorrt_rtx

        out["tensorrt_rtx"] = tensorrt_rtx.version()
    else:
        from .tensorrt import import_tensorrt

        out["tensorrt"] = import_tensorrt().__version__
    return out


def _target(backend: str, compute_capability: str | None) -> dict[str, Any]:
    if backend == "rtx":
        from . import tensorrt_rtx

        if compute_capability is None and runs_here("ort-cuda"):  # a local GPU: build for it
            from .tensorrt import local_gpu

            return {**local_gpu(), "kind": "gpu"}
        cc = compute_capability or tensorrt_rtx.DEFAULT_COMPUTE_CAPABILITY
        if cc not in tensorrt_rtx.compute_capabilities():  # before any export or build
            raise InputError(f"compute capability must be one of {tensorrt_rtx.compute_capabilities()}, got {cc!r}")
        return {"kind": "aot", "compute_capability": cc}
    if compute_capability is not None:
        raise InputError(f"--compute-capability is for ahead-of-time builds (--backend rtx), not {backend}")
    if backend == "ort-cpu":
        return {"kind": "cpu", "name": cpu_name()}
    from .tensorrt import local_gpu

    return local_gpu(backend)


def runs_here(backend: str) -> bool:
    """Whether engines of ``backend`` can run on this machine (the parity gate needs it)."""
    if backend == "ort-cpu":
        return True
    if backend == "rtx":
        return False  # ahead of time for a named target; the runtime on a GPU checks it
    return cuda_visible()


def widen(spec: ExportSpec, profiles: Sequence[Profile]) -> ExportSpec:
    """``spec`` with ``profiles`` and dimension ranges that hold them."""
    dims = []
    for d in spec.dims:
        lo = min([d.min] + [p.dims[d.name][0] for p in profiles])
        hi = max([d.max] + [p.dims[d.name][2] for p in profiles])
        m = d.multiple
        dims.append(DimSpec(d.name, lo // m * m or m, -(-hi // m) * m, m, d.doc))
    return spec.replace(dims=tuple(dims), profiles=tuple(profiles))


# --- parity gate ----------------------------------------------------------------------------


def parity_feeds(spec: ExportSpec, graph_dir: Path) -> list[dict[str, np.ndarray]]:
    """The spec's saved sample inputs (where a profile holds their shapes), and fresh
    inputs at each profile's opt shape."""
    feeds = []
    saved = graph_dir / INPUTS_NAME
    if saved.is_file():
        with np.load(saved) as data:
            sample = {t.name: data[t.name] for t in spec.inputs}
        dims = spec.dims_of({k: v.shape for k, v in sample.items()})
        if any(all(lo <= dims[n] <= hi for n, (lo, _, hi) in p.dims.items()) for p in spec.profiles):
            feeds.append(sample)  # (an engine runs the shapes of its profiles only)
    for i, p in enumerate(spec.profiles):
        feeds.append(spec.random_inputs(spec.opt_dims(p), seed=100 + i))
    return feeds


def parity_gate(run: Callable[[dict[str, np.ndarray]], np.ndarray], spec: ExportSpec, model,
                feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, Any]:
    """Run the engine and the torch reference on ``feeds``; the worst figures, or an
    EngineError saying by how much the engine misses the tolerance."""
    from ..export.graphs import run_torch

    name = spec.precision.tolerance
    worst: dict[str, Any] = {"max_abs": 0.0, "cosine": 1.0, "finite": True}
    for feed in feeds:
        expected = run_torch(model, spec, feed)[spec.output_names[0]]
        stats = error_stats(run(feed), expected)
        worst = {"max_abs": max(worst["max_abs"], stats["max_abs"]), "cosine": min(worst["cosine"], stats["cosine"]),
                 "finite": worst["finite"] and stats["finite"]}
        if not within(stats, name):
            max_abs, min_cos = TOLERANCES[name]
            raise EngineError(f"{spec.key}: parity gate failed: max_abs {stats['max_abs']:.3g} (allowed {max_abs}), "
                              f"cosine {stats['cosine']:.6f} (allowed >= {min_cos}) against the torch reference; "
                              f"the engine was not cached")
    return {"tolerance": name, "inputs": len(feeds), **worst, "ok": True}


# --- one network ---------------------------------------------------------------------------


#: The parity gate's engine: (staged entry, spec, source graph, backend, threads) -> a
#: function from feeds to the first output as a host array. The runtime passes one that
#: loads its own Engine class, so the gate runs the code generation runs.
EngineRunner = Callable[[Path, ExportSpec, Path, str, "int | None"], Callable[[dict[str, np.ndarray]], np.ndarray]]


def _build_entry(staging: Path, *, spec: ExportSpec, onnx_path: Path, graph_dir: Path, backend: str,
                 bucket_index: dict[str, int], fields: dict[str, Any], key: str, model_fn, threads: int | None,
                 compute_capability: str | None, timing_cache: Path | None, runner: EngineRunner | None = None
                 ) -> None:
    t0 = time.perf_counter()
    profile_shapes = [spec.profile_shapes(p) for p in spec.profiles]
    device_memory: list[int] = []  # TensorRT: activation bytes per profile, where the build can tell
    io: list[dict[str, str]] = []    # TensorRT: the plan's tensors, for buffer plans without deserializing
    if backend.startswith("ort"):
        source, fusion = onnx_path, None
        if backend == "ort-cpu" and spec.key == "dit" and runs_here(backend):
            source, fusion = _fusions(onnx_path, staging, spec, graph_dir, model_fn, threads)
        out = ortb.build(source, staging, backend, threads, profile_shapes)
        artifact, flags = out["artifact"], out["flags"]
        if fusion is not None:
            flags["transformer_fusions"] = fusion
        (staging / "fused.onnx").unlink(missing_ok=True)
    else:
        if backend == "rtx":
            from . import tensorrt_rtx

            trt = tensorrt_rtx._import()
        else:
            from .tensorrt import import_tensorrt

            trt = import_tensorrt()
        from .tensorrt import build_plan

        built = build_plan(trt, onnx_path, profile_shapes, compute_capability=fields["target"].get("compute_capability")
                           if backend == "rtx" else None, timing_cache=timing_cache, **fields["flags"])
        (staging / PLAN_NAME).write_bytes(built.plan)
        io, device_memory = built.io, built.device_memory
        artifact, flags = PLAN_NAME, dict(fields["flags"])
    seconds = time.perf_counter() - t0
    path = staging / artifact
    manifest = Manifest(
        key=spec.key, backend=backend, precision=spec.precision.name, onnx_sha256=fields["onnx_sha256"],
        spec_sha256=fields["spec_sha256"], buckets=bucket_index,
        profiles=[{"name": p.name, "dims": {k: list(v) for k, v in p.dims.items()},
                   "shapes": {k: [list(s) for s in v] for k, v in spec.profile_shapes(p).items()}}
                  for p in spec.profiles],
        flags=flags, versions=fields["versions"], target=fields["target"],
        artifact={"file": artifact, "bytes": path.stat().st_size, "sha256": sha256_files([path])},
        build_seconds=round(seconds, 3), parity={"skipped": f"{backend} engines do not run on this machine"},
        device_memory=device_memory, cache_key=key, io=io)
    manifest.save(staging)  # first: the gate loads the staged entry as a later run loads the cached one
    if runs_here(backend):
        make = runner or _library_runner
        run = make(staging, spec, onnx_path, backend, threads)
        manifest.parity = parity_gate(run, spec, model_fn(), parity_feeds(spec, graph_dir))
        manifest.save(staging)


def _library_runner(staging: Path, spec: ExportSpec, onnx_path: Path, backend: str, threads: int | None
                    ) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """The gate's engine where no runtime gave its own (engines used as a library): the
    library's session or polygraphy's TrtRunner on the staged artefact."""
    manifest = Manifest.load(staging)
    if backend.startswith("ort"):
        session = ortb.load(staging, manifest.artifact["file"], backend, threads,
                            [spec.profile_shapes(p) for p in spec.profiles])
        return lambda feed: session.run(None, {k: np.ascontiguousarray(v) for k, v in feed.items()})[0]
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    trt_runner = TrtRunner(EngineFromBytes(BytesFromPath(str(staging / PLAN_NAME))))
    trt_runner.activate()
    return lambda feed: trt_runner.infer(feed)[spec.output_names[0]]


def _fusions(onnx_path: Path, staging: Path, spec: ExportSpec, graph_dir: Path, model_fn, threads: int | None
             ) -> tuple[Path, dict[str, Any]]:
    """ONNX Runtime's transformer fusions on the DiT graph, kept only if the fused graph
    passes the parity gate and runs faster than the plain one on the same inputs."""
    cfg = ModelConfig.from_dict(_config_of(graph_dir))
    fused = staging / "fused.onnx"
    counts = ortb.try_fusions(onnx_path, fused, cfg.dit.num_attention_heads, cfg.dit.hidden_size)
    if counts is None:
        return onnx_path, {"applied": False, "reason": "the optimiser does not handle this graph"}
    feeds = parity_feeds(spec, graph_dir)
    sessions = {name: ortb.load(path.parent, path.name, "ort-cpu", threads) for name, path in
                (("plain", onnx_path), ("fused", fused))}
    try:
        parity_gate(lambda f: sessions["fused"].run(None, f)[0], spec, model_fn(), feeds)
        ok = True
    except EngineError:
        ok = False
    seconds = {name: ortb.time_session(sess, feeds[-1]) for name, sess in sessions.items()}
    keep = ok and seconds["fused"] < seconds["plain"]
    info = {"applied": keep, "fused_ops": counts, "parity": ok,
            "plain_ms": round(seconds["plain"] * 1e3, 3), "fused_ms": round(seconds["fused"] * 1e3, 3)}
    log.info("%s: transformer fusions %s (%s)", spec.key, "kept" if keep else "dropped", info)
    return (fused if keep else onnx_path), info


def _config_of(graph_dir: Path) -> dict[str, Any]:
    import json

    return json.loads((graph_dir.parent / EXPORT_INDEX).read_text())["config"]


# --- the command ---------------------------------------------------------------------------


def _export_for(source: str, out: Path, precision: str, keys_of: Callable[[ModelConfig], list[str]], seed: int,
                progress, model=None, adapters: Sequence[Any] = ()) -> ExportIndex:
    """Export the graphs ``keys_of(config)`` names, from a model directory or preset, into
    ``out``; graphs an earlier export of the same model (by fingerprint) left there are
    reused. With two or more cores the DiT, the slowest graph, is traced in a second
    process while this one traces the rest. ``adapters``: LoRA adapters merged into the
    model (``model`` has them merged; the second process merges them too), part of the
    export's fingerprint."""
    from ..export.index import check_graph
    from ..export.index import read_index as read_export_index
    from ..export.index import write_index as write_export_index
    from ..export.onnx import _versions as export_versions
    from ..export.onnx import export_graph
    from ..export.spec import make_specs
    from ..reference.config import adapters_fingerprint, model_fingerprint
    from ..reference.weights import load_model_or_preset

    fingerprint = adapters_fingerprint(model_fingerprint(source, seed), adapters)
    if model is None:
        model = load_model_or_preset(source, seed=seed)
        if adapters:
            from ..reference.lora import merge_logged

            merge_logged(model, adapters)
    keys = keys_of(model.config)
    have: set[str] = set()
    if (out / EXPORT_INDEX).is_file():
        try:
            old = read_export_index(out)
        except ExportError as exc:
            log.warning("%s; exporting again", exc)
            old = {}
        if old.get("source_sha256") == fingerprint and old.get("precision") == precision:
            for k in set(old.get("graphs", [])) & set(keys):
                try:
                    check_graph(out, k)  # a damaged graph is exported again, never built from
                    have.add(k)
                except ExportError as exc:
                    log.warning("%s: exporting %s again", exc, k)
                    if progress:
                        progress(f"{k}: the exported graph is damaged, exporting it again")
    mark_dir(out, "export directory")
    specs = [s for s in make_specs(model.config, precision, EXPORT_NETWORKS) if s.key in keys and s.key not in have]
    if progress and have & set(keys):
        progress(f"reusing the export of {', '.join(sorted(have & set(keys)))}")
    child = None
    # the slowest graph: the whole DiT, or the step-caching tail when only the split is asked for
    slowest = next((k for k in ("dit", "dit_cache/tail") if k in [s.key for s in specs]), None)
    if len(specs) > 1 and slowest and (os.cpu_count() or 1) >= 2:
        # A plain subprocess, not multiprocessing: spawn would re-run the caller's script.
        import subprocess
        import sys

        code = ("import sys; from easyanimate_rt.engines.build import _export_in_child; "
                "_export_in_child(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6:])")
        lora_args = [f"{a.path}\t{a.weight!r}\t{a.sha256}" for a in adapters]
        child = subprocess.Popen([sys.executable, "-c", code, str(source), str(seed), precision, slowest, str(out),
                                  *lora_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        specs = [s for s in specs if s.key != slowest]
        if progress:
            progress(f"export {slowest} (in a second process)")
    try:
        for spec in specs:
            if progress:
                progress(f"export {spec.key}")
            export_graph(model, spec, out)
        if child is not None:
            _, err = child.communicate()
            if child.returncode:
                last = (err.strip().splitlines() or ["(no output)"])[-1]
                raise ExportError(f"{slowest}: the export process failed (exit {child.returncode}): {last}")
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait()
    src = str(Path(source).resolve()) if Path(source).is_dir() else source
    write_export_index(out, model=model.config.name, source=src, seed=seed, precision=precision,
                       graphs=sorted(set(keys) | have), config=model.config.to_dict(), versions=export_versions(),
                       source_sha256=fingerprint)
    return load_export(out)


def _export_in_child(source: str, seed: int, precision: str, key: str, out: str, loras: Sequence[str] = ()) -> None:
    from ..export.onnx import export_graph
    from ..export.spec import make_specs
    from ..reference.weights import load_model_or_preset

    logging.getLogger("easyanimate_rt").setLevel(logging.WARNING)
    model = load_model_or_preset(source, seed=seed)
    if loras:  # the parent's adapters, the files checked against their hashes when read
        from ..reference.lora import Adapter, merge_loras

        merge_loras(model, [Adapter(path, float(weight), sha) for path, weight, sha in
                            (item.split("\t") for item in loras)])
    spec = next(s for s in make_specs(model.config, precision, EXPORT_NETWORKS) if s.key == key)
    export_graph(model, spec, out)


def _encoders(config: ModelConfig, asked: bool) -> bool:
    """Whether a build includes the VAE encoder slices: asked, an InP model (its mask and
    masked video), or a model whose default decode re-encodes (``sampling.decode`` smooth)."""
    return asked or config.dit.inpaint or config.sampling.decode == "smooth"


def build_engines(source: str | Path, out_dir: str | Path, backend: str, buckets: Sequence[Bucket], *,
                  guidance: str = "batched", ranged: bool = False, precision: str = "fp32",
                  compute_capability: str | None = None, cache: EngineCache | None = None, model=None,
                  threads: int | None = None, seed: int = 0, flags: dict[str, Any] | None = None,
                  progress: Callable[[str], None] | None = None,
                  index_info: dict[str, Any] | None = None, encoders: bool = False,
                  export_dir: Path | None = None, step_cache: bool = False,
                  runner: EngineRunner | None = None, adapters: Sequence[Any] = ()) -> list[NetworkBuild]:
    """Build (or reuse from ``cache``) the engines ``buckets`` need; see the module docstring.
    ``encoders``: also the VAE encoder slices (always for an InP model's mask and masked-video
    latents, and for a model whose default decode is upstream's smoothed one, which re-encodes);
    ``step_cache``: the DiT as its head and tail graphs (runtime/step_cache.py), not whole;
    ``export_dir``: where a model source is exported (default ``out_dir/export``; graphs of
    the same model already there are reused); ``runner``: the parity gate's engine
    (:data:`EngineRunner`; the runtime and the CLI pass the runtime's Engine class);
    ``adapters``: LoRA adapters merged into the model (``model``, when given, has them
    merged already), part of the export's fingerprint."""
    if backend not in BACKENDS:
        raise InputError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if not buckets:
        raise InputError("at least one bucket is needed (--buckets HxWxF,...)")
    out_dir = claim_dir(out_dir, (INDEX_NAME,), "engine directory")  # never into a folder of the user's
    export_out = Path(export_dir) if export_dir else out_dir / "export"
    cache = cache or EngineCache()
    target = _target(backend, compute_capability)  # a missing GPU or library fails here, before any work
    versions = _versions(backend)
    source_path = Path(source)

    def needed(config: ModelConfig) -> list[str]:
        return graphs_needed([bucket_shapes(config, b, guidance, _encoders(config, encoders), step_cache)
                              for b in buckets])

    def check(config: ModelConfig) -> None:
        """Impossible buckets, and buckets this machine cannot run, before any work."""
        needed(config)
        if runs_here(backend) and target.get("kind") == "cpu":  # the engines run in this machine's memory
            for b in buckets:
                check_bucket_budget(config, b.height, b.width, b.frames, b.prompts, guidance)

    if (source_path / EXPORT_INDEX).is_file():
        index = load_export(source_path)
        check(ModelConfig.from_dict(index.config))
    else:
        from ..reference.config import from_preset, read_model_config
        from ..reference.weights import preset_name

        early = model.config if model is not None else (
            read_model_config(source_path) if source_path.is_dir() else from_preset(preset_name(source)))
        if early is not None:  # (an upstream release directory's config needs the loader)
            check(early)
        claim_dir(export_out, (EXPORT_INDEX,), "export directory", option="the export folder")
        index = _export_for(str(source), export_out, precision, needed, seed, progress, model, adapters)
        if early is None:
            check(ModelConfig.from_dict(index.config))
    config = ModelConfig.from_dict(index.config)
    shapes = [bucket_shapes(config, b, guidance, _encoders(config, encoders), step_cache) for b in buckets]
    keys = graphs_needed(shapes)
    missing = [k for k in keys if k not in index.specs]
    if missing:
        raise EngineError(f"{index.root} lacks the graphs {missing} the buckets need; export them with "
                          f"`easyanimate-rt export {index.source or 'MODEL'} --out {index.root}`")
    for key in keys:
        index.check(key)  # every graph whole (hash, size, inputs) before anything is built from it
    if model is None and runs_here(backend) and not index.source:
        raise EngineError(f"{index.root} does not record its source model, which the parity gate needs")
    loaded: list = [model]

    def model_fn():
        if loaded[0] is None:
            from ..reference.weights import load_model_or_preset

            loaded[0] = load_model_or_preset(index.source, seed=index.seed)
        return loaded[0]

    flags = dict(flags or {})
    if backend == "rtx":  # TensorRT-RTX plans capture into a CUDA graph only with user-allocated memory
        flags.setdefault("require_user_allocation", True)
    timing_cache = None
    if backend == "trt":
        timing_cache = cache.root / f"timing-{target['name'].replace(' ', '_')}-{versions['tensorrt']}.cache"
    results: list[NetworkBuild] = []
    for key in keys:
        spec = index.specs[key]
        profiles, bucket_index = profiles_for(spec, shapes, ranged)
        spec = widen(spec, profiles)
        onnx_path = index.path(key)
        fields = {"onnx_sha256": sha256_files(onnx_files(onnx_path)), "spec_sha256": digest(spec.to_dict()),
                  "precision": spec.precision.name, "backend": backend, "flags": flags, "threads": threads,
                  "profiles": [p.to_dict() for p in profiles], "versions": versions, "target": target}
        ckey = cache_key(fields)
        if progress:
            progress(f"build {key}")
        entry, built = cache.get_or_build(ckey, lambda staging, spec=spec, onnx_path=onnx_path, key=key: _build_entry(
            staging, spec=spec, onnx_path=onnx_path, graph_dir=index.root / key, backend=backend,
            bucket_index=bucket_index, fields=fields, key=ckey, model_fn=model_fn, threads=threads,
            compute_capability=compute_capability, timing_cache=timing_cache, runner=runner))
        manifest = Manifest.load(entry)
        if manifest.buckets != bucket_index:  # same engine, other bucket names: record this build's
            manifest = dataclasses.replace(manifest, buckets=bucket_index)
        results.append(NetworkBuild(key, entry, manifest, built))
    _install(out_dir, results, index, backend, buckets, guidance, ranged, index_info or {})
    return results


def _install(out_dir: Path, results: Sequence[NetworkBuild], index: ExportIndex, backend: str,
             buckets: Sequence[Bucket], guidance: str, ranged: bool, info: dict[str, Any]) -> None:
    """Copy the cache entries into ``out_dir`` (hard links where the filesystem allows)."""
    mark_dir(out_dir, "engine directory")

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    entries = {}
    for r in results:
        with staged_dir(out_dir / r.key) as tmp:
            tmp.rmdir()
            shutil.copytree(r.entry, tmp, copy_function=link)
            r.manifest.save(tmp)
        entries[r.key] = {"dir": r.key, "cache_key": r.manifest.cache_key, "artifact": r.manifest.artifact["file"],
                          "profiles": len(r.manifest.profiles), "parity": r.manifest.parity,
                          "onnx": str(index.path(r.key))}
    write_index(out_dir, entries, model=index.model, source=index.source, export=str(index.root), backend=backend,
                precision=index.precision, guidance=guidance, ranged=ranged, buckets=[b.name for b in buckets], **info)


def current_environment(backend: str, compute_capability: str | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """(library versions, target) of this machine for ``backend``, to check a manifest against."""
    versions = _versions(backend)
    versions.pop("easyanimate_rt", None)  # a package upgrade alone does not invalidate an engine
    if backend == "rtx":
        return versions, {"compute_capability": compute_capability} if compute_capability else {}
    return versions, _target(backend, None)


def check_network(directory: str | Path, onnx_path: str | Path | None = None,
                  compute_capability: str | None = None) -> Manifest:
    """Everything a load must check before handing an engine to the runtime: the
    manifest reads, the artefact is the one recorded (size and hash), it was built with
    this machine's library version for this CPU/GPU (or the given AOT target), and, when
    the source graph is at hand, from that very graph. Each failure is an EngineError
    that says what differs and how to rebuild."""
    directory = Path(directory)
    manifest = Manifest.load(directory)
    manifest.check_artifact(directory)
    versions, target = current_environment(manifest.backend, compute_capability)
    manifest.check_environment(versions, target)
    if onnx_path is not None and Path(onnx_path).exists():
        manifest.check_source(Path(onnx_path))
    if manifest.backend in ("rtx", "trt") and runs_here("trt"):
        _check_plan_validity(manifest, directory / manifest.artifact["file"])
    return manifest


def _check_plan_validity(manifest: Manifest, plan: Path) -> None:
    """The library's own check (GPU machines): a plan this TensorRT cannot run is named."""
    if manifest.backend == "rtx":
        from . import tensorrt_rtx

        trt = tensorrt_rtx._import()
    else:
        from .tensorrt import import_tensorrt

        trt = import_tensorrt()
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    if hasattr(runtime, "get_engine_validity"):
        validity, diagnostics = runtime.get_engine_validity(plan.read_bytes())
        if validity != trt.EngineValidity.VALID:
            raise EngineError(f"{plan}: {trt.__name__} reports the plan {validity.name} (diagnostics "
                              f"{diagnostics}); rebuild with `easyanimate-rt build`")
