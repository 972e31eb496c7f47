"""Step caching on the shipped model: speed against quality, per policy and threshold.

    python benchmarks/step_cache.py [--model DIR] [--prompts 48] [--json results/step-cache-cpu.json]

At the model's default size and sampler (the shipped model: 64x64x17, 25 DPM++ steps),
ONNX Runtime engines, for caching off and each (policy, threshold):
- the denoising loop and the whole in-process generate (text, loop, decode) of one
  prompt as speedups over caching off: ``--repeat`` rounds over every setting, each
  cached run right after an uncached one, the median of the per-round ratios;
- PSNR of the video against the uncached video of the same prompt and seed (mean and
  worst over ``--psnr-prompts`` prompts);
- the shapes evaluation (colour, direction, coherent) on ``--prompts`` held-out prompts;
- computed / skipped / checked steps.
Then the drift guard: an aggressive threshold with the guard (tight bound, frequent
checks) against the same threshold without it. A plot of speedup against PSNR and
colour is written beside the JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

SWEEP = {"fbcache": [0.1, 0.2, 0.3, 0.5], "teacache": [0.2, 0.4, 0.8, 1.2]}
PROMPT = "a red circle moving left on a white background"


GUARDS = {"guarded": dict(check_every=2, drift_bound=0.05),
          "unguarded": dict(check_every=10**6, max_skips=10**6, drift_bound=1e9)}


def timed(pipe, req) -> tuple[float, float, dict]:
    """(loop seconds, in-process generate seconds, timings) of one run."""
    t0 = time.perf_counter()
    video = pipe.run(req)
    return video.timings["denoise"], time.perf_counter() - t0, video.timings


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=48, help="held-out prompts of the shapes evaluation")
    p.add_argument("--psnr-prompts", type=int, default=8)
    p.add_argument("--repeat", type=int, default=9, help="timing rounds (each: every setting after an uncached run)")
    p.add_argument("--quick", action="store_true", help="2 thresholds per policy, 8 prompts, 2 repeats")
    p.add_argument("--json", default=str(Path(__file__).parent / "results" / "step-cache-cpu.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.psnr_prompts, args.repeat = 8, 3, 3

    import numpy as np

    from easyanimate_rt.cli import default_model
    from easyanimate_rt.runtime.pipeline import Pipeline
    from easyanimate_rt.runtime.step_cache import CacheSettings, load_rescale
    from easyanimate_rt.shapes.evaluate import evaluate, heldout_specs
    from easyanimate_rt.shapes.metrics import psnr

    model = args.model or default_model()
    plain = Pipeline.from_pretrained(model)
    split = Pipeline.from_pretrained(model, cache=CacheSettings("fbcache", 0.0))
    rescale = load_rescale(model)
    cfg = plain.config.sampling
    psnr_prompts = [s.caption for s in heldout_specs(args.psnr_prompts, cfg.frames, cfg.height, seed=77)]
    reference = {k: plain(pr, seed=k).frames for k, pr in enumerate(psnr_prompts)}

    def quality(pipe) -> dict:
        values = [psnr(pipe(pr, seed=k).frames, reference[k]) for k, pr in enumerate(psnr_prompts)]
        row = {"psnr_mean": float(np.mean(values)), "psnr_min": float(np.min(values))}
        ev = evaluate(pipe, prompts=args.prompts, vae_clips=0)
        row.update(colour=ev.colour_rate, direction=ev.direction_rate, coherent=ev.coherent_rate)
        return row

    def settings_of(row: dict) -> CacheSettings:
        kw = GUARDS[row["guard"]] if "guard" in row else {}
        return CacheSettings(row["policy"], row["threshold"],
                             rescale=rescale if row["policy"] == "teacache" else None, **kw)

    sweep = {k: (v[1::3] if args.quick else v) for k, v in SWEEP.items()}
    results = {"model": model, "request": f"{cfg.height}x{cfg.width}x{cfg.frames}, {cfg.steps} steps {cfg.sampler}",
               "teacache_rescale": rescale, "settings": []}
    t_all = time.perf_counter()
    off = dict(policy="none", threshold=None, **quality(plain))
    results["settings"].append(off)
    print(f"off: colour {off['colour']:.3f}", flush=True)
    rows = [dict(policy=policy, threshold=thr) for policy, thresholds in sweep.items() for thr in thresholds]
    # the drift guard: the most aggressive fbcache threshold, with and without the guard
    aggressive = 4 * max(SWEEP["fbcache"])
    guard = {name: dict(policy="fbcache", threshold=aggressive, guard=name) for name in GUARDS}
    for row in rows + list(guard.values()):
        split.step_cache = settings_of(row)
        row.update(quality(split))
        print(f"{row['policy']} {row['threshold']}{' ' + row['guard'] if 'guard' in row else ''}: PSNR "
              f"{row['psnr_mean']:.1f} (min {row['psnr_min']:.1f}) dB, colour {row['colour']:.3f} direction "
              f"{row['direction']:.3f} coherent {row['coherent']:.3f}", flush=True)
    results["settings"] += rows

    # Speed, last and round-robin: this VM's speed drifts by tens of percent within minutes,
    # so each cached run is timed right after an uncached one, every setting in every round,
    # and a setting's speedup is the median of its per-round ratios.
    req = plain.request(PROMPT, seed=0)
    plain.run(req)
    for row in rows + list(guard.values()):
        split.step_cache = settings_of(row)
        split.run(req)  # warm-up
        row.update(loop_ratios=[], generate_ratios=[], loop_s=[], baseline_loop_s=[])
    for _ in range(args.repeat):
        for row in rows + list(guard.values()):
            base = timed(plain, req)
            split.step_cache = settings_of(row)
            got = timed(split, req)
            row["loop_ratios"].append(base[0] / got[0])
            row["generate_ratios"].append(base[1] / got[1])
            row["loop_s"].append(got[0])
            row["baseline_loop_s"].append(base[0])
            row["step_cache"] = got[2].get("step_cache")
    for row in rows + list(guard.values()):
        row.update(loop_speedup=statistics.median(row["loop_ratios"]),
                   generate_speedup=statistics.median(row["generate_ratios"]),
                   loop_s=statistics.median(row["loop_s"]), baseline_loop_s=statistics.median(row["baseline_loop_s"]))
        sc = row["step_cache"]
        print(f"{row['policy']} {row['threshold']}{' ' + row['guard'] if 'guard' in row else ''}: loop "
              f"{row['loop_speedup']:.2f}x (per-round {min(row['loop_ratios']):.2f}-{max(row['loop_ratios']):.2f}), "
              f"generate {row['generate_speedup']:.2f}x; {sc['decisions']}"
              + (f", fired {len(sc['fired'])}x" if "guard" in row else ""), flush=True)
    results["drift_guard"] = guard
    results["seconds"] = time.perf_counter() - t_all

    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"wrote {out} ({results['seconds']:.0f} s)")
    return 0


def plot(results: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    off = results["settings"][0]
    for policy, marker in (("fbcache", "o"), ("teacache", "s")):
        rows = [r for r in results["settings"] if r["policy"] == policy]
        x = [r["loop_speedup"] for r in rows]
        axes[0].plot(x, [r["psnr_mean"] for r in rows], marker=marker, label=policy)
        axes[1].plot(x, [100 * r["colour"] for r in rows], marker=marker, label=policy)
        for r in rows:
            axes[0].annotate(f"{r['threshold']:g}", (r["loop_speedup"], r["psnr_mean"]), fontsize=7)
    axes[0].axhline(30, color="grey", ls=":", label="30 dB")
    axes[1].axhline(100 * off["colour"] - 2, color="grey", ls=":", label="uncached - 2 points")
    axes[0].set(xlabel="denoising loop speedup", ylabel="PSNR vs uncached (dB)", title="fidelity")
    axes[1].set(xlabel="denoising loop speedup", ylabel="colour adherence (%)", title="held-out prompts")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
