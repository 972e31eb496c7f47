"""A list of prompts as one batch against the same prompts one after another.

    python benchmarks/batch.py [--model DIR] [--prompts 4] [--rounds 3] [--json results/batch-cpu.json]

The shipped model at its default size on the runtime's default backend, engines cached
first (the batch's engines are the ``HxWxFb4`` bucket): ``pipe(prompts)`` (one text-encoder
call, one DiT call of batch 2N per step) against ``pipe(prompts, batch_size=1)``, timed in
alternation (``--rounds`` of each, medians), in process; videos per second and the DiT
loop's share. Also checks that every batched video equals its one-by-one twin.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPTS = ["a red circle moving left on a white background", "a blue square moving up on a black background",
           "a green triangle growing on a white background", "a yellow circle moving right on a blue background"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=4, choices=range(2, 5))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "batch-cpu.json"))
    args = p.parse_args(argv)

    import numpy as np

    from easyanimate_rt.cli import default_model
    from easyanimate_rt.runtime.pipeline import Pipeline

    model = args.model or default_model()
    pipe = Pipeline.from_pretrained(model)
    prompts = PROMPTS[:args.prompts]
    batched, single = pipe(prompts), pipe(prompts, batch_size=1)  # warm-up; the first builds b4 engines
    worst = max(float(np.abs(a.latents - b.latents).max()) for a, b in zip(batched, single))
    frames = max(int(np.abs(a.frames.astype(int) - b.frames).max()) for a, b in zip(batched, single))
    times: dict[str, list[float]] = {"batch": [], "one_by_one": []}
    loops: dict[str, list[float]] = {"batch": [], "one_by_one": []}
    for _ in range(args.rounds):
        for name, size in (("one_by_one", 1), ("batch", None)):
            t0 = time.perf_counter()
            videos = pipe(prompts, batch_size=size)
            times[name].append(time.perf_counter() - t0)
            # one batch: every video carries the batch's loop time
            loops[name].append(sum(v.timings["denoise"] for v in videos) if size == 1 else videos[0].timings["denoise"])
    med = {k: statistics.median(v) for k, v in times.items()}
    loop = {k: statistics.median(v) for k, v in loops.items()}
    cfg = pipe.config.sampling
    results = {"model": model, "request": f"{cfg.height}x{cfg.width}x{cfg.frames}, {cfg.steps} steps {cfg.sampler}",
               "prompts": args.prompts, "rounds": args.rounds, "seconds": med, "loop_seconds": loop,
               "speedup": med["one_by_one"] / med["batch"], "loop_speedup": loop["one_by_one"] / loop["batch"],
               "videos_per_s": {k: args.prompts / v for k, v in med.items()},
               "max_latent_difference": worst, "max_frame_difference": frames}
    print(f"{args.prompts} prompts: batch {med['batch']:.2f} s, one by one {med['one_by_one']:.2f} s "
          f"({results['speedup']:.2f}x; loop {results['loop_speedup']:.2f}x); batched vs one-by-one videos: "
          f"latents within {worst:.1e}, frames within {frames} level(s)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
