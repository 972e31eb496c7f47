"""The runtime's engines per precision against the reference: PSNR of the same request
and the shipped model's adherence (benchmarks/eval_shapes.py's 48 held-out prompts).

    python benchmarks/runtime_precision.py [--cache-dir DIR] [--json results/runtime-precision-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PROMPTS = ["a red circle moving left on a white background", "a small blue square moving up on a black background",
           "a green triangle static on a gray background"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--cache-dir", default=None, help="engine cache (default: the user's)")
    p.add_argument("--precisions", default="fp32,fp16")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    from easyanimate_rt.cli import default_model
    from easyanimate_rt.reference.pipeline import ReferencePipeline
    from easyanimate_rt.runtime.pipeline import Pipeline
    from easyanimate_rt.shapes.evaluate import evaluate
    from easyanimate_rt.shapes.metrics import psnr

    model = args.model or default_model()
    ref = ReferencePipeline.from_pretrained(model)
    out = {}
    for precision in args.precisions.split(","):
        t0 = time.perf_counter()
        pipe = Pipeline.from_pretrained(model, precision=precision, cache_dir=args.cache_dir)
        load = time.perf_counter() - t0
        psnrs = [psnr(pipe(prompt, seed=k).frames, ref.generate(prompt, seed=k).frames) for k, prompt in enumerate(PROMPTS)]
        report = evaluate(pipe, 48, 0)
        out[precision] = {"load_or_build_s": round(load, 1), "psnr_vs_reference_db": [round(v, 2) for v in psnrs],
                          "colour": report.colour_rate, "direction": report.direction_rate,
                          "coherent": report.coherent_rate, "s_per_video": round(report.seconds_per_video, 3)}
        print(precision, json.dumps(out[precision]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
