"""Two revisions of the project side by side in one run: the README's first command
(``generate`` with the shipped model, engines cached: process start to written file)
and the frames it writes; in process, end to end runtime vs reference and one DiT call
ONNX Runtime vs torch eager. Rounds alternate so the machine's drift hits both alike.

    python benchmarks/revisions.py --before REV [--after WORKTREE] [--rounds 7] [--json out.json]

``--before`` is checked out into a temporary git worktree; ``--after`` (default: this
tree) is run as it is. Both run from their own ``src`` (PYTHONPATH) with this
environment's libraries and each with its own engine cache, warmed once before timing.
Reports the first use of each (export, build, generate), the median seconds of the
cached runs, their ratio, the spread (max/min over rounds, the machine's noise) and
whether the two videos' frames are identical.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle moving left on a white background"


def run(tree: Path, cache: Path, out: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "XDG_CACHE_HOME": str(cache)}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "easyanimate_rt", "generate", PROMPT, "--out", str(out), "-q"],
                   env=env, check=True, cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


INPROCESS = """
import json, statistics, sys, time
import torch
from easyanimate_rt.cli import default_model
from easyanimate_rt.export.graphs import run_torch
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.runtime.pipeline import Pipeline

torch.set_num_threads(2)
model = default_model()
pipe, ref = Pipeline.from_pretrained(model), ReferencePipeline.from_pretrained(model)
req = pipe.request(sys.argv[1])


def median(fn, n):
    fn()
    times = []
    for _ in range(n):
        t = time.perf_counter(); fn(); times.append(time.perf_counter() - t)
    return statistics.median(times)


dit = pipe.engine("dit")
feeds = dit.spec.random_inputs(dit.spec.opt_dims(dit.profiles()[0]), seed=0)
out = {"runtime_s": median(lambda: pipe.run(req), 3), "reference_s": median(lambda: ref.run(req), 3),
       "dit_ort_ms": 1e3 * median(lambda: dit.run(feeds), 30),
       "dit_torch_ms": 1e3 * median(lambda: run_torch(ref.model, dit.spec, feeds), 30)}
print(json.dumps(out))
"""


def inprocess(tree: Path, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree / "src"), "XDG_CACHE_HOME": str(cache)}
    done = subprocess.run([sys.executable, "-c", INPROCESS, PROMPT], env=env, check=True, cwd=tree,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="git revision to compare against")
    p.add_argument("--after", type=Path, default=ROOT, help="work tree of the newer revision (default: this one)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--inprocess-rounds", type=int, default=2, help="rounds of the in-process measures")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="revisions-") as tmp:
        tmp = Path(tmp)
        before = tmp / "before"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(before), args.before],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            trees = {"before": before, "after": args.after.resolve()}
            times: dict[str, list[float]] = {name: [] for name in trees}
            first = {name: run(tree, tmp / f"cache-{name}", tmp / f"{name}.mp4")  # first use: export and build
                     for name, tree in trees.items()}
            for r in range(args.rounds):
                order = list(trees) if r % 2 == 0 else list(trees)[::-1]
                for name in order:
                    times[name].append(run(trees[name], tmp / f"cache-{name}", tmp / f"{name}.mp4"))
            measured: dict[str, list[dict]] = {name: [] for name in trees}
            for r in range(args.inprocess_rounds):
                for name in (list(trees) if r % 2 == 0 else list(trees)[::-1]):
                    measured[name].append(inprocess(trees[name], tmp / f"cache-{name}"))
            sys.path.insert(0, str(ROOT / "src"))
            from easyanimate_rt.media import read_video

            a, b = (read_video(tmp / f"{n}.mp4")[0] for n in trees)
            same = a.shape == b.shape and bool((a == b).all())
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    med = {n: statistics.median(t) for n, t in times.items()}
    result = {"before": args.before, "rounds": args.rounds, "first_use": first, "seconds": times, "median": med,
              "after_over_before": med["after"] / med["before"],
              "spread": {n: max(t) / min(t) for n, t in times.items()}, "frames_identical": same}
    for name, rows in measured.items():
        row = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        row["end_to_end_speedup"] = row["reference_s"] / row["runtime_s"]
        row["dit_speedup"] = row["dit_torch_ms"] / row["dit_ort_ms"]
        result[f"inprocess_{name}"] = row
        print(f"{name}: in process runtime {row['runtime_s']:.3f} s vs reference {row['reference_s']:.3f} s = "
              f"{row['end_to_end_speedup']:.2f}x; one DiT call ORT {row['dit_ort_ms']:.2f} ms vs torch eager "
              f"{row['dit_torch_ms']:.2f} ms = {row['dit_speedup']:.2f}x")
    print(f"README generate, engines cached ({args.rounds} alternating rounds): before {med['before']:.2f} s, "
          f"after {med['after']:.2f} s, after/before {result['after_over_before']:.3f} "
          f"(spread before {result['spread']['before']:.2f}x, after {result['spread']['after']:.2f}x); "
          f"frames identical: {same}; first use (export + build + generate) before {first['before']:.1f} s, "
          f"after {first['after']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
