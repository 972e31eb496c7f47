"""LoRA switch time on ONNX Runtime CPU engines: a full first-use build against the
initializer swap (engines/ort_swap.py), on the shipped model.

    python benchmarks/lora.py [--threads N] [--json PATH]

Each phase runs in a fresh process (its peak RSS from ``wait4``), on one engine cache:

1. ``base``: the base model's engines, built on first use (export + ONNX Runtime
   optimisation + parity gate);
2. ``full``: a LoRA set (A) as today's runtime switches to it: its own first-use build;
3. ``swap``: the base engines loaded, then switches base -> B (derived by swap: merge,
   write, gate, load) -> base -> B (loaded) -> B at another weight (derived) -> A-swap
   (derived again, compared with phase 2's scratch engines); plus the alternative
   mechanism, ``SessionOptions.add_initializer`` overrides on the base graph, timed and
   compared with the swapped file.

Writes ``benchmarks/results/lora-switch-cpu.json`` and prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "lora-switch-cpu.json"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def make_lora(path: Path, seed: int, text_encoder: bool) -> Path:
    import torch

    from easyanimate_rt.cli import default_model
    from easyanimate_rt.reference.lora import lora_targets, save_kohya
    from easyanimate_rt.reference.weights import load_model_or_preset

    model = load_model_or_preset(default_model())
    g = torch.Generator().manual_seed(seed)
    layers = {name: (torch.randn(4, m.weight.shape[1], generator=g) * 0.05,
                     torch.randn(m.weight.shape[0], 4, generator=g) * 0.05)
              for name, m in lora_targets(model, text_encoder=text_encoder).items()}
    return save_kohya(path, layers, alpha=4.0, rank=4)


def _pipeline(cache: Path, threads: int, loras=()):
    from easyanimate_rt.cli import default_model
    from easyanimate_rt.runtime.pipeline import Pipeline

    return Pipeline.from_pretrained(default_model(), backend="ort", cache_dir=cache, threads=threads, loras=loras)


def phase_build(cache: Path, threads: int, loras: list[str]) -> dict:
    t0 = time.perf_counter()
    pipe = _pipeline(cache, threads, loras)
    return {"seconds": round(time.perf_counter() - t0, 3), "build_seconds": round(pipe.timings.get("build", 0.0), 3),
            "engine_dir": str(pipe.engine_dir("batched"))}


def _switch(pipe, loras: list[str]) -> dict:
    """set_loras, then what EngineSet._ensure_built would do: derive the LoRA's engine
    directory from the base one by swap when it is missing, then load (ensure)."""
    from easyanimate_rt.engines.ort_swap import base_values, derive_engines
    from easyanimate_rt.reference.lora import merged_state
    from easyanimate_rt.runtime.backends import gate_runner

    t0 = time.perf_counter()
    pipe.set_loras(loras)
    source = pipe.source
    directory = pipe.engine_dir("batched")
    derived, steps = False, {}
    if source.adapters and not (directory / "engines.json").is_file():
        model = pipe.model()
        t = time.perf_counter()
        merged = merged_state(model, source.adapters)
        steps["merge_s"] = round(time.perf_counter() - t, 3)
        base_dir = directory.parent.parent / f"{pipe.config.name}-{source.base_fingerprint[:16]}" / directory.name
        t = time.perf_counter()
        derived = derive_engines(base_dir, directory, merged, base_values(model, merged), model=model,
                                 runner=gate_runner, threads=pipe.engine_set.threads,
                                 index_info={"source_sha256": source.fingerprint})
        steps["derive_s"] = round(time.perf_counter() - t, 3)
    t = time.perf_counter()
    built = pipe.engine_set.build_seconds
    pipe.ensure(_bucket(pipe))
    steps["load_s"] = round(time.perf_counter() - t, 3)
    return {"to": [str(Path(l).name) for l in loras] or "base", "derived": derived,
            "rebuilt": pipe.engine_set.build_seconds > built, "seconds": round(time.perf_counter() - t0, 3),
            "rss_mb": round(rss_mb(), 1), **steps}


def _bucket(pipe):
    from easyanimate_rt.engines.buckets import Bucket

    s = pipe.config.sampling
    return Bucket(s.height, s.width, s.frames)


def phase_swap(cache: Path, threads: int, a: str, b: str, scratch_dir: str) -> dict:
    t0 = time.perf_counter()
    pipe = _pipeline(cache, threads)
    out = {"load_base_s": round(time.perf_counter() - t0, 3), "rss_after_base_mb": round(rss_mb(), 1)}
    b2 = b.rsplit(":", 1)[0] + ":0.5"
    out["switches"] = [_switch(pipe, l) for l in ([b], [], [b], [b2], [a], [])]
    out["max_abs_vs_scratch"] = _compare(Path(pipe.engine_dir("batched")).parent.parent, pipe, a, Path(scratch_dir))
    out["override"] = _override(pipe, b, threads)
    return out


def _compare(models: Path, pipe, a: str, scratch: Path) -> dict:
    """Swapped engines of A against A's scratch-built engines, on the parity feeds."""
    from easyanimate_rt.engines.build import parity_feeds
    from easyanimate_rt.engines.manifest import read_index
    from easyanimate_rt.export.index import load_export
    from easyanimate_rt.runtime.backends.ort import OrtEngine

    swapped = pipe.source.with_loras([a])
    directory = models / f"{pipe.config.name}-{swapped.fingerprint[:16]}" / "ort-cpu-fp32-batched"
    index = read_index(directory)
    export = load_export(index["export"])
    diffs = {}
    for key in index["lora_swap"]["swapped"]:
        spec = export.specs[key]
        engines = [OrtEngine(d / key, spec, read_index(d)["networks"][key]["onnx"], threads=1)
                   for d in (directory, scratch)]
        feeds = parity_feeds(spec.replace(profiles=tuple(engines[0].profiles())), export.root / key)
        diffs[key] = max(float(np.abs(engines[0].run(f)[spec.output_names[0]] -
                                      engines[1].run(f)[spec.output_names[0]]).max()) for f in feeds)
    return diffs


