"""What every benchmark shares: the machine's description, timing statistics, the fixed
result columns (JSON and CSV) and the measured matmul peak.

A result row always has the columns of ``COLUMNS``, in that order, so runs on different
machines and commits line up in one table.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

REPO = Path(__file__).resolve().parents[1]

COLUMNS = ("section", "name", "backend", "precision", "shape", "median_ms", "spread_ms", "runs", "flops",
           "flops_per_s", "peak_fraction", "peak_memory_mb", "threads", "machine", "cpu", "gpu", "versions",
           "commit", "note")


@dataclass
class Stats:
    """Seconds of repeated runs after warm-up: median and interquartile spread."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        if len(self.times) < 4:
            return max(self.times) - min(self.times)
        q = statistics.quantiles(self.times, n=4)
        return q[2] - q[0]


def measure(fn: Callable[[], Any], repeat: int = 10, warmup: int = 2, sync: Callable[[], None] | None = None,
            min_seconds: float = 0.0) -> Stats:
    """Time ``fn`` ``repeat`` times (and for at least ``min_seconds`` in all) after
    ``warmup`` calls; ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock
    read, so device work is inside the measurement."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeat or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return Stats(times)


def cpu_name() -> str:
    from easyanimate_rt.engines.manifest import cpu_name as name  # what engine manifests record

    return name()


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    except ImportError:
        return ""


@functools.cache
def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions() -> str:
    """Library versions that change the numbers, as one cell."""
    from importlib import metadata

    found = []
    for name in ("torch", "onnxruntime", "onnx", "numpy", "diffusers", "tensorrt", "tensorrt-rtx"):
        try:
            found.append(f"{name}={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return " ".join(found)


def machine() -> dict[str, Any]:
    return {"machine": f"{platform.node()} ({os.cpu_count()} cores)", "cpu": cpu_name(), "gpu": gpu_name(),
            "versions": versions(), "commit": commit()}


def row(section: str, name: str, *, backend: str = "", precision: str = "", shape: str = "",
        stats: Stats | None = None, flops: float | None = None, peak: float | None = None,
        peak_memory_mb: float | None = None, threads: int | None = None, note: str = "",
        info: dict[str, Any] | None = None) -> dict[str, Any]:
    """One result row with every column of ``COLUMNS``; FLOP/s and the fraction of
    ``peak`` (FLOP/s) follow from ``flops`` (per call) and the median."""
    r: dict[str, Any] = dict.fromkeys(COLUMNS, "")
    r.update(info or machine())
    r.update(section=section, name=name, backend=backend, precision=precision, shape=shape, note=note,
             threads=threads if threads is not None else "")
    if stats is not None:
        r.update(median_ms=round(stats.median * 1e3, 4), spread_ms=round(stats.spread * 1e3, 4), runs=len(stats.times))
        if flops:
            r["flops"] = float(flops)
            r["flops_per_s"] = float(flops) / stats.median
            if peak:
                r["peak_fraction"] = round(r["flops_per_s"] / peak, 4)
    elif flops:
        r["flops"] = float(flops)
    if peak_memory_mb is not None:
        r["peak_memory_mb"] = round(peak_memory_mb, 2)
    return r


def write_rows(rows: Iterable[dict[str, Any]], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """``out_dir``/``stem``.json and .csv, columns in ``COLUMNS`` order."""
    rows = [{c: r.get(c, "") for c in COLUMNS} for r in rows]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, cs = out_dir / f"{stem}.json", out_dir / f"{stem}.csv"
    js.write_text(json.dumps(rows, indent=1) + "\n")
    with cs.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return js, cs


def _ort_matmul(n: int):
    """A one-node ONNX MatMul session (ONNX Runtime's MLAS GEMM) on n x n float32."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    io = [helper.make_tensor_value_info(x, TensorProto.FLOAT, [n, n]) for x in "ABC"]
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "mm", io[:2], io[2:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1)
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feeds = {x: np.random.default_rng(0).random((n, n), dtype=np.float32) for x in "AB"}
    return functools.partial(sess.run, None, feeds)


def matmul_peak(dtype: str = "fp32", device: str = "cpu", sizes: Iterable[int] | None = None,
                repeat: int = 5) -> tuple[float, dict[str, float]]:
    """The machine's measured matmul rate (FLOP/s): the best over square sizes of each
    GEMM library at hand. On the CPU: torch.mm (MKL, which runs below its best on AMD
    CPUs), numpy (OpenBLAS) and ONNX Runtime's MatMul (MLAS), fp32; on a GPU: torch.mm
    in ``dtype``, fp8 through ``torch._scaled_mm``. Each rate from the median time, as
    every other figure of the suite is. Returns (best, {"library n": rate})."""
    import numpy as np
    import torch

    sizes = list(sizes or ((2048, 3072, 4096) if device == "cpu" else (4096, 8192)))
    sync = torch.cuda.synchronize if device != "cpu" else None
    rates = {}
    for n in sizes:
        fns = {}
        if device == "cpu":
            if dtype != "fp32":
                raise ValueError(f"the CPU peak is measured in fp32, not {dtype}")
            a, b = (torch.randn(n, n) for _ in range(2))
            fns["torch"] = functools.partial(torch.mm, a, b)
            an, bn = a.numpy(), b.numpy()
            fns["numpy"] = functools.partial(np.matmul, an, bn)
            try:
                fns["onnxruntime"] = _ort_matmul(n)
            except ImportError:
                pass
        elif dtype == "fp8":
            a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
            b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
            one = torch.ones((), device=device)
            fns["torch"] = functools.partial(torch._scaled_mm, a, b, scale_a=one, scale_b=one,
                                             out_dtype=torch.bfloat16)
        else:
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
            a, b = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))
            fns["torch"] = functools.partial(torch.mm, a, b)
        for name, fn in fns.items():
            stats = measure(fn, repeat=repeat, warmup=2, sync=sync)
            rates[f"{name} {n}"] = 2.0 * n ** 3 / stats.median
    return max(rates.values()), rates


def pin_threads(threads: int) -> None:
    """Pin torch's and OpenMP's thread pools (call before the first torch op)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
