"""Command line: ``easyanimate-rt <command>`` (also ``python -m easyanimate_rt``).

Thin by design: parse, call importable functions, print, map errors to exit codes
(0 ok, 1 unexpected failure, 2 a rule was broken / bad input, 130 interrupted).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Sequence

from .data.cli import add_data_parser
from .engines.cli import add_build_parser
from .errors import EasyAnimateError
from .export.cli import add_export_parser
from .train.cli import add_train_parser
from .validate.cli import add_verify_parser

log = logging.getLogger(__name__)


def default_model() -> str:
    """The shipped model directory if present, else the ``tiny`` preset (random weights)."""
    from importlib import resources

    shipped = resources.files("easyanimate_rt") / "assets" / "shapes"
    if shipped.is_dir() and (Path(str(shipped)) / "easyanimate_rt.json").exists():
        return str(shipped)
    return "tiny"


# --- info ------------------------------------------------------------------------------

def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def model_info(preset: str, height: int | None, width: int | None, frames: int | None) -> dict:
    """Parameter counts (built on the meta device) and token counts for a preset."""
    import torch

    from .reference.config import from_preset
    from .reference.dit import VideoDiT
    from .reference.vae import SliceVAE

    cfg = from_preset(preset)
    with torch.device("meta"):
        dit = VideoDiT(cfg.dit)
        vae = SliceVAE(cfg.vae)
    motion = sum(_count(b.attn_temporal) for b in dit.transformer_blocks if b.attn_temporal is not None)
    skips = _count(dit.long_connect_fc)
    clip = _count(dit.clip_projection) if dit.clip_projection is not None else 0
    t5 = cfg.text_encoder
    h = height or cfg.sampling.height
    w = width or cfg.sampling.width
    f = frames or cfg.sampling.frames
    lf = cfg.vae.latent_frames(f)
    s = cfg.vae.spatial_compression * cfg.dit.patch_size
    return {
        "preset": preset,
        "dit_params": _count(dit), "dit_backbone_params": _count(dit) - motion - skips - clip,
        "motion_module_params": motion, "skip_params": skips, "clip_params": clip, "vae_params": _count(vae),
        "text_encoder": f"T5 d_model={t5.d_model} layers={t5.num_layers} max_length={t5.max_length}",
        "size": f"{h}x{w}x{f}", "latent_frames": lf,
        "tokens": lf * (h // s) * (w // s),
    }


def cmd_info(args: argparse.Namespace) -> int:
    from .reference.config import PRESETS

    presets = [args.preset] if args.preset else sorted(PRESETS)
    for name in presets:
        info = model_info(name, args.height, args.width, args.frames)
        print(f"{name}:")
        for k, v in info.items():
            if k != "preset":
                print(f"  {k:22s} {v:,}" if isinstance(v, int) else f"  {k:22s} {v}")
    return 0


# --- generate ----------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .reference.pipeline import ReferencePipeline

    model = args.model or default_model()
    image = None
    if args.image is not None:
        from .media import read_image

        image = read_image(args.image)  # a missing or broken file fails before the model loads
    t0 = time.perf_counter()
    pipe = ReferencePipeline.from_pretrained(model, device=args.device, clip_model=args.clip_model)
    if Path(model).is_dir():
        print(f"model: {model}")
    else:
        print(f"model: preset {model!r} with random weights (no trained model given)")
    req = pipe.request(args.prompt, negative_prompt=args.negative_prompt, height=args.height,
                       width=args.width, frames=args.frames, steps=args.steps,
                       guidance_scale=args.guidance_scale, sampler=args.sampler, seed=args.seed,
                       guidance_mode=args.guidance_mode, image=image)
    req.validate(pipe.config)
    bar = tqdm(total=req.steps, desc="denoising", unit="step", disable=args.quiet)

    def on_step(i: int, n: int) -> None:
        bar.update(1)

    t1 = time.perf_counter()
    result = pipe.run(req, on_step)
    bar.close()
    out = result.save(args.out)
    t2 = time.perf_counter()
    print(f"wrote {out} ({result.frames.shape[0]} frames {req.height}x{req.width} @ {result.fps} fps); "
          f"load {t1 - t0:.1f}s, generate {t2 - t1:.1f}s")
    return 0


# --- parser ------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easyanimate-rt", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="presets, parameter counts and token counts")
    p.add_argument("--preset", help="one preset (default: all)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="text -> video with the reference backend")
    p.add_argument("prompt")
    p.add_argument("--model", help="model directory or preset name (default: the shipped model)")
    p.add_argument("--out", default="output.mp4", help="output .mp4, .gif or .png (default: output.mp4)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--sampler", help="ddim, euler, euler_a or dpm++ (default: the model's)")
    p.add_argument("--guidance-mode", choices=["batched", "sequential"], default="batched")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image", help="image-to-video: the start frame (png/jpg of the video's size; InP models)")
    p.add_argument("--clip-model", help="local CLIP vision model directory (CLIPVisionModelWithProjection) "
                                        "for --image; without it the start image conditions through the VAE only")
    p.add_argument("--device", default="cpu")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_generate)

    # Each layer registers its own subcommands; their modules import nothing heavy at
    # module level, so `easyanimate-rt --help` stays fast.
    add_data_parser(sub)
    add_train_parser(sub)
    add_export_parser(sub)
    add_verify_parser(sub)
    add_build_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except EasyAnimateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
