"""Peak host memory of exporting the release DiT to ONNX on CPU (random weights).

    OMP_NUM_THREADS=2 python benchmarks/export_memory.py --preset v2-512 --precision fp32
    python benchmarks/export_memory.py --estimate-only     # no export, just the arithmetic

Builds the DiT of a preset with random weights in float32, then runs the exporter's
stages one by one (trace = torch.export + ONNX translation + onnxscript optimiser,
lower = precision pass, write = external-data save + checker) and reports the peak
resident set size after each, sampled every 50 ms by a watchdog thread. The watchdog
aborts the run (exit 3) before the process takes more than ``--max-rss-gb`` (default:
90 % of the memory available at start), so a machine shared with other jobs is never
pushed into the OOM killer. Results are printed as a table and saved as JSON under
benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
import time
import types
from pathlib import Path

GB = 1024 ** 3


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class Watchdog(threading.Thread):
    """Samples RSS; records the peak per stage; aborts above ``limit`` bytes."""

    def __init__(self, limit: int, interval: float = 0.05):
        super().__init__(daemon=True)
        self.limit, self.interval = limit, interval
        self.stage, self.peaks = "start", {}
        self.peak = 0
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            rss = rss_bytes()
            self.peak = max(self.peak, rss)
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0), rss)
            if rss > self.limit:
                print(f"\nABORT: RSS {rss / GB:.1f} GiB passed the limit {self.limit / GB:.1f} GiB "
                      f"during '{self.stage}'", file=sys.stderr, flush=True)
                os._exit(3)
            time.sleep(self.interval)

    def enter(self, stage: str) -> None:
        self.stage = stage

    def stop(self) -> None:
        self._stop.set()


def parameter_bytes(preset: str) -> tuple[int, int]:
    import torch

    from easyanimate_rt.reference.config import from_preset
    from easyanimate_rt.reference.dit import VideoDiT

    with torch.device("meta"):
        dit = VideoDiT(from_preset(preset).dit)
    n = sum(p.numel() for p in dit.parameters())
    buffers = sum(b.numel() for b in dit.buffers())
    return n, 4 * (n + buffers)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="v2-512")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--out", type=Path, help="export directory (default: a temporary one, deleted)")
    ap.add_argument("--max-rss-gb", type=float, help="abort above this RSS (default 90%% of available)")
    ap.add_argument("--estimate-only", action="store_true")
    args = ap.parse_args(argv)

    n_params, fp32_bytes = parameter_bytes(args.preset)
    avail = available_bytes()
    print(f"{args.preset} DiT: {n_params / 1e9:.3f} B parameters, {fp32_bytes / GB:.2f} GiB in float32; "
          f"memory available now {avail / GB:.1f} GiB")
    if args.estimate_only:
        return 0
    limit = int(args.max_rss_gb * GB) if args.max_rss_gb else int(0.9 * avail)
    dog = Watchdog(limit)
    dog.start()
    import torch

    from easyanimate_rt.export.onnx import lower, trace, write_graph
    from easyanimate_rt.export.spec import dit_spec
    from easyanimate_rt.reference.config import from_preset
    from easyanimate_rt.reference.dit import VideoDiT

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    cfg = from_preset(args.preset)
    timings, marks = {}, {}
    out = args.out or Path(tempfile.mkdtemp(prefix="export-memory-"))

    def stage(name, fn, collect=False):
        """Run one export stage: its wall time, the watchdog's peak and the RSS after it."""
        dog.enter(name)
        t0 = time.perf_counter()
        result = fn()
        timings[name] = time.perf_counter() - t0
        if collect:
            gc.collect()
        marks[name] = rss_bytes()
        return result

    def build():
        torch.manual_seed(0)
        with torch.no_grad():
            dit = VideoDiT(cfg.dit).eval()
            for p in dit.parameters():  # random weights everywhere (no zero-initialised branches)
                if not p.any():
                    p.normal_(0, 0.02)
        return dit

    model = types.SimpleNamespace(dit=stage("build", build), config=cfg)
    spec = dit_spec(cfg, args.precision)
    ir_model = stage("trace", lambda: trace(model, spec), collect=True)
    stats = stage("lower", lambda: lower(ir_model, spec), collect=True)
    spec = stage("write", lambda: write_graph(ir_model, spec, out / "dit", stats=stats))
    dog.stop()
    peak = max(dog.peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    rows = [(name, timings[name], dog.peaks.get(name, 0), marks[name]) for name in timings]
    print(f"\n{'stage':8s} {'seconds':>8s} {'peak RSS GiB':>13s} {'RSS after GiB':>14s}")
    for stage, sec, pk, after in rows:
        print(f"{stage:8s} {sec:8.1f} {pk / GB:13.2f} {after / GB:14.2f}")
    g = spec.graph
    print(f"\npeak RSS {peak / GB:.2f} GiB = {peak / fp32_bytes:.2f} x the float32 parameters; "
          f"graph {g['nodes']} nodes, {g['bytes'] / GB:.2f} GiB on disk "
          f"({g['file']}{' + ' + g['external_data'] if g.get('external_data') else ''})")
    result = {
        "preset": args.preset, "precision": args.precision, "parameters": n_params,
        "fp32_parameter_bytes": fp32_bytes, "peak_rss_bytes": peak,
        "stages": [{"stage": s, "seconds": sec, "peak_rss_bytes": pk, "rss_after_bytes": a} for s, sec, pk, a in rows],
        "graph": {k: g[k] for k in ("nodes", "bytes", "external_data")},
        "torch": torch.__version__, "python": platform.python_version(), "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    path = results / f"export_memory-{args.preset}-{args.precision}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {path}")
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
