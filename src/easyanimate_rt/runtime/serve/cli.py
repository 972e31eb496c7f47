"""``easyanimate-rt serve``: the video job API (runtime/serve/)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from ...errors import InputError

DEFAULT_STORE = "easyanimate-rt-jobs"


def _autoscale(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        if not sep:
            raise ValueError
        return int(lo), int(hi)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--autoscale must be MIN:MAX (integers), got {text!r}") from None


def add_serve_parser(subparsers, default_model: Callable[[], str]) -> None:
    p = subparsers.add_parser("serve", help="the video job API (submit, progress, cancel, resume) on the runtime")
    p.add_argument("--model", help="model directory or preset name (default: the shipped model)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; any other needs an API key)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--store", default=DEFAULT_STORE, help=f"job store directory: the SQLite database, checkpoints "
                                                          f"and videos (default ./{DEFAULT_STORE})")
    p.add_argument("--workers", type=int, default=1, help="workers, each with its own warm Pipeline (one per GPU "
                                                          "on a GPU machine; default 1)")
    p.add_argument("--max-queue", type=int, default=64, help="queued jobs beyond which submissions get 429")
    p.add_argument("--checkpoint-every", type=int, default=5,
                   help="save a running job's denoising state every N steps (0: never; default 5)")
    p.add_argument("--api-key", help="require this key (Authorization: Bearer KEY) on every route but /healthz "
                                     "(default: the EASYANIMATE_RT_API_KEY environment variable)")
    limits = p.add_argument_group("request limits (400 beyond them; 413 for the body)")
    limits.add_argument("--max-frames", type=int, default=144)
    limits.add_argument("--max-height", type=int, default=1024)
    limits.add_argument("--max-width", type=int, default=1024)
    limits.add_argument("--max-steps", type=int, default=100)
    limits.add_argument("--max-prompt-chars", type=int, default=2000)
    limits.add_argument("--max-body-bytes", type=int, default=64 * 1024)
    limits.add_argument("--max-tokens", type=int, help="DiT tokens per request (default: what memory allows)")
    pipe = p.add_argument_group("runtime (as generate)")
    pipe.add_argument("--backend", default="auto")
    pipe.add_argument("--precision")
    pipe.add_argument("--device", default="auto")
    pipe.add_argument("--threads", type=int, help="intra-op threads per worker (default: the cores / workers)")
    pipe.add_argument("--cache-dir", help="engine cache (default: $XDG_CACHE_HOME/easyanimate-rt/engines)")
    pipe.add_argument("--no-compile", action="store_true", help="never build engines; sizes without them fail")
    pipe.add_argument("--buckets", help="sizes to have engines for at start-up, e.g. 64x64x17,64x64x33 "
                                        "(default: the model's default size)")
    pipe.add_argument("--cache", default="none", choices=["none", "fbcache", "teacache"], help="step caching")
    pipe.add_argument("--cache-threshold", type=float)
    p.add_argument("--lora-dir", help="LoRA adapters requests may name: NAME.safetensors files (a request's "
                                      "\"lora\": [\"NAME[:WEIGHT]\", ...]; never a path)")
    ray = p.add_argument_group("Ray Serve (pip install \"easyanimate-rt[serve-ray]\")")
    ray.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                     help="run the workers as Ray Serve replicas: a local Ray instance, or the cluster at ADDRESS")
    ray.add_argument("--replicas", type=int, help="replicas (default: one per GPU in the cluster, else 1)")
    ray.add_argument("--autoscale", type=_autoscale, metavar="MIN:MAX", help="Ray Serve autoscaling bounds")
    p.set_defaults(func=lambda args: cmd_serve(args, default_model))


def cmd_serve(args: argparse.Namespace, default_model: Callable[[], str]) -> int:
    from .jobs import Limits
    from .server import API_KEY_ENV, ServeOptions, serve

    buckets = None
    model = args.model or default_model()
    if args.buckets:
        from ...engines.buckets import check_bucket, parse_buckets
        from ...engines.budget import check_bucket_budget
        from ...engines.manifest import cuda_visible
        from ..pipeline import read_config

        buckets = parse_buckets(args.buckets)
        config = read_config(model)  # (None: an upstream release directory, checked by its build)
        if config is not None and args.device in ("auto", "cpu"):  # before the store, workers or any export
            for b in buckets:
                check_bucket(config, b)
                if args.device == "cpu" or not cuda_visible():
                    check_bucket_budget(config, b.height, b.width, b.frames, b.prompts)
    try:
        limits = Limits(args.max_frames, args.max_height, args.max_width, args.max_steps, args.max_prompt_chars,
                        args.max_body_bytes, args.max_tokens)
    except Exception as exc:
        raise InputError(str(exc).replace("server limit ", "--").replace("_", "-")) from None
    opts = ServeOptions(model=model, store=Path(args.store), host=args.host, port=args.port,
                        workers=args.workers, max_queue=args.max_queue, checkpoint_every=args.checkpoint_every,
                        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, limits=limits,
                        backend=args.backend, precision=args.precision, device=args.device, threads=args.threads,
                        cache_dir=args.cache_dir, compile=not args.no_compile, cache=args.cache,
                        cache_threshold=args.cache_threshold, buckets=buckets, ray=args.ray, replicas=args.replicas,
                        autoscale=args.autoscale, lora_dir=Path(args.lora_dir) if args.lora_dir else None)
    serve(opts, say=lambda msg: print(msg, file=sys.stderr, flush=True))
    return 0

