"""``easyanimate-rt data split|score|filter|caption``: the data pipeline's commands.

The files of one dataset folder DIR, each a manifest the trainer can read:
  split   IN_DIR --out DIR   -> DIR/clips/*.mp4 and DIR/clips.jsonl
  score   DIR                -> DIR/scores.jsonl   (from clips.jsonl)
  filter  DIR                -> DIR/filtered.jsonl (from scores.jsonl) + DIR/filter_summary.json
  caption DIR --model PATH   -> DIR/manifest.jsonl (from filtered.jsonl)
Each stage keeps a ledger beside its output (``<name>.log.jsonl``): resumable stages
skip what it lists as done, and every stage writes only over an output whose ledger
says it wrote it. ``split --out`` must be a new or empty folder, or a dataset folder
split made (``dataset.json``). Anything else is refused before any work (exit 2).

The main CLI adds these with ``add_data_parser(subparsers)``; ``main_data(argv)`` runs
them standalone (``python -m easyanimate_rt.data.cli split ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from easyanimate_rt.errors import EasyAnimateError, InputError

CLIPS, SCORES, FILTERED, CAPTIONED = "clips.jsonl", "scores.jsonl", "filtered.jsonl", "manifest.jsonl"


def _stage_io(args: argparse.Namespace, default_in: str, default_out: str) -> tuple[Path, Path]:
    root = Path(args.dir)
    src = Path(args.input) if args.input else root / default_in
    dst = Path(args.output) if args.output else root / default_out
    if not src.is_file():
        raise InputError(f"no manifest {src}; run the previous stage first or pass --input")
    return src, dst


def _print_report(report, output: Path) -> int:
    print(f"{report.stage}: {report.total} inputs, {report.done} done now, {report.skipped} already done, "
          f"{len(report.failed)} failed; {report.written} records written to {output}")
    for key, message in report.failed:
        print(f"  skipped {key}: {message}", file=sys.stderr)
    return 0 if report.ok else 1


def _optional(parse):
    """An argparse type that also accepts 'none' (rule switched off)."""
    def convert(text: str):
        return None if text.strip().lower() == "none" else parse(text)
    convert.__name__ = getattr(parse, "__name__", "value")
    return convert


def cmd_split(args: argparse.Namespace) -> int:
    from easyanimate_rt.data.split import SplitConfig, parse_cascade, split_videos

    config = SplitConfig(cascade=parse_cascade(args.cascade), min_seconds=args.min_seconds,
                         max_seconds=args.max_seconds, min_scene_len=args.min_scene_len, cut_mode=args.cut)
    out = Path(args.out)
    report = split_videos(args.in_dir, out, config, workers=args.workers, progress=not args.no_progress)
    return _print_report(report, out / CLIPS)


def cmd_score(args: argparse.Namespace) -> int:
    from easyanimate_rt.data.score import ScoreConfig, score_clips

    src, dst = _stage_io(args, CLIPS, SCORES)
    names = tuple(s.strip() for s in args.scores.split(",") if s.strip())
    config = ScoreConfig(scores=names, text_model=args.text_model, clip_model=args.clip_model,
                         aesthetic_head=args.aesthetic_head, device=args.device)
    if "aesthetic" in names and not config.aesthetic_enabled:
        print("score: no --clip-model/--aesthetic-head given; aesthetic scores are recorded as missing")
    report = score_clips(src, dst, config, workers=args.workers, progress=not args.no_progress)
    return _print_report(report, dst)


def cmd_filter(args: argparse.Namespace) -> int:
    from easyanimate_rt.data.filter import FilterConfig, filter_manifest

    src, dst = _stage_io(args, SCORES, FILTERED)
    config = FilterConfig(motion=args.motion, max_text=args.max_text, min_aesthetic=args.min_aesthetic,
                          duration=args.duration, min_side=args.min_side, on_missing=args.on_missing)
    summary = filter_manifest(src, dst, config)  # also writes DIR/filter_summary.json
    print(f"filter: kept {summary.kept} of {summary.total} clips ({summary.removed} removed) -> {dst}")
    for rule, count in summary.removed_by.items():
        print(f"  {rule:<24} removed {count}")
    for score, count in summary.missing.items():
        print(f"  {score:<24} missing in {count} (on-missing={config.on_missing})")
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    from easyanimate_rt.data.caption import CaptionConfig, caption_clips

    src, dst = _stage_io(args, FILTERED, CAPTIONED)
    config = CaptionConfig(model=args.model, captioner=args.captioner, prompt=args.prompt or None,
                           rewrite=args.rewrite, rewrite_model=args.rewrite_model, device=args.device,
                           max_new_tokens=args.max_new_tokens)
    if not config.enabled:
        print("caption: no --model given; empty captions are recorded as missing")
    report = caption_clips(src, dst, config, workers=args.workers, progress=not args.no_progress)
    return _print_report(report, dst)


def _common(p: argparse.ArgumentParser, stage_io: tuple[str, str] | None = None, parallel: bool = True) -> None:
    if stage_io is not None:
        p.add_argument("dir", metavar="DIR", help="dataset folder (the output folder of `data split`)")
        p.add_argument("--input", help=f"input manifest (default DIR/{stage_io[0]})")
        p.add_argument("--output", help=f"output manifest (default DIR/{stage_io[1]})")
    if not parallel:
        return
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_stage_parsers(sub) -> None:
    from easyanimate_rt.data.caption import DEFAULT_PROMPT

    p = sub.add_parser("split", help="cut raw videos into single-scene clips")
    p.add_argument("in_dir", metavar="IN_DIR", help="folder of raw videos (searched recursively)")
    p.add_argument("--out", required=True, help="dataset folder for clips/ and clips.jsonl")
    p.add_argument("--min-seconds", type=float, default=3.0, help="drop shorter scenes (default 3)")
    p.add_argument("--max-seconds", type=float, default=10.0, help="split longer scenes (default 10)")
    p.add_argument("--cascade", default="10:0,20:1,30:2",
                   help="ContentDetector passes THRESHOLD:FRAME_SKIP,... whose cuts are unioned")
    p.add_argument("--min-scene-len", type=int, default=15, help="frames between cuts (default 15)")
    p.add_argument("--cut", choices=("auto", "reencode"), default="auto",
                   help="auto: stream copy where frame-exact, else re-encode (default); reencode: always")
    _common(p)
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("score", help="motion, text-area, aesthetic and basic scores per clip")
    _common(p, (CLIPS, SCORES))
    p.add_argument("--scores", default="motion,text_area,aesthetic", help="which scores to compute")
    p.add_argument("--text-model", help="local ONNX DB text detector (default: the one rapidocr ships)")
    p.add_argument("--clip-model", help="local CLIP ViT-L/14 folder (transformers format)")
    p.add_argument("--aesthetic-head", help="local LAION aesthetic MLP weights (.pth or .safetensors)")
    p.add_argument("--device", default="cpu", help="torch device for the aesthetic model")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("filter", help="drop clips by score thresholds; print what each rule removed")
    _common(p, (SCORES, FILTERED), parallel=False)
    from easyanimate_rt.data.filter import parse_range

    p.add_argument("--motion", type=_optional(parse_range), default="3:8",
                   help="keep LOW < motion < HIGH (default 3:8; 'none' = off)")
    p.add_argument("--max-text", type=_optional(float), default=0.02,
                   help="drop text area above this fraction (default 0.02)")
    p.add_argument("--min-aesthetic", type=_optional(float), default=4.0,
                   help="drop mean aesthetic below this (default 4.0)")
    p.add_argument("--duration", type=_optional(parse_range), default=None, help="keep LOW < seconds < HIGH")
    p.add_argument("--min-side", type=_optional(int), default=None, help="drop clips whose short side is smaller")
    p.add_argument("--on-missing", choices=("keep", "drop"), default="keep",
                   help="what a missing score does to its rule (default keep)")
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser("caption", help="caption the middle frame and rewrite into a video caption")
    _common(p, (FILTERED, CAPTIONED))
    p.add_argument("--model", help="local vision-language model folder (transformers format)")
    p.add_argument("--captioner", default="hf", help="'hf' or package.module:factory (called with --model)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt for chat-style captioners")
    p.add_argument("--rewrite", choices=("template", "none"), default="template",
                   help="rewrite into 'In this video, ...' by rule (default) or keep the raw caption")
    p.add_argument("--rewrite-model", help="local causal LM folder that rewrites instead of the rule")
    p.add_argument("--max-new-tokens", type=int, default=60, help="caption length limit in tokens")
    p.add_argument("--device", default="cpu", help="torch device for the models")
    p.set_defaults(func=cmd_caption)


def add_data_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``data`` command (with split/score/filter/caption) to a top-level CLI."""
    parser = subparsers.add_parser("data", help="data pipeline: split, score, filter, caption")
    sub = parser.add_subparsers(dest="data_command", metavar="{split,score,filter,caption}")
    sub.required = True
    _add_stage_parsers(sub)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easyanimate-rt data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="data_command", metavar="{split,score,filter,caption}")
    sub.required = True
    _add_stage_parsers(sub)
    return parser


def main_data(argv: Sequence[str] | None = None) -> int:
    """Run one data command standalone; EasyAnimateError -> exit code 2, like the main CLI."""
    args = build_parser().parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except EasyAnimateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main_data())
