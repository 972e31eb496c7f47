"""The runtime against the reference, side by side in one run (issue 13's targets).

    python benchmarks/runtime.py [--model DIR] [--repeat 5] [--json results/runtime-cpu.json]

With the shipped model at its default size (engines built first into a fresh cache,
which is the first-run figure):

- first run: ``easyanimate-rt generate`` from process start to file on an empty engine
  cache (export + build + generate);
- process start to written file with cached engines, median of ``--repeat``, against
  ``--backend reference`` (the PyTorch reference pipeline) on the same command;
- in-process end to end (text, denoise, decode; no start-up), runtime vs reference;
- one DiT call (batch 2): ONNX Runtime engine vs torch eager, each alone in its own process
  (3 alternating processes each, median of 50 calls per process);
- the VAE decode of the whole video (every slice): decoder engines vs SliceVAE;
- runtime overhead: the denoising loop's time outside the DiT engine, as a share of it;
- decode memory: RSS growth while decoding a 144-frame video of the ``tiny`` preset
  against a 16-frame one (separate processes, cached engines).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

PROMPT = "a red circle moving left on a white background"


def wall(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def median_time(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


DIT_PROBE = textwrap.dedent("""
    import statistics, sys, time
    import numpy as np
    from easyanimate_rt.runtime.pipeline import Pipeline

    which, model = sys.argv[1], sys.argv[2]
    pipe = Pipeline.from_pretrained(model, compile=False)
    req = pipe.request("a red circle moving left")
    emb, mask = pipe.encode(req)
    shape = req.latent_shape(pipe.config)
    feeds = {"latents": np.random.default_rng(0).standard_normal((2, *shape[1:]), dtype=np.float32),
             "timestep": np.array([500.0, 500.0], np.float32), "text": emb, "text_mask": mask}
    dit = pipe.engine("dit")
    if which == "ort":
        run = lambda: dit.run(feeds)
    else:
        import torch
        from easyanimate_rt.export.graphs import run_torch
        from easyanimate_rt.reference.weights import load_model
        torch.set_grad_enabled(False)
        reference = load_model(model)
        run = lambda: run_torch(reference, dit.spec, feeds)
    for _ in range(5):
        run()
    times = []
    for _ in range(50):
        t0 = time.perf_counter(); run(); times.append(time.perf_counter() - t0)
    print(1e3 * statistics.median(times))
""")

DECODE_PROBE = textwrap.dedent("""
    import json, sys, threading, time
    import numpy as np
    from easyanimate_rt.engines.buckets import Bucket
    from easyanimate_rt.runtime.pipeline import Pipeline

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096

    frames = int(sys.argv[1])
    pipe = Pipeline.from_pretrained("tiny", buckets=[Bucket(64, 64, frames)], compile=False, threads=2)
    req = pipe.request("a red circle", steps=1, frames=frames, height=64, width=64)
    emb, mask = pipe.encode(req)
    latents = pipe.denoise(req, emb, mask)
    from easyanimate_rt.media import VideoWriter
    base, peak, done = rss(), [0], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss()); time.sleep(0.002)
    t = threading.Thread(target=sample); t.start()
    with VideoWriter(sys.argv[2], 8) as w:
        for chunk in pipe.iter_frames(latents):
            w.write(chunk)
    done.set(); t.join()
    print(json.dumps({"frames": frames, "base": base, "peak": max(peak[0], rss())}))
