"""A LoRA switch for ONNX Runtime CPU engines without a re-export or a new graph
optimisation (issue 27): the base model's optimised graphs (``model.ort.onnx``) with the
merged weights written in place of the base ones.

1. map every weight the adapters change to the initializer that holds it in an
   optimised graph, by content (:func:`initializer_map`): exporting stores Linear
   weights transposed under generated names, and ONNX Runtime's optimiser may rename,
   fold or pack them, so names cannot be trusted, bytes can;
2. write a copy of each touched graph with those initializers replaced (same name, shape
   and dtype; a graph with external data keeps its protobuf and gets a patched copy of
   the data file); graphs the adapters do not touch (the VAE) are hard-linked;
3. gate every swapped graph against the reference model with the adapters merged
   (engines.build.parity_gate), write its manifest and the directory's ``engines.json``.

A weight that cannot be found unchanged in the graphs of its network (folded into
another constant, packed with others, or not unique) means the engines cannot be
swapped: :func:`derive_engines` logs why and returns False, and the caller builds the
LoRA's engines from scratch. A session on a swapped graph is created with optimisation
off, as for every ``ort-cpu`` engine (engines/onnxruntime.py ``load``).

Why a patched copy and not ``SessionOptions.add_initializer`` overrides at session
creation: both load the already optimised graph and skip the passes, and they cost the
same to within the file write (benchmarks/lora.py measures both); a patched copy is an
ordinary engine directory, so the runtime's loader, its manifest checks and a restart
need nothing new, where overrides would have to keep the merged arrays alive beside
every session and teach every loader about them.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EasyAnimateError, EngineError
from ..export.index import load_export
from ..export.spec import GraphKey, Profile
from ..fileio import atomic_path, mark_dir, sha256_files, staged_dir
from .manifest import Manifest, read_index, write_index
from .onnxruntime import OPTIMIZED_NAME

log = logging.getLogger(__name__)

#: Where an initializer sits in an optimised graph: its name and whether it holds the
#: parameter's 2-D view transposed (exported Linear weights are (in, out)).
Slot = tuple[str, bool]


# --- 1. weights -> initializers, by content ----------------------------------------------------


@dataclass(frozen=True)
class _Init:
    name: str
    dtype: np.dtype
    dims: tuple[int, ...]
    external: dict[str, str] | None     # location, offset, length where the bytes live outside the protobuf


def _read_graph(path: Path):
    import onnx

    return onnx.load(str(path), load_external_data=False)


def _inits(proto) -> list[_Init]:
    from onnx import TensorProto, helper

    out = []
    for t in proto.graph.initializer:
        if t.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
            continue
        ext = {e.key: e.value for e in t.external_data} if t.data_location == TensorProto.EXTERNAL else None
        out.append(_Init(t.name, np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)), tuple(t.dims), ext))
    return out


class _Bytes:
    """An initializer's bytes: the protobuf's own, or a range of its external data file
    (memory-mapped once per file)."""

    def __init__(self, proto, folder: Path):
        self.tensors = {t.name: t for t in proto.graph.initializer}
        self.folder = folder
        self.maps: dict[str, mmap.mmap] = {}

    def __call__(self, init: _Init) -> bytes | memoryview:
        if init.external is None:
            t = self.tensors[init.name]
            if t.raw_data:
                return t.raw_data
            from onnx import numpy_helper

            return numpy_helper.to_array(t).tobytes()
        location = init.external["location"]
        if location not in self.maps:
            with open(self.folder / location, "rb") as f:
                self.maps[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        offset = int(init.external.get("offset", 0))
        length = int(init.external.get("length", np.prod(init.dims, dtype=np.int64) * init.dtype.itemsize))
        return memoryview(self.maps[location])[offset:offset + length]

    def close(self) -> None:
        for m in self.maps.values():
            m.close()


def _digest(data: bytes | memoryview | np.ndarray) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def _as_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        t = t.numpy()
    return np.asarray(t)


def _views(w: np.ndarray) -> list[tuple[np.ndarray, bool]]:
    """The layouts an exported graph may hold a weight in: as is, or its 2-D view
    (out, in) transposed."""
    flat = w.reshape(w.shape[0], -1)
    return [(np.ascontiguousarray(w), False), (np.ascontiguousarray(flat.T), True)]


def _map(proto, folder: Path, base_params: Mapping[str, Any]) -> tuple[dict[str, Slot], dict[str, str]]:
    """(slots found, {param: why not found}) of ``base_params`` in one graph."""
    inits = _inits(proto)
    read = _Bytes(proto, folder)
    try:
        params = {name: _as_numpy(w) for name, w in base_params.items()}
        # Only initializers with a parameter's byte size can hold one: hash those alone, once.
        sizes = {(w.size, np.dtype(d).itemsize) for w in params.values() for d in {w.dtype} | {i.dtype for i in inits}}
        by_hash: dict[tuple[str, str], list[str]] = {}
        for init in inits:
            if init.dtype.kind != "f" or (int(np.prod(init.dims, dtype=np.int64)), init.dtype.itemsize) not in sizes:
                continue
            by_hash.setdefault((init.dtype.str, _digest(read(init))), []).append(init.name)
        graph_dtypes = {i.dtype for i in inits if i.dtype.kind == "f"}
        found: dict[str, Slot] = {}
        missing: dict[str, str] = {}
        for name, w in params.items():
            hits = []
            for dtype in {w.dtype} | graph_dtypes:
                cast = w.astype(dtype)  # an fp16 export holds the rounded weight
                for view, transposed in _views(cast):
                    hits += [(init, transposed) for init in by_hash.get((np.dtype(dtype).str, _digest(view)), [])]
            if len(hits) == 1:
                found[name] = hits[0]
            elif not hits:
                missing[name] = "no initializer holds its base value (folded or packed by the optimiser?)"
            else:
                missing[name] = f"its base value is not unique in the graph ({', '.join(sorted(map(str, hits)))})"
        # Two parameters with equal bytes would share one initializer: a swap would change both.
        owners: dict[str, list[str]] = {}
        for name, (init, _) in found.items():
            owners.setdefault(init, []).append(name)
        for init, names in owners.items():
            if len(names) > 1:
                for name in names:
                    del found[name]
                    missing[name] = f"initializer {init} holds the base value of {len(names)} parameters"
        return found, missing
    finally:
        read.close()


def initializer_map(onnx_model_path: str | Path, base_params: Mapping[str, Any]) -> dict[str, Slot]:
    """``{param name: (initializer name, transposed)}`` for each of ``base_params``
    (``{name: base weight}``, numpy arrays or torch tensors) found unchanged in the ONNX
    graph at ``onnx_model_path``: an initializer with exactly its bytes, as is or as its
    2-D (out, in) view transposed, in its dtype or cast to a float dtype the graph holds
    (an fp16 export). External data is read where the graph says. Parameters found nowhere,
    or not uniquely, are left out (:func:`derive_engines` says why)."""
    path = Path(onnx_model_path)
    return _map(_read_graph(path), path.parent, base_params)[0]


# --- 2. a graph with the merged weights ----------------------------------------------------------


def _replacement(slot: Slot, init: _Init, merged: np.ndarray) -> np.ndarray:
    _, transposed = slot
    w = merged.reshape(merged.shape[0], -1).T if transposed else merged
    out = np.ascontiguousarray(w, dtype=init.dtype).reshape(init.dims)
    return out


def swap_graph(src: Path, dst: Path, values: Mapping[str, np.ndarray]) -> list[Path]:
    """Write ``src`` (an optimised graph, with its external data file) to ``dst`` with the
    initializers named in ``values`` replaced by arrays of their own shape and dtype; the
    files written (atomically each)."""
    from onnx import TensorProto

    proto = _read_graph(src)
    inits = {i.name: i for i in _inits(proto)}
    for name, value in values.items():
        init = inits[name]
        if value.dtype != init.dtype or tuple(value.shape) != init.dims:
            raise EngineError(f"{src}: initializer {name} is {init.dtype}{list(init.dims)}, the swap gives "
                              f"{value.dtype}{list(value.shape)}")
    external = {n: v for n, v in values.items() if inits[n].external is not None}
    for t in proto.graph.initializer:
        if t.name in values and t.name not in external:
            t.ClearField("float_data")
            t.ClearField("double_data")
            t.ClearField("int32_data")
            t.raw_data = np.ascontiguousarray(values[t.name]).tobytes()
            t.data_location = TensorProto.DEFAULT
    written = []
    with atomic_path(dst) as tmp:
        if len(external) == len(values):   # the protobuf is unchanged: copy its bytes
            shutil.copyfile(src, tmp)
        else:
            tmp.write_bytes(proto.SerializeToString())
    written.append(dst)
    for location in sorted({inits[n].external["location"] for n in external}):
        if Path(location).name != location:
            raise EngineError(f"{src}: external data {location!r} must be a file beside the graph")
        target = dst.parent / location
        with atomic_path(target) as tmp:
            shutil.copyfile(src.parent / location, tmp)   # offsets and lengths stay: patch the ranges
            with open(tmp, "r+b") as f:
                for name, value in external.items():
                    ext = inits[name].external
                    if ext["location"] == location:
                        f.seek(int(ext.get("offset", 0)))
                        f.write(np.ascontiguousarray(value).tobytes())
        written.append(target)
    return written


# --- 3. a LoRA engine directory from the base one ------------------------------------------------

#: The parity gate's engine, as engines.build.EngineRunner: (entry, spec, graph, backend, threads) -> run.
Runner = Callable[..., Callable[[dict[str, np.ndarray]], np.ndarray]]


@dataclass
class _Plan:
    key: str
    entry: Path                          # the base engine's folder
    manifest: Manifest
    slots: dict[str, Slot]               # param -> initializer, for the params this graph holds
    inits: dict[str, _Init]              # the graph's initializers by name


def derive_engines(base_dir: str | Path, new_dir: str | Path, merged: Mapping[str, Any], base: Mapping[str, Any],
                   *, model=None, runner: Runner | None = None, threads: int | None = None,
                   index_info: Mapping[str, Any] | None = None) -> bool:
    """Make ``new_dir`` an ``ort-cpu`` engine directory for the model whose changed weights
    are ``merged`` (``{"dit.<param>" | "text_encoder.<param>": weight}``, e.g.
    reference.lora.merged_state) from ``base_dir``, the same model's engines without them
    (``base``: those parameters' base values, e.g. ``LoraMerger.of(model).base(name)``).

    Each graph holding changed weights is written again with them swapped in; the others
    are hard-linked. Given ``model`` (the reference with the adapters merged), every
    swapped graph passes the parity gate against it (``runner``: the gate's engine, as
    engines.build.EngineRunner; the library's session when None), else its manifest says
    it was not gated and the runtime gates it at first load. ``index_info`` goes into
    ``engines.json`` (the runtime's ``source_sha256``). Returns False, with a log line
    saying why and nothing written, when the base directory is not a usable ``ort-cpu``
    directory, a changed weight cannot be found unchanged in its network's graphs, or a
    swapped graph misses the gate: the caller then builds from scratch."""
    t0 = time.perf_counter()
    base_dir, new_dir = Path(base_dir), Path(new_dir)
    why = _why_not(base_dir, merged, base)
    if why:
        log.info("LoRA initializer swap not possible (%s); building the engines from scratch", why)
        return False
    try:
        index = read_index(base_dir)
        plans, why = _plan(base_dir, index, base)
        if why:
            log.info("LoRA initializer swap not possible (%s); building the engines from scratch", why)
            return False
        export = load_export(index["export"])
        with staged_dir(new_dir) as tmp:
            mark_dir(tmp, "engine directory")
            entries = {}
            for key, info in index["networks"].items():
                plan = plans.get(key)
                out = tmp / info["dir"]
                if plan is None or not plan.slots:
                    shutil.copytree(base_dir / info["dir"], out, copy_function=_link)
                    entries[key] = dict(info)
                    continue
                entries[key] = {**_swap_one(plan, out, merged, export, model, runner, threads), "dir": info["dir"]}
            if (base_dir / "tokenizer").is_dir():   # a preset's tokenizer, saved beside its engines
                shutil.copytree(base_dir / "tokenizer", tmp / "tokenizer", copy_function=_link)
            fields = {k: v for k, v in index.items() if k not in ("format", "networks")}
            fields.update(index_info or {})
            fields["lora_swap"] = {"base": str(base_dir), "seconds": round(time.perf_counter() - t0, 3),
                                   "swapped": sorted(k for k, p in plans.items() if p.slots)}
            write_index(tmp, entries, **fields)
    except _GateMissed as exc:
        log.info("LoRA initializer swap not possible (%s); building the engines from scratch", exc)
        return False
    except (EasyAnimateError, OSError) as exc:  # a damaged base directory, a full disk: a rebuild still works
        log.warning("LoRA initializer swap failed (%s); building the engines from scratch", exc)
        return False
    log.info("LoRA engines derived from %s by initializer swap in %.2f s", base_dir, time.perf_counter() - t0)
    return True


class _GateMissed(Exception):
    pass


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _why_not(base_dir: Path, merged: Mapping[str, Any], base: Mapping[str, Any]) -> str:
    if not merged:
        return "the adapters change no weight"
    if set(merged) != set(base):
        return f"merged and base weights name different parameters ({len(merged)} vs {len(base)})"
    try:
        index = read_index(base_dir)
    except EasyAnimateError as exc:
        return f"no base engines to start from: {exc}"
    if index.get("backend") != "ort-cpu":
        return f"{base_dir} holds {index.get('backend')} engines; the swap is for ort-cpu"
    networks = {name.split(".", 1)[0] for name in merged}
    unknown = networks - {"dit", "text_encoder"}
    if unknown:
        return f"weights of {sorted(unknown)}, which no graph of the swap holds"
    return ""


def _plan(base_dir: Path, index: Mapping[str, Any], base: Mapping[str, Any]) -> tuple[dict[str, _Plan], str]:
    """Which initializer of which graph holds each changed weight. Every weight must be
    found in at least one graph of its network (the step-caching split holds each block
    in one of its two graphs); a weight found in none makes the swap impossible."""
    plans: dict[str, _Plan] = {}
    unplaced = {name: "" for name in base}
    for key, info in index["networks"].items():
        network = GraphKey.parse(key).choice
        params = {name: w for name, w in base.items() if name.split(".", 1)[0] == network}
        entry = base_dir / info["dir"]
        try:
            manifest = Manifest.load(entry)
            manifest.check_artifact(entry)
        except EngineError as exc:
            return {}, f"base engine {key}: {exc}"
        if not params:
            plans[key] = _Plan(key, entry, manifest, {}, {})
            continue
        if manifest.artifact["file"] != OPTIMIZED_NAME:
            return {}, f"base engine {key} holds {manifest.artifact['file']}, not an optimised {OPTIMIZED_NAME}"
        proto = _read_graph(entry / OPTIMIZED_NAME)
        found, missing = _map(proto, entry, params)
        plans[key] = _Plan(key, entry, manifest, found, {i.name: i for i in _inits(proto)})
        del proto
        for name in found:
            unplaced.pop(name, None)
        for name, reason in missing.items():
            if name in unplaced:
                unplaced[name] = f"{key}: {reason}"
    if unplaced:
        name, reason = min(unplaced.items())
        more = f" and {len(unplaced) - 1} more" if len(unplaced) > 1 else ""
        return {}, f"{name}{more} not found unchanged in the base engines ({reason or 'no graph of its network'})"
    return plans, ""


def _swap_one(plan: _Plan, out: Path, merged: Mapping[str, Any], export, model, runner: Runner | None,
              threads: int | None) -> dict[str, Any]:
    """The swapped copy of one base engine in ``out``, gated; its ``engines.json`` entry."""
    t0 = time.perf_counter()
    out.mkdir(parents=True)
    values = {slot[0]: _replacement(slot, plan.inits[slot[0]], _as_numpy(merged[name]))
              for name, slot in plan.slots.items()}
    swap_graph(plan.entry / OPTIMIZED_NAME, out / OPTIMIZED_NAME, values)
    path = out / OPTIMIZED_NAME
    base = plan.manifest
    flags = {**base.flags, "lora_swap": {"base_cache_key": base.cache_key, "initializers": len(values),
                                         "transposed": sum(t for _, t in plan.slots.values())}}
    manifest = replace(base, flags=flags, cache_key="",
                       artifact={"file": OPTIMIZED_NAME, "bytes": path.stat().st_size, "sha256": sha256_files([path])},
                       build_seconds=0.0, parity={"skipped": "swapped LoRA weights; gated at first load"})
    manifest.save(out)
    if model is not None:
        from .build import _library_runner, parity_feeds, parity_gate

        spec = export.specs[plan.key]
        spec = spec.replace(profiles=tuple(Profile(p["name"], {k: tuple(v) for k, v in p["dims"].items()})
                                           for p in base.profiles))
        try:
            run = (runner or _library_runner)(out, spec, export.path(plan.key), "ort-cpu", threads)
            manifest.parity = {**parity_gate(run, spec, model, parity_feeds(spec, export.root / plan.key)),
                               "lora_swap": True}
        except EngineError as exc:
            raise _GateMissed(f"{plan.key} with swapped weights: {exc}") from None
    manifest.build_seconds = round(time.perf_counter() - t0, 3)
    manifest.save(out)
    return {"cache_key": "", "artifact": OPTIMIZED_NAME,
            "profiles": len(base.profiles), "parity": manifest.parity, "onnx": str(export.path(plan.key))}


def base_values(model, names: Sequence[str]) -> dict[str, Any]:
    """The base values of ``names`` (qualified parameter names) of a reference model,
    from its LoRA merger's kept copies where it has merged adapters."""
    from ..reference.lora import LoraMerger

    merger = LoraMerger.of(model)
    return {name: merger.base(name) for name in names}


def derive_lora_engines(model, adapters: Sequence[Any], base_dir: str | Path, new_dir: str | Path, *,
                        runner: Runner | None = None, threads: int | None = None,
                        index_info: Mapping[str, Any] | None = None) -> bool:
    """:func:`derive_engines` for a reference ``model`` with ``adapters`` merged (its
    LoRA merger keeps the base copies): the merged and base values of every weight the
    adapters change, then the swap, gated against ``model``."""
    from ..reference.lora import merged_state

    merged = merged_state(model, adapters)
    return derive_engines(base_dir, new_dir, merged, base_values(model, merged), model=model, runner=runner,
                          threads=threads, index_info=index_info)
