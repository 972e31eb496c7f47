"""Quality of a shapes-world model on held-out attribute combinations.

    python benchmarks/eval_shapes.py [--model DIR] [--prompts 48] [--backend reference|runtime] [--json out.json]

Prints VAE reconstruction PSNR on held-out clips (and how many keep their colour) and,
over >= 48 held-out prompts with fixed seeds, the share of videos whose dominant colour
matches the prompt, whose centroid moves in the prompted direction, and whose object
stays one coherent blob.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from tqdm import tqdm

from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.shapes.evaluate import evaluate
from easyanimate_rt.cli import default_model

TARGETS = {"vae_psnr": 28.0, "colour_rate": 0.80, "direction_rate": 0.70, "coherent_rate": 0.80}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--vae-clips", type=int, default=32)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="reference", choices=["reference", "runtime"],
                   help="the PyTorch reference pipeline, or the runtime on its default backend (engines built "
                        "on first use; the VAE figures come from the reference VAE either way)")
    p.add_argument("--json", help="write the full report here")
    args = p.parse_args(argv)
    model = args.model or default_model()
    pipe = ReferencePipeline.from_pretrained(model, device=args.device)
    reconstruct = None
    if args.backend == "runtime":
        from easyanimate_rt.runtime.pipeline import Pipeline
        from easyanimate_rt.shapes.evaluate import reference_reconstruct

        reconstruct = reference_reconstruct(pipe)
        pipe = Pipeline.from_pretrained(model)
    bar = tqdm(total=args.prompts, desc="generating", unit="video")
    t0 = time.perf_counter()
    report = evaluate(pipe, args.prompts, args.vae_clips, args.steps, args.guidance_scale,
                      progress=lambda i, n: bar.update(1), reconstruct=reconstruct)
    bar.close()
    summary = report.summary()
    summary.update(model=str(model), device=args.device, backend=args.backend, threads=torch.get_num_threads(),
                   wall_seconds=time.perf_counter() - t0)
    print(f"{'metric':18s} {'value':>8s} {'target':>8s}")
    ok = True
    for k, target in TARGETS.items():
        v = summary[k]
        if v is None:  # not measured (--vae-clips 0)
            print(f"{k:18s} {'-':>8s} {target:8.3f} not measured")
            continue
        good = v >= target
        ok &= good
        print(f"{k:18s} {v:8.3f} {target:8.3f} {'ok' if good else 'BELOW'}")
    if summary["vae_colour_rate"] is not None:
        print(f"{'vae_colour_rate':18s} {summary['vae_colour_rate']:8.3f} {'':8s} (reconstructions "
              "keeping the clip's colour: the ceiling of colour_rate)")
    print(f"prompts={report.prompts} (direction on {report.direction_prompts}); "
          f"{report.seconds_per_video:.2f} s/video on {args.device} ({torch.get_num_threads()} threads)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "rows": report.rows}, f, indent=1,
                      default=lambda o: o.item() if hasattr(o, "item") else str(o))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
