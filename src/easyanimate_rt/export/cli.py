"""``easyanimate-rt export`` and ``easyanimate-rt verify`` (added to the main CLI).

    easyanimate-rt export MODEL --out DIR --precision fp32|fp16|bf16|fp8 [--networks ...]
    easyanimate-rt verify DIR [--model MODEL] [--inputs FILE.npz] [--backends ort trt ...]

MODEL is a model directory or a preset name (random weights from ``--seed``). Thin:
argument parsing, progress bars and printing; the work is in export.onnx/verify.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from .precision import PRECISIONS
from .spec import NETWORKS

log = logging.getLogger(__name__)


def add_export_parser(subparsers) -> None:
    """Add the ``export`` and ``verify`` subcommands to the top-level CLI's subparsers."""
    p = subparsers.add_parser("export", help="export the networks of a model to ONNX",
                              description="Export text encoder, DiT and VAE slices to ONNX, one "
                                          "DIR/<network>/model.onnx + spec.json per graph.")
    p.add_argument("model", help="model directory or preset name (preset = random weights)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument("--networks", nargs="+", choices=NETWORKS, help="default: all four")
    p.add_argument("--vae-precision", choices=["fp32", "bf16"], default=None,
                   help="VAE precision (default fp32 whatever --precision is)")
    p.add_argument("--seed", type=int, default=0, help="random-weight seed for a preset (default 0)")
    p.add_argument("--calibration-prompt", action="append", dest="calibration_prompts",
                   help="fp8: a calibration prompt (repeatable; default: built-in captions)")
    p.add_argument("--calibration-steps", type=int, help="fp8: sampling steps per calibration prompt")
    p.add_argument("--rtx", nargs="?", const="SM89", metavar="SM",
                   help="also build every graph with TensorRT-RTX ahead of time (default SM89)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser("verify", help="compare an export with the torch reference",
                              description="Run the torch reference and ONNX Runtime (and TensorRT "
                                          "where present) on saved inputs and print error statistics.")
    p.add_argument("export_dir", type=Path, help="directory written by `easyanimate-rt export`")
    p.add_argument("--model", help="reference model directory or preset (default: the export's source)")
    p.add_argument("--seed", type=int, default=None, help="preset random-weight seed (default: the export's)")
    p.add_argument("--networks", nargs="+", choices=NETWORKS)
    p.add_argument("--inputs", type=Path, help=".npz of inputs (default: every .npz beside each graph)")
    p.add_argument("--backends", nargs="+", choices=["ort", "onnx-ref", "trt"],
                   help="default: ort (onnx-ref for bf16 graphs), plus trt with TensorRT and a GPU")
    p.add_argument("--rtx", nargs="?", const="SM89", metavar="SM",
                   help="also build every graph with TensorRT-RTX ahead of time (default SM89)")
    p.add_argument("--polygraphy-report", action="store_true", help="print polygraphy's accuracy report too")
    p.set_defaults(func=cmd_verify)


def _load_model(source: str, seed: int):
    from .verify import load_reference

    if not Path(source).is_dir():
        print(f"model: preset {source!r} with random weights (seed {seed})")
    return load_reference(source, seed)


def _rtx_check(root: Path, keys, sm: str) -> bool:
    from ..engines import rtx
    from .spec import ExportSpec

    if not rtx.is_available():
        print("tensorrt-rtx: not installed (pip install \"easyanimate-rt[rtx]\"); build check skipped")
        return True
    ok = True
    for key in keys:
        try:
            r = rtx.build_aot(root / key / "model.onnx", ExportSpec.load(root / key), sm)
            print(f"  tensorrt-rtx {rtx.version()} {sm}: {key:22s} built in {r.seconds:5.1f}s, "
                  f"{r.layers} layers, plan {r.plan_bytes / 1e6:.1f} MB")
        except Exception as exc:  # report every graph, then fail
            ok = False
            print(f"  tensorrt-rtx {sm}: {key:22s} FAILED: {exc}")
    return ok


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .onnx import export_model
    from .passes import format_counts
    from .spec import make_specs

    t0 = time.perf_counter()
    model = _load_model(args.model, args.seed)
    source = str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model
    total = len(make_specs(model.config, args.precision, args.networks))
    calibration = {}
    if args.calibration_prompts:
        calibration["prompts"] = args.calibration_prompts
    if args.calibration_steps:
        calibration["steps"] = args.calibration_steps
    bar = tqdm(total=total, desc="export", unit="graph", disable=args.quiet)

    def progress(what: str) -> None:
        bar.set_postfix_str(what)
        if not what.startswith("calibrating"):
            bar.update(1)

    index = export_model(model, args.out, args.precision, args.networks, source=source, seed=args.seed,
                         vae_precision=args.vae_precision, calibration=calibration, progress=progress)
    bar.close()
    keys = [k for k in sorted(index.specs) if args.networks is None or index.specs[k].network in args.networks]
    for key in keys:
        g = index.specs[key].graph
        ext = f" + {g['external_data']}" if g.get("external_data") else ""
        print(f"{key}: {g['nodes']} nodes, {g['bytes'] / 1e6:.1f} MB{ext} "
              f"({index.specs[key].precision.compute_dtype}{', fp8 Q/DQ' if index.specs[key].precision.fp8 else ''})")
        print("  " + format_counts(g["nodes_by_op"]).replace("\n", "\n  "))
    ok = True
    if args.rtx:
        ok = _rtx_check(index.root, keys, args.rtx)
    print(f"wrote {args.out} ({len(keys)} graphs, {args.precision}) in {time.perf_counter() - t0:.1f}s")
    return 0 if ok else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from .onnx import load_export
    from .verify import format_report, verify_export

    index = load_export(args.export_dir)
    model = None
    if args.model or args.seed is not None:
        model = _load_model(args.model or index.source, args.seed if args.seed is not None else index.seed)
    reports = verify_export(args.export_dir, model, networks=args.networks, inputs=args.inputs,
                            backends=args.backends, verbose=args.polygraphy_report)
    print(format_report(reports))
    ok = all(r.ok for r in reports)
    if args.rtx:
        ok &= _rtx_check(index.root, [r.key for r in reports], args.rtx)
    bad = [r.key for r in reports if not r.ok]
    print("all graphs within tolerance" if not bad else f"outside tolerance: {', '.join(bad)}")
    return 0 if ok else 1