""")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model directory (default: the shipped model)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)

    from easyanimate_rt.cli import default_model

    model = args.model or default_model()
    tmp = Path(tempfile.mkdtemp(prefix="ea-bench-"))
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp / "xdg")}
    out = tmp / "v.mp4"
    cli = [sys.executable, "-m", "easyanimate_rt", "generate", PROMPT, "--model", model, "--out", str(out), "-q"]
    results: dict = {"model": model, "machine": f"{os.cpu_count()} CPU cores"}

    # 1. first run (empty cache), then cached process start to file, vs the reference
    results["first_run_s"] = wall(cli, env)
    runtime_proc = [wall(cli, env) for _ in range(args.repeat)]
    reference_proc = [wall(cli + ["--backend", "reference"], env) for _ in range(args.repeat)]
    results["process_runtime_s"] = statistics.median(runtime_proc)
    results["process_reference_s"] = statistics.median(reference_proc)

    # 2. in process
    os.environ["XDG_CACHE_HOME"] = env["XDG_CACHE_HOME"]
    import torch

    from easyanimate_rt.reference.pipeline import ReferencePipeline
    from easyanimate_rt.runtime.pipeline import Pipeline

    threads = torch.get_num_threads()
    pipe = Pipeline.from_pretrained(model, compile=False)
    ref = ReferencePipeline.from_pretrained(model)
    req = pipe.request(PROMPT)
    results["request"] = f"{req.height}x{req.width}x{req.frames}, {req.steps} steps {req.sampler}"
    results["end_to_end_runtime_s"] = median_time(lambda: pipe.run(req), args.repeat)
    results["end_to_end_reference_s"] = median_time(lambda: ref.run(req), args.repeat)

    emb, mask = pipe.encode(req)
    dit = pipe.engine("dit")
    # Each backend alone in its own process (spinning ORT threads and torch's OpenMP
    # threads slow each other down when they share a process), alternating ORT, torch,
    # ORT, torch..., as this VM's speed drifts by ~30% over minutes.
    dit_ms: dict[str, list[float]] = {"ort": [], "torch": []}
    for _ in range(3):
        for which in ("ort", "torch"):
            line = subprocess.run([sys.executable, "-c", DIT_PROBE, which, model], check=True, env=env,
                                  capture_output=True, text=True).stdout.strip().splitlines()[-1]
            dit_ms[which].append(float(line))
    results["dit_ort_ms"] = statistics.median(dit_ms["ort"])
    results["dit_torch_ms"] = statistics.median(dit_ms["torch"])
    results["dit_runs_ms"] = dit_ms

    latents = pipe.denoise(req, emb, mask)
    results["decode_ort_ms"] = 1e3 * median_time(lambda: list(pipe.iter_frames(latents)), args.repeat)
    z = torch.from_numpy(latents)
    results["decode_reference_ms"] = 1e3 * median_time(lambda: list(ref.iter_frames(z)), args.repeat)

    inside = [0.0]
    run = dit.run

    def timed(f):
        t0 = time.perf_counter()
        try:
            return run(f)
        finally:
            inside[0] += time.perf_counter() - t0

    dit.run = timed
    t0 = time.perf_counter()
    pipe.denoise(req, emb, mask)
    loop = time.perf_counter() - t0
    dit.run = run
    results["overhead_share"] = (loop - inside[0]) / loop
    results["denoise_s"] = loop

    # 3. decode memory: 16 vs 144 frames of the tiny preset (engines built first)
    from easyanimate_rt.engines.buckets import Bucket

    Pipeline.from_pretrained("tiny", buckets=[Bucket(64, 64, 16), Bucket(64, 64, 144)], threads=2)
    mem = {}
    for frames in (16, 144):
        line = subprocess.run([sys.executable, "-c", DECODE_PROBE, str(frames), str(tmp / f"m{frames}.mp4")],
                              check=True, env=env, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        probe = json.loads(line)
        mem[frames] = probe["peak"] - probe["base"]
    results["decode_rss_growth_16_mb"] = mem[16] / 2**20
    results["decode_rss_growth_144_mb"] = mem[144] / 2**20
    results["torch_threads"] = threads

    r = results
    rows = [
        ("first run, process start to file (export + build + generate)", f"{r['first_run_s']:.1f} s", "<= 60 s"),
        ("process start to file, cached engines (median)", f"{r['process_runtime_s']:.2f} s", "<= 2.0 s"),
        ("  same command, --backend reference", f"{r['process_reference_s']:.2f} s",
         f"{r['process_reference_s'] / r['process_runtime_s']:.1f}x slower"),
        ("end to end in process: runtime / reference", f"{r['end_to_end_runtime_s']:.3f} / "
         f"{r['end_to_end_reference_s']:.3f} s", f"{r['end_to_end_reference_s'] / r['end_to_end_runtime_s']:.1f}x "
         f"(>= 2x)"),
        ("DiT call (batch 2): ORT / torch eager", f"{r['dit_ort_ms']:.1f} / {r['dit_torch_ms']:.1f} ms",
         f"{r['dit_torch_ms'] / r['dit_ort_ms']:.1f}x (>= 2x)"),
        ("VAE decode, all slices: ORT / SliceVAE", f"{r['decode_ort_ms']:.1f} / {r['decode_reference_ms']:.1f} ms",
         f"{r['decode_reference_ms'] / r['decode_ort_ms']:.1f}x (>= 4x)"),
        ("runtime overhead (loop outside the DiT engine)", f"{100 * r['overhead_share']:.2f}%", "<= 3%"),
        ("decode RSS growth, tiny 144 / 16 frames", f"{r['decode_rss_growth_144_mb']:.1f} / "
         f"{r['decode_rss_growth_16_mb']:.1f} MB", "<= 1.25x"),
    ]
    print(f"model {model}, {r['request']}, {r['machine']}")
    for name, value, target in rows:
        print(f"{name:62s} {value:>22s}  {target}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
