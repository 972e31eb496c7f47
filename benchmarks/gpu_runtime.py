"""The torch backend's denoising loop on a GPU: eager vs CUDA graphs vs torch.compile.

    python benchmarks/gpu_runtime.py [--json results/gpu_runtime.json]

bf16, on the shipped model at its default size and on ``v2-512`` random weights at
384 x 672 x 16 (4 steps each, median over repeats). Also checks graph replay against
eager (max abs difference of the final latents). Needs a CUDA device; prints the card.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-release", action="store_true", help="only the shipped model")
    args = p.parse_args(argv)

    import torch

    from easyanimate_rt.cli import default_model
    from easyanimate_rt.reference.pipeline import ReferencePipeline
    from easyanimate_rt.reference.weights import load_model_or_preset
    from easyanimate_rt.runtime.cuda_graphs import denoise_on_device

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name()
    cases = [("shapes", default_model(), {})]
    if not args.skip_release:
        cases.append(("v2-512", "v2-512", dict(height=384, width=672, frames=18)))  # V2: 1 or 9k frames
    results = {"card": card, "torch": torch.__version__, "steps": args.steps, "cases": {}}
    for name, source, size in cases:
        model = load_model_or_preset(source).to("cuda", torch.bfloat16).eval()
        ref = ReferencePipeline(model, device="cuda")
        req = ref.request("a red circle moving left", steps=args.steps, **size)
        emb, mask = ref.encode_prompt(req.prompt, req.negative_prompt)

        def timed(fn):
            fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                fn()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            return statistics.median(times)

        row = {"request": f"{req.height}x{req.width}x{req.frames}"}
        row["eager_s"] = timed(lambda: denoise_on_device(model, req, emb, mask, device="cuda", cuda_graph=False))
        row["graph_s"] = timed(lambda: denoise_on_device(model, req, emb, mask, device="cuda", cuda_graph=True))
        a = denoise_on_device(model, req, emb, mask, device="cuda", cuda_graph=True)
        b = denoise_on_device(model, req, emb, mask, device="cuda", cuda_graph=False)
        row["graph_vs_eager_max_abs"] = float((a - b).abs().max())
        eager_dit = model.dit
        try:
            model.dit = torch.compile(eager_dit)
            row["compile_s"] = timed(lambda: denoise_on_device(model, req, emb, mask, device="cuda",
                                                               cuda_graph=False))
        except Exception as exc:  # report, do not hide
            row["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        finally:
            model.dit = eager_dit
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results["cases"][name] = row
        print(name, json.dumps(row), flush=True)
        model = ref = None  # free the GPU memory before the next case
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