def _override(pipe, lora: str, threads: int) -> dict:
    """The other mechanism: the base graph with SessionOptions.add_initializer overrides
    (the OrtValues live as long as the session), against the swapped file."""
    import onnxruntime as ort

    from easyanimate_rt.engines import onnxruntime as ortb
    from easyanimate_rt.engines.ort_swap import (
        _inits,
        _read_graph,
        _replacement,
        base_values,
        initializer_map,
    )
    from easyanimate_rt.reference.lora import merged_state

    pipe.set_loras([lora])
    model = pipe.model()
    source = pipe.source
    directory = pipe.engine_dir("batched")
    base_dir = directory.parent.parent / f"{pipe.config.name}-{source.base_fingerprint[:16]}" / directory.name
    graph = base_dir / "dit" / ortb.OPTIMIZED_NAME
    merged = {k: v for k, v in merged_state(model, source.adapters).items() if k.startswith("dit.")}
    r0 = rss_mb()
    t = time.perf_counter()
    slots = initializer_map(graph, base_values(model, merged))
    inits = {i.name: i for i in _inits(_read_graph(graph))}
    values = {slots[n][0]: _replacement(slots[n], inits[slots[n][0]], v.detach().numpy()) for n, v in merged.items()}
    opts = ortb.session_options(threads, optimize=False)
    keep = {name: ort.OrtValue.ortvalue_from_numpy(v) for name, v in values.items()}
    for name, v in keep.items():
        opts.add_initializer(name, v)
    session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
    override_s = time.perf_counter() - t
    r1 = rss_mb()
    t = time.perf_counter()
    swapped = ort.InferenceSession(str(directory / "dit" / ortb.OPTIMIZED_NAME), ortb.session_options(threads, optimize=False),
                                   providers=["CPUExecutionProvider"])
    file_s = time.perf_counter() - t
    r2 = rss_mb()
    from easyanimate_rt.engines.manifest import read_index
    from easyanimate_rt.export.index import load_export

    spec = load_export(read_index(directory)["export"]).specs["dit"]
    feed = spec.random_inputs(spec.opt_dims(spec.profiles[0]), seed=1)
    diff = float(np.abs(session.run(None, feed)[0] - swapped.run(None, feed)[0]).max())
    return {"override_map_and_session_s": round(override_s, 3), "override_rss_delta_mb": round(r1 - r0, 1),
            "swapped_file_session_s": round(file_s, 3), "swapped_file_rss_delta_mb": round(r2 - r1, 1),
            "max_abs_override_vs_file": diff, "initializers": len(values)}


