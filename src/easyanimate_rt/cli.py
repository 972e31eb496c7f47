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

from .errors import EasyAnimateError, InputError

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

GENERATE_BACKENDS = "auto (trt, else ort-cuda, else torch on a GPU; ort-cpu on the CPU; engines built on first " \
                    "use), ort-cpu (alias ort), ort-cuda, ort-trt, trt, rtx, torch, torch-compile (the torch " \
                    "modules under torch.compile), reference (the PyTorch reference pipeline), or per network: " \
                    "dit=trt,vae=ort-cuda"


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed must be an integer, got {text!r}") from None


def _print_timings(timings: dict, total: float) -> None:
    steps = timings.get("steps") or []
    rows = [(k, timings[k]) for k in ("load", "build", "prepare", "text", "denoise", "decode", "write") if k in timings]
    print("timings (s):", file=sys.stderr)
    for name, value in rows:
        extra = ""
        if name == "denoise" and steps:
            extra = f"  ({len(steps)} steps: mean {sum(steps) / len(steps):.3f}, min {min(steps):.3f}, " \
                    f"max {max(steps):.3f})"
        print(f"  {name:8s} {value:8.3f}{extra}", file=sys.stderr)
    print(f"  {'total':8s} {total:8.3f}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .media import check_output_path

    t_start = time.perf_counter()
    from .runtime.pipeline import parse_backend, read_config, resolve_device

    check_output_path(args.out)  # before any model loads
    device = resolve_device(args.device) if args.device != "auto" else "auto"  # auto: the pipeline decides
    model = args.model or default_model()
    image = None
    if args.image is not None:
        from .media import read_image

        image = read_image(args.image)  # a missing or broken file fails before the model loads
    kwargs = dict(negative_prompt=args.negative_prompt, height=args.height, width=args.width, frames=args.frames,
                  steps=args.steps, guidance_scale=args.guidance_scale, sampler=args.sampler, seed=args.seed,
                  guidance_mode=args.guidance_mode, image=image, decode=args.decode)
    use_reference = args.backend == "reference"
    if not use_reference:
        parse_backend(args.backend)
    cache = None
    if args.cache != "none" or args.cache_threshold is not None:
        from .runtime.step_cache import CacheSettings

        if use_reference:
            raise InputError("--cache: step caching runs on the runtime, not on --backend reference")
        if args.cache == "none":
            raise InputError(f"--cache-threshold {args.cache_threshold} needs a policy: --cache fbcache or teacache")
        cache = CacheSettings(args.cache, args.cache_threshold)  # a bad setting fails here, before any work
    config = read_config(model)  # torch-free; None for an upstream release directory
    loras = ()
    if args.lora:  # every file and weight checked before any model loads
        from .reference.lora import adapters_of

        loras = adapters_of(args.lora)
    if config is not None:  # refuse a bad request before any model or engine loads
        from .reference.request import default_request
        from .engines.budget import check_budget

        req = default_request(config, args.prompt, **kwargs)
        req.validate(config)
        check_budget(config, req, args.max_tokens)
    stages: list = []  # a bar over the first-use export and build, made by its first stage
    tty = sys.stderr.isatty()  # a log (not a terminal) gets plain lines, no bars

    def progress(msg: str) -> None:
        line = f"[{time.perf_counter() - t_start:5.1f}s] {msg}"
        if not tty:
            print(line, file=sys.stderr, flush=True)
            return
        if not stages:
            stages.append(tqdm(desc="first use", unit="stage", file=sys.stderr))
        stages[0].write(line, file=sys.stderr)
        stages[0].update(1)
    if use_reference:
        from .reference.pipeline import ReferencePipeline

        pipe = ReferencePipeline.from_pretrained(model, device=resolve_device(device),
                                                 clip_model=args.clip_model, loras=loras)
    else:
        from .runtime.pipeline import Pipeline

        from .engines.buckets import Bucket

        # Build (first use) or load exactly the engines this request needs.
        bucket = dict(buckets=[Bucket(req.height, req.width, req.frames)], guidance=Pipeline.guidance_of(req)) \
            if config is not None else {}
        pipe = Pipeline.from_pretrained(model, backend=args.backend, engine_dir=args.engines, **bucket,
                                        cache_dir=args.cache_dir, precision=args.precision, threads=args.threads,
                                        compile=not args.no_compile, progress=None if args.quiet else progress,
                                        device=device, cuda_graphs=not args.no_cuda_graphs,
                                        clip_model=args.clip_model, cache=args.cache,
                                        cache_threshold=cache.threshold if cache else None, loras=loras)
    for bar in stages:
        bar.close()
    if Path(model).is_dir():
        print(f"model: {model}")
    else:
        print(f"model: preset {model!r} with random weights (no trained model given)")
    for adapter in loras:
        print(f"LoRA: {adapter.path} at weight {adapter.weight:g}")
    req = pipe.request(args.prompt, **kwargs)
    if config is None:  # an upstream release directory: its rules once its config is loaded
        req.validate(pipe.config)
    bar = tqdm(total=req.calls, desc="denoising", unit="step", disable=args.quiet or not tty, file=sys.stderr)
    quarters = {max(1, round(req.calls * q / 4)) for q in range(1, 5)}

    def on_step(i: int, n: int) -> None:
        bar.update(1)
        if not tty and not args.quiet and i in quarters:  # a log: a line at each quarter of the loop
            print(f"[{time.perf_counter() - t_start:5.1f}s] denoising: step {i}/{n}", file=sys.stderr, flush=True)

    try:  # the reference and the runtime answer the same call with the same result
        timings = pipe.generate_to(args.out, req, on_step, max_tokens=args.max_tokens).timings
    finally:
        bar.close()
    total = time.perf_counter() - t_start
    backend = "reference" if use_reference else pipe.describe()
    print(f"wrote {args.out} ({req.frames} frames {req.height}x{req.width} @ {pipe.config.sampling.fps} fps) "
          f"on {backend} in {total:.1f}s")
    report = timings.get("step_cache")
    if report:
        print(f"step cache ({report['policy']}, threshold {report['threshold']:g}): {report['computed']} steps "
              f"computed, {report['skipped']} skipped, {report['checked']} checked by the drift guard"
              + (f" (fired {len(report['fired'])}x, threshold now {report['final_threshold']:g})"
                 if report["fired"] else ""))
    if args.timings:
        _print_timings(timings, total)
    return 0


FIT_PROMPTS = ("a red circle moving left on a white background", "a blue square moving up on a black background",
               "a green triangle growing on a white background", "a yellow circle moving right on a blue background",
               "a white square shrinking on a black background", "a purple triangle moving down on a white background")


def cmd_cache_fit(args: argparse.Namespace) -> int:
    """Fit TeaCache's rescale polynomial on a model and write it beside the model (or --out)."""
    from .runtime.pipeline import Pipeline
    from .runtime.step_cache import RESCALE_NAME, CacheSettings, calibrate, save_rescale

    model = args.model or default_model()
    prompts = FIT_PROMPTS
    if args.prompts_file:
        try:
            prompts = tuple(line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip())
        except OSError as exc:
            raise InputError(f"--prompts-file {args.prompts_file}: {exc.strerror}") from None
        if not prompts:
            raise InputError(f"--prompts-file {args.prompts_file} holds no prompts")
    if args.degree < 1:
        raise InputError(f"--degree must be >= 1, got {args.degree}")
    if not Path(model).is_dir():
        from .reference.config import preset_name

        preset_name(model)  # neither a directory nor a preset: the error says so and lists the presets
    out = Path(args.out) if args.out else (Path(model) / RESCALE_NAME if Path(model).is_dir() else None)
    if out is None:
        raise InputError(f"{model!r} is a preset, not a model directory: give --out for the fitted file")
    _check_rescale_target(out, "--out" if args.out else "the model directory")  # before minutes of fitting
    pipe = Pipeline.from_pretrained(model, cache=CacheSettings("teacache", 0.0), threads=args.threads)
    coeffs, pairs = calibrate(pipe, prompts, args.steps, args.degree)
    import numpy as np

    x, y = np.asarray(pairs).T
    fit_err = float(np.abs(np.polyval(coeffs, x) - y).mean() / max(y.mean(), 1e-12))
    try:
        save_rescale(out, coeffs, {"model": pipe.config.name, "prompts": len(prompts), "pairs": len(pairs),
                                   "steps": args.steps or pipe.config.sampling.steps, "degree": args.degree,
                                   "mean_relative_fit_error": fit_err})
    except OSError as exc:
        raise InputError(f"cannot write {out}: {exc.strerror or exc}") from None
    print(f"wrote {out}: TeaCache rescale {[round(c, 5) for c in coeffs]} from {len(pairs)} step pairs "
          f"({len(prompts)} prompts; mean relative fit error {fit_err:.1%})")
    return 0


def _check_rescale_target(out: Path, option: str) -> None:
    """``out`` can be written, and replacing it loses nothing: it is absent or a
    step-cache file (one this command wrote); anything else is refused."""
    import json

    from .fileio import check_writable_file

    check_writable_file(out, option)
    if out.exists():
        try:
            data = json.loads(out.read_text())
            ours = isinstance(data, dict) and "teacache_rescale" in data
        except (OSError, ValueError, TypeError):
            ours = False
        if not ours:
            raise InputError(f"{option}: {out} exists and is not a step-cache file written by cache-fit; "
                             f"give another path (nothing was written)")


def _gate_runner(*args):
    """runtime.backends.gate_runner, imported when a build's gate runs."""
    from .runtime.backends import gate_runner

    return gate_runner(*args)


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

    p = sub.add_parser("generate", help="text -> video (on the runtime's engines by default)")
    p.add_argument("prompt")
    p.add_argument("--model", help="model directory or preset name (default: the shipped model)")
    p.add_argument("--out", default="output.mp4", help="output .mp4, .gif or .png (default: output.mp4)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--guidance-scale", type=float)
    p.add_argument("--sampler", help="ddim, euler, euler_a, dpm++, pndm or plms (default: the model's)")
    p.add_argument("--decode", help="plain (one decode, slice by slice) or smooth (upstream's: the video "
                   "re-encoded half a slice shifted, decoded again and averaged; about 2x the decode) "
                   "(default: the model's; smooth on the release presets)")
    p.add_argument("--guidance-mode", choices=["batched", "sequential"], default="batched")
    p.add_argument("--seed", type=_seed, default=0, help="an integer in [0, 2**64) (default 0)")
    p.add_argument("--image", help="image-to-video: the start frame (png/jpg of the video's size; InP models)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]",
                   help="a LoRA (upstream/kohya or diffusers/PEFT safetensors) merged into the model at WEIGHT "
                        "(default 1.0; upstream's scripts use 0.55); repeatable; its engines are its own")
    p.add_argument("--clip-model", help="local CLIP vision model directory (CLIPVisionModelWithProjection) "
                                        "for --image; without it the start image conditions through the VAE only")
    p.add_argument("--backend", default="auto", help=GENERATE_BACKENDS)
    p.add_argument("--engines", help="engine directory (default: one per model in the engine cache)")
    p.add_argument("--cache-dir", help="engine cache (default: $XDG_CACHE_HOME/easyanimate-rt/engines)")
    p.add_argument("--precision", help="fp32 or fp16 for ONNX Runtime CPU engines (default fp32); fp32, bf16 or "
                                        "fp16 on a GPU (default bf16)")
    p.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads (default: the cores)")
    p.add_argument("--max-tokens", type=int, help="refuse requests with more DiT tokens than this")
    p.add_argument("--no-compile", action="store_true", help="never export or build engines; a size without "
                                                             "engines is an error")
    p.add_argument("--no-cuda-graphs", action="store_true", help="no CUDA graph capture (GPU backends)")
    p.add_argument("--cache", default="none", choices=["none", "fbcache", "teacache"],
                   help="step caching: skip the DiT's tail between similar steps (runtime/step_cache.py)")
    p.add_argument("--cache-threshold", type=float, help="the policy's threshold (default: the policy's; "
                                                         "0 never skips, larger skips more)")
    p.add_argument("--timings", action="store_true", help="print per-stage timings")
    p.add_argument("--device", default="auto", help="auto (cuda where visible, else cpu), cpu, or cuda[:N]: the "
                                                    "torch backend on the GPU, its denoising step in a CUDA graph")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("cache-fit", help="fit TeaCache's rescale polynomial on a model (step caching)")
    p.add_argument("--model", help="model directory (default: the shipped model)")
    p.add_argument("--prompts-file", help="one prompt per line (default: six shapes-world prompts)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    p.add_argument("--degree", type=int, default=2, help="polynomial degree (default 2)")
    p.add_argument("--threads", type=int)
    p.add_argument("--out", help="where to write (default: MODEL/step_cache.json)")
    p.set_defaults(func=cmd_cache_fit)

    # Each layer registers its own subcommands; their modules import nothing heavy at
    # module level, so `easyanimate-rt --help` stays fast.
    from .data.cli import add_data_parser
    from .engines.cli import add_build_parser
    from .export.cli import add_export_parser
    from .runtime.serve.cli import add_serve_parser
    from .train.cli import add_train_parser
    from .validate.cli import add_verify_parser

    add_data_parser(sub)
    add_train_parser(sub)
    add_export_parser(sub)
    add_verify_parser(sub)
    add_build_parser(sub)
    # The parity gate of `build` runs the runtime's own engines (engines/ cannot import runtime/).
    sub.choices["build"].set_defaults(gate_runner=_gate_runner)
    add_serve_parser(sub, default_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 ok, 2 a broken rule or bad input (one line: the rule and the value),
    130 interrupted (Ctrl-C at any point), 1 anything unexpected (one line and a hint;
    the traceback with -v). Never a traceback for a user mistake."""
    verbose = False
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        verbose = args.verbose
        logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s" if verbose else "%(levelname)s: %(message)s")
        return int(args.func(args) or 0)
    except EasyAnimateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except Exception as exc:  # a bug or an environment problem, not the user's input
        if verbose:
            import traceback

            traceback.print_exc()
        detail = str(exc).splitlines()[0] if str(exc) else ""
        print(f"error: unexpected {type(exc).__name__}: {detail}\n"
              f"hint: rerun with -v for the full traceback; if it persists, please report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
