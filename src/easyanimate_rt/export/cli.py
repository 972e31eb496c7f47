"""``easyanimate-rt export`` (added to the main CLI).

    easyanimate-rt export MODEL --out DIR --precision fp32|fp16|bf16|fp8 [--networks ...]

MODEL is a model directory or a preset name (random weights from ``--seed``). Thin:
argument parsing, progress bars and printing; the work is in export.onnx. Engines are
built by ``easyanimate-rt build`` (engines layer), which also takes a model and exports.
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
    """Add the ``export`` subcommand to the top-level CLI's subparsers."""
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
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_export)


def load_model_for_export(source: str, seed: int):
    """The model an export (or a verify) is made from; says so when it is a preset."""
    from ..reference.weights import load_model_or_preset

    if not Path(source).is_dir():
        print(f"model: preset {source!r} with random weights (seed {seed})")
    return load_model_or_preset(source, seed)


def cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .onnx import export_model
    from .passes import format_counts
    from .spec import make_specs

    from ..fileio import claim_dir
    from .index import INDEX_NAME

    t0 = time.perf_counter()
    claim_dir(args.out, (INDEX_NAME,), "export directory")  # before the model loads
    model = load_model_for_export(args.model, args.seed)
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
    print(f"wrote {args.out} ({len(keys)} graphs, {args.precision}) in {time.perf_counter() - t0:.1f}s")
    return 0
