"""Load on the job server: N jobs against 1 worker, 2 workers and 2 Ray Serve replicas.

    python benchmarks/serve_load.py [--jobs 16] [--steps 25] [--json results/serve-load-cpu.json]

Each configuration is a real `easyanimate-rt serve` process on 127.0.0.1 (the serving
tests' helper, tests/runtime/serving.py) with the shipped model on the same cores:
1 worker with every core, 2 workers or 2 Ray Serve replicas (threads split between
them). The engines are built once beforehand. After one warm-up job per worker,
``--jobs`` jobs (distinct prompts and seeds, the model's default size) are submitted
at once from threads; the job store's own times give, per job, the queue wait
(created -> started), the run (started -> finished) and the latency (created ->
finished). Reported: throughput (jobs per minute over the burst), p50/p95 latency and
queue wait, mean run time, server start-up. ``--rounds`` repeats the configurations
alternately (this VM's speed drifts) and pools the jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests" / "runtime"))

import common  # noqa: E402


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (1..99), linear between order statistics."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def burst(server, jobs: int, steps: int, tag: str) -> list[dict]:
    """Submit ``jobs`` jobs at once; return each finished job's record."""
    from serving import wait_for

    ids: list[str | None] = [None] * jobs
    barrier = threading.Barrier(jobs)

    def submit(k: int) -> None:
        with server.client() as c:
            barrier.wait()
            r = c.post("/v1/videos", json={"prompt": f"a red circle moving left {tag} {k}", "seed": k,
                                           "steps": steps})
            r.raise_for_status()
            ids[k] = r.json()["id"]

    threads = [threading.Thread(target=submit, args=(k,)) for k in range(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with server.client() as c:
        done = [wait_for(c, i, timeout=60 + 30 * jobs) for i in ids]
    failed = [j for j in done if j["status"] != "completed"]
    if failed:
        raise RuntimeError(f"{len(failed)} job(s) did not complete: {failed[0]['error']}")
    return done


def run_config(name: str, workers: int, args: list[str], opts, work: Path, round_: int) -> list[dict]:
    from serving import Server

    store = work / f"{name.replace(' ', '-')}-{round_}"
    t = time.perf_counter()
    server = Server(store, "--max-queue", str(opts.jobs + 8), "--cache-dir", str(work / "engines"), *args,
                    env={"RAY_USAGE_STATS_ENABLED": "0"})
    up = time.perf_counter() - t
    try:
        burst(server, workers, opts.steps, f"warm{round_}")
        done = burst(server, opts.jobs, opts.steps, f"r{round_}")
    finally:
        server.stop()
    print(f"[serve-load] {name} round {round_}: up in {up:.1f}s, {len(done)} jobs", file=sys.stderr, flush=True)
    return [dict(j, round=round_, startup=up) for j in done]


def summarise(jobs: list[dict]) -> dict:
    wait = [j["started_at"] - j["created_at"] for j in jobs]
    run = [j["finished_at"] - j["started_at"] for j in jobs]
    latency = [j["finished_at"] - j["created_at"] for j in jobs]
    rates = []
    for r in sorted({j["round"] for j in jobs}):
        mine = [j for j in jobs if j["round"] == r]
        span = max(j["finished_at"] for j in mine) - min(j["created_at"] for j in mine)
        rates.append(60 * len(mine) / span)
    return {"jobs": len(jobs), "throughput_per_min": statistics.median(rates),
            "latency_p50": percentile(latency, 50), "latency_p95": percentile(latency, 95),
            "wait_p50": percentile(wait, 50), "wait_p95": percentile(wait, 95),
            "run_mean": statistics.mean(run), "startup": statistics.median(j["startup"] for j in jobs),
            "step_mean": statistics.mean(j["timings"]["step_mean"] for j in jobs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=16)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="cores the workers share")
    p.add_argument("--no-ray", action="store_true", help="leave out the Ray Serve configuration")
    p.add_argument("--json", default=str(HERE / "results" / "serve-load-cpu.json"))
    opts = p.parse_args(argv)
    if opts.jobs < 2 or opts.steps < 1 or opts.rounds < 1:
        p.error("--jobs must be >= 2, --steps and --rounds >= 1")
    half = str(max(1, opts.threads // 2))
    configs = {"1 worker": (1, ["--workers", "1", "--threads", str(opts.threads)]),
               "2 workers": (2, ["--workers", "2", "--threads", half])}
    if not opts.no_ray:
        try:
            import ray.serve  # noqa: F401
            configs["2 Ray replicas"] = (2, ["--ray", "--replicas", "2", "--threads", half])
        except ImportError:
            print("[serve-load] ray[serve] not installed: Ray configuration left out", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="ea-serve-load-"))
    from easyanimate_rt.cli import default_model
    from easyanimate_rt.runtime.pipeline import Pipeline

    t = time.perf_counter()  # build the engines once, outside every server's start-up
    Pipeline.from_pretrained(default_model(), cache_dir=work / "engines")
    print(f"[serve-load] engines built in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    jobs: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(opts.rounds):
        for name, (workers, args) in configs.items():
            jobs[name] += run_config(name, workers, args, opts, work, r)
    results = {name: summarise(js) for name, js in jobs.items()}
    report = {"machine": common.machine(), "jobs": opts.jobs, "steps": opts.steps, "rounds": opts.rounds,
              "threads": opts.threads, "results": results}
    Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.json).write_text(json.dumps(report, indent=1))
    base = results["1 worker"]["throughput_per_min"]
    print("| configuration | throughput (jobs/min) | vs 1 worker | latency p50 / p95 (s) | queue wait p50 / p95 (s) "
          "| run per job (s) | step (ms) | server up (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, s in results.items():
        print(f"| {name} | {s['throughput_per_min']:.1f} | {s['throughput_per_min'] / base:.2f}x | "
              f"{s['latency_p50']:.1f} / {s['latency_p95']:.1f} | {s['wait_p50']:.1f} / {s['wait_p95']:.1f} | "
              f"{s['run_mean']:.2f} | {1000 * s['step_mean']:.0f} | {s['startup']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
