"""Upstream's smoothed decode against the plain one: its cost and its effect on the seams.

    python benchmarks/smooth_decode.py [--model DIR] [--frames 25 49] [--rounds 3]
                                       [--json results/smooth-decode-cpu.json]

The shipped model on the runtime's default backend, engines cached first. For each frame
count, a few prompts are denoised once; their latents are then decoded plain and smoothed
in alternation (``--rounds`` each, medians of the decode time). Seam metric: the mean
absolute change between consecutive frames (uint8 levels) across a slice boundary of the
plain decode (a new encoder slice starts) against inside a slice; a ratio above 1 is a
visible seam. Both decodes of the same latents are scored.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

PROMPTS = ["a red circle moving left on a white background", "a blue square moving up on a black background",
           "a green triangle growing on a white background"]


def seams(frames, config) -> dict[str, float]:
    """Mean |frame[t+1] - frame[t]| at slice boundaries and inside slices, and their ratio."""
    import numpy as np

    x = frames.astype(np.float32)
    change = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))          # change[t]: frame t -> t + 1
    starts = {a for a, _ in config.vae.frame_slices(len(frames)) if a > 0}
    boundary = [change[s - 1] for s in sorted(starts)]
    inside = [c for t, c in enumerate(change) if t + 1 not in starts]
    b, i = float(np.mean(boundary)), float(np.mean(inside))
    return {"boundary": b, "inside": i, "ratio": b / i}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--frames", type=int, nargs="+", default=[25, 49])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "smooth-decode-cpu.json"))
    args = p.parse_args(argv)

    import numpy as np

    from easyanimate_rt.cli import default_model
    from easyanimate_rt.runtime.pipeline import Pipeline

    model = args.model or default_model()
    pipe = Pipeline.from_pretrained(model)
    results = {"model": model, "rounds": args.rounds, "sizes": []}
    for frames in args.frames:
        reqs = [pipe.request(prompt, frames=frames, seed=k, decode="smooth") for k, prompt in enumerate(PROMPTS)]
        pipe.prepare(reqs[0])  # decoder and encoder engines, built or loaded before any timing
        latents = [pipe.denoise(r, *pipe.encode(r)) for r in reqs]
        times: dict[str, list[float]] = {"plain": [], "smooth": []}
        scores: dict[str, list[dict]] = {"plain": [], "smooth": []}
        for round_ in range(args.rounds):
            for mode in ("plain", "smooth"):
                t0 = time.perf_counter()
                videos = [np.concatenate(list(pipe.iter_frames(z, decode=mode))) for z in latents]
                times[mode].append((time.perf_counter() - t0) / len(latents))
                if round_ == 0:
                    scores[mode] = [seams(v, pipe.config) for v in videos]
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {"frames": frames, "size": f"{reqs[0].height}x{reqs[0].width}", "videos": len(latents),
               "decode_seconds": med, "cost": med["smooth"] / med["plain"],
               "seams": {m: {k: float(np.mean([s[k] for s in v])) for k in ("boundary", "inside", "ratio")}
                         for m, v in scores.items()}}
        results["sizes"].append(row)
        print(f"{frames} frames at {row['size']}: decode {med['plain'] * 1e3:.0f} ms plain, "
              f"{med['smooth'] * 1e3:.0f} ms smooth ({row['cost']:.2f}x); seam ratio (boundary / inside change) "
              f"plain {row['seams']['plain']['ratio']:.2f}, smooth {row['seams']['smooth']['ratio']:.2f}")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
