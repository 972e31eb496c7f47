"""Engine-layer commands: ``easyanimate-rt build`` (export-and-build for a set of video
sizes), ``easyanimate-rt engines ls|verify|clean``, and the TensorRT-RTX ahead-of-time
build check behind ``export --rtx`` and ``verify --rtx``."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from ..errors import EngineError, InputError

from ..export.spec import MODEL_NAME, ExportSpec
from . import tensorrt_rtx


def rtx_check(root: Path, keys: Iterable[str], compute_capability: str) -> bool:
    """Build every graph ``keys`` of the export at ``root`` with TensorRT-RTX for
    ``compute_capability``; print one line a graph; True when all built (or when
    TensorRT-RTX is not installed, which is said)."""
    if not tensorrt_rtx.is_available():
        print("tensorrt-rtx: not installed (pip install \"easyanimate-rt[rtx]\"); build check skipped")
        return True
    ok = True
    for key in keys:
        try:
            r = tensorrt_rtx.build_aot(root / key / MODEL_NAME, ExportSpec.load(root / key), compute_capability)
            print(f"  tensorrt-rtx {tensorrt_rtx.version()} {compute_capability}: {key:22s} built in "
                  f"{r.seconds:5.1f}s, {r.layers} layers, plan {r.plan_bytes / 1e6:.1f} MB")
        except Exception as exc:  # report every graph, then fail
            ok = False
            print(f"  tensorrt-rtx {compute_capability}: {key:22s} FAILED: {exc}")
    return ok


# --- build -------------------------------------------------------------------------------------


def add_build_parser(subparsers) -> None:
    """``easyanimate-rt build`` and ``easyanimate-rt engines ls|verify|clean``."""
    import argparse as _argparse

    from ..export.precision import PRECISIONS
    from .manifest import BACKENDS

    p = subparsers.add_parser(
        "build", help="build engines (TensorRT, TensorRT-RTX, ONNX Runtime) for a set of video sizes",
        description="Build the engines the given buckets need from an export directory, or from a model "
                    "directory or preset (exported first: exactly the graphs the buckets need).",
        formatter_class=_argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="export directory, model directory or preset name")
    p.add_argument("--out", required=True, type=Path, help="engine directory to write")
    p.add_argument("--backend", required=True, choices=BACKENDS)
    p.add_argument("--buckets", required=True, help="HxWxF[bN],... the videos you will generate (e.g. "
                                                    "384x672x144; 64x64x17b4: batches of up to 4 prompts)")
    p.add_argument("--guidance", choices=["batched", "sequential"], default="batched",
                   help="batched: DiT batch 2 (default); sequential: two batch-1 calls")
    p.add_argument("--ranged", action="store_true", help="one min/opt/max profile over all buckets")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="when exporting from a model")
    p.add_argument("--compute-capability", metavar="SM", help="rtx: ahead-of-time target (default SM89)")
    p.add_argument("--cache-dir", type=Path, help="engine cache (default: ~/.cache/easyanimate-rt/engines)")
    p.add_argument("--threads", type=int, help="ort-cpu: intra-op threads (default: all cores)")
    p.add_argument("--opt-level", type=int, choices=range(6), help="trt/rtx: builder optimisation level")
    p.add_argument("--workspace", type=int, metavar="MIB", help="trt/rtx: workspace limit in MiB")
    p.add_argument("--weight-streaming", action="store_true", help="trt: build with weight streaming")
    p.add_argument("--refit", action="store_true", help="trt/rtx: build refittable engines")
    p.add_argument("--seed", type=int, default=0, help="random-weight seed for a preset (default 0)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=cmd_build)

    e = subparsers.add_parser("engines", help="list, verify or clean engine directories and the cache")
    esub = e.add_subparsers(dest="engines_command", required=True)
    for name, func, what in (("ls", cmd_engines_ls, "list the networks and profiles"),
                             ("verify", cmd_engines_verify, "check every artefact against its manifest"),
                             ("clean", cmd_engines_clean, "remove the cache's entries")):
        q = esub.add_parser(name, help=what)
        if name != "clean":
            q.add_argument("engine_dir", nargs="?", type=Path, help="engine directory (default: the cache)")
        else:
            q.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
            q.add_argument("-y", "--yes", action="store_true", help="remove without asking (needed where "
                                                                   "there is no terminal to ask on)")
        q.add_argument("--cache-dir", type=Path, help="engine cache (default: ~/.cache/easyanimate-rt/engines)")
        q.set_defaults(func=func)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def cmd_build(args) -> int:
    from .buckets import parse_buckets
    from .build import build_engines
    from .cache import EngineCache

    buckets = parse_buckets(args.buckets)
    flags = {}
    if args.backend in ("trt", "rtx"):
        flags = {k: v for k, v in (("optimization_level", args.opt_level),
                                   ("workspace_bytes", args.workspace and args.workspace << 20),
                                   ("weight_streaming", args.weight_streaming or None),
                                   ("refit", args.refit or None)) if v is not None}
    elif args.opt_level is not None or args.workspace or args.weight_streaming or args.refit:
        raise InputError(f"--opt-level, --workspace, --weight-streaming and --refit are TensorRT build flags, "
                         f"not for --backend {args.backend}")
    t0 = time.perf_counter()
    results = build_engines(args.source, args.out, args.backend, buckets, guidance=args.guidance, ranged=args.ranged,
                            precision=args.precision, compute_capability=args.compute_capability,
                            cache=EngineCache(args.cache_dir), threads=args.threads, seed=args.seed, flags=flags,
                            progress=None if args.quiet else (lambda line: print(line, flush=True)),
                            runner=getattr(args, "gate_runner", None))
    print(f"{'network':22s} {'profiles':>8s} {'artefact':>10s} {'build':>8s}  parity")
    for r in results:
        m = r.manifest
        parity = (f"max_abs {m.parity['max_abs']:.2g} cos {m.parity['cosine']:.6f} ({m.parity['tolerance']})"
                  if m.parity.get("ok") else m.parity.get("skipped", "-"))
        when = f"{m.build_seconds:7.1f}s" if r.built else "  cached"
        print(f"{r.key:22s} {len(m.profiles):8d} {_mb(m.artifact['bytes']):>10s} {when}  {parity}")
    print(f"wrote {args.out} ({len(results)} networks, {args.backend}, buckets {','.join(b.name for b in buckets)}) "
          f"in {time.perf_counter() - t0:.1f}s")
    return 0


def _dirs(args):
    from .cache import EngineCache
    from .manifest import INDEX_NAME, read_index

    if getattr(args, "engine_dir", None) is not None:
        root = args.engine_dir
        index = read_index(root) if (root / INDEX_NAME).exists() else None
        keys = sorted(index["networks"]) if index else []
        if index is None:
            raise InputError(f"{root} is not an engine directory (no {INDEX_NAME})")
        return [(k, root / k) for k in keys]
    return [(path.name, path) for path, _ in EngineCache(args.cache_dir).entries()]


def cmd_engines_ls(args) -> int:
    from .manifest import Manifest

    rows = _dirs(args)
    for name, path in rows:
        try:
            m = Manifest.load(path)
        except EngineError as exc:
            print(f"{name:22s} unreadable: {exc}")
            continue
        print(f"{name:22s} {m.key:20s} {m.backend:8s} {m.precision:5s} {len(m.profiles)} profiles "
              f"{_mb(m.artifact['bytes']):>9s} buckets {','.join(sorted(m.buckets))}")
    if not rows:
        print("no engines")
    return 0


def cmd_engines_verify(args) -> int:
    """0: every artefact is the one its manifest recorded; 1: some are not (listed);
    2 (an EngineError naming the file): a manifest itself cannot be read."""
    from .manifest import Manifest

    bad, unreadable = 0, []
    for name, path in _dirs(args):
        try:
            manifest = Manifest.load(path)
        except EngineError as exc:
            unreadable.append(str(exc))
            print(f"{name:22s} UNREADABLE: {exc}")
            continue
        try:
            manifest.check_artifact(path)
            print(f"{name:22s} ok")
        except EngineError as exc:
            bad += 1
            print(f"{name:22s} BAD: {exc}")
    if unreadable:
        raise EngineError(f"{len(unreadable)} manifest(s) cannot be read: {unreadable[0]}")
    return 1 if bad else 0


def cmd_engines_clean(args) -> int:
    """Remove the cache's own items after showing them: asked on a terminal, else only
    with --yes; a folder that is not a marked engine cache is refused (cache.py)."""
    import sys

    from .cache import EngineCache

    cache = EngineCache(args.cache_dir)
    plan = cache.plan_clean()
    if not plan.remove:
        print(f"nothing to remove in {cache.root}")
        return 0
    verb = "would remove" if args.dry_run else "will remove"
    print(f"{verb} {len(plan.remove)} cache items ({_mb(plan.bytes)}) from {cache.root}:")
    for path in plan.remove:
        print(f"  {path.name}")
    if plan.foreign:
        print(f"leaving {len(plan.foreign)} items that are not the cache's: "
              f"{', '.join(p.name for p in plan.foreign[:5])}{' ...' if len(plan.foreign) > 5 else ''}")
    if args.dry_run:
        return 0
    if not args.yes:
        if not sys.stdin.isatty():
            raise InputError("engines clean asks before removing anything and there is no terminal to ask on: "
                             "pass --yes to remove the items listed above (or --dry-run to only list them)")
        if input("remove them? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing removed")
            return 0
    cache.clean(plan)
    print(f"removed {len(plan.remove)} cache items ({_mb(plan.bytes)}) from {cache.root}")
    return 0