def run_phase(args: list[str]) -> tuple[dict, float]:
    """A phase in a fresh process: its JSON and its peak RSS (MB)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = Path(f.name)
    proc = subprocess.Popen([sys.executable, __file__, "--phase", *args, "--result", str(result)])
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"phase {args[0]} failed (exit {proc.returncode})")
    data = json.loads(result.read_text())
    result.unlink()
    return data, usage.ru_maxrss / 1024


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=OUT)
    p.add_argument("--phase", nargs="+")
    p.add_argument("--result", type=Path)
    args = p.parse_args(argv)
    if args.phase:
        name, rest = args.phase[0], args.phase[1:]
        cache = Path(rest[0])
        if name == "build":
            data = phase_build(cache, args.threads, rest[1:])
        else:
            data = phase_swap(cache, args.threads, *rest[1:])
        args.result.write_text(json.dumps(data))
        return 0

    import onnxruntime

    from easyanimate_rt.cli import default_model

    work = Path(tempfile.mkdtemp(prefix="lora-bench-"))
    a = str(make_lora(work / "a.safetensors", 1, text_encoder=True)) + ":1.0"
    b = str(make_lora(work / "b.safetensors", 2, text_encoder=True)) + ":0.8"
    cache, scratch_cache = work / "cache", work / "scratch"
    base, base_rss = run_phase(["build", str(cache)])
    print(f"base first-use build: {base['seconds']:.1f} s (peak RSS {base_rss:.0f} MB)")
    full, full_rss = run_phase(["build", str(scratch_cache), a])
    print(f"LoRA A, full first-use build: {full['seconds']:.1f} s (build {full['build_seconds']:.1f} s, "
          f"peak RSS {full_rss:.0f} MB)")
    swap, swap_rss = run_phase(["swap", str(cache), a, b, full["engine_dir"]])
    for s in swap["switches"]:
        extra = ", ".join(f"{k} {v}" for k, v in s.items() if k.endswith("_s"))
        print(f"switch to {s['to']}: {s['seconds']:.2f} s ({'derived' if s['derived'] else 'loaded'}"
              f"{', REBUILT' if s['rebuilt'] else ''}; {extra}; RSS {s['rss_mb']:.0f} MB)")
    print(f"swap process peak RSS {swap_rss:.0f} MB; swapped vs scratch-built max abs: {swap['max_abs_vs_scratch']}")
    print(f"add_initializer overrides: {swap['override']}")
    derived = [s["seconds"] for s in swap["switches"] if s["derived"]]
    result = {"model": default_model(), "onnxruntime": onnxruntime.__version__, "threads": args.threads,
              "cpu": os.cpu_count(), "base_build": {**base, "peak_rss_mb": round(base_rss, 1)},
              "full_build_lora": {**full, "peak_rss_mb": round(full_rss, 1)},
              "swap": {**swap, "peak_rss_mb": round(swap_rss, 1)},
              "speedup_full_over_swap": round(full["seconds"] / max(derived), 1) if derived else None}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"full build {full['seconds']:.1f} s vs swap switch {max(derived) if derived else float('nan'):.2f} s "
          f"(worst derived); wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
