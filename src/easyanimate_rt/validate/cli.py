"""``easyanimate-rt verify`` (added to the main CLI): compare an export with the torch
reference (validation ladder, DESIGN.md 4).

    easyanimate-rt verify DIR [--model MODEL] [--inputs FILE.npz] [--backends ort trt ...]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..engines.cli import rtx_check
from ..export.cli import load_model_for_export
from ..export.spec import NETWORKS


def add_verify_parser(subparsers) -> None:
    """Add the ``verify`` subcommand to the top-level CLI's subparsers."""
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


def cmd_verify(args: argparse.Namespace) -> int:
    from ..export.index import load_export
    from .compare import format_report, verify_export

    index = load_export(args.export_dir)
    for key, spec in index.specs.items():  # a damaged graph is named before any work
        if not args.networks or spec.network in args.networks:
            index.check(key)
    model = None
    if args.model or args.seed is not None:
        model = load_model_for_export(args.model or index.source,
                                      args.seed if args.seed is not None else index.seed)
    reports = verify_export(args.export_dir, model, networks=args.networks, inputs=args.inputs,
                            backends=args.backends, verbose=args.polygraphy_report)
    print(format_report(reports))
    ok = all(r.ok for r in reports)
    if args.rtx:
        ok &= rtx_check(index.root, [r.key for r in reports], args.rtx)
    bad = [r.key for r in reports if not r.ok]
    print("all graphs within tolerance" if not bad else f"outside tolerance: {', '.join(bad)}")
    return 0 if ok else 1
