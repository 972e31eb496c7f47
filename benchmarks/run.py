"""The benchmark suite: every backend side by side in one run, a FLOP model, the measured
matmul peak, scaling tables and plots, then benchmarks/RESULTS.md regenerated.

    python benchmarks/run.py --suite cpu|gpu|all [--model shapes|tiny|PRESET|DIR] [--out DIR] [--quick]

CPU suite (threads pinned, ``--threads``, default every core):
  peak       fp32 matmul rate of this machine (best square GEMM of torch, numpy, ONNX Runtime)
  dit        one DiT call (batch 2, the model's default size) on torch eager, torch.compile,
             ONNX Runtime with basic / all optimisations / the transformer fusions, and the
             runtime's own engine
  bound      the same on the compute-bound configuration (release width, Grid Reshape,
             2 blocks, 256x256x16 pixels, random weights)
  peer       diffusers' PixArt transformer at the same configuration, 1 frame, eager,
             against our DiT step at 1 frame on each backend
  scaling    DiT step vs token count; VAE decode time and peak memory vs frames (9 to 289)
  runtime    end to end, process start to file, runtime overhead (benchmarks/runtime.py)
Each probe runs in its own process (benchmarks/probe.py), ``--rounds`` times alternating
backends (this VM's speed drifts over minutes), every run's times pooled: median and
interquartile spread. Every row reports FLOPs (benchmarks/flops.py), FLOP/s and the
fraction of the matmul peak (DiT probes: the peak each probe measured in its own
process just before its timing, as the machine's speed drifts; other rows: the
``peak`` section's).

GPU suite (needs a CUDA device): bf16/fp16/fp8 matmul peaks, the torch backend's loop
eager vs CUDA graphs vs torch.compile (benchmarks/gpu_runtime.py) with TFLOP/s, VAE
slice decode at 384x672 and 512x512.

Results: ``--out``/suite-<suite>.json and .csv (columns: common.COLUMNS), PNG plots
beside them, and the generated section of benchmarks/RESULTS.md (``--no-report`` keeps
it as it is). ``--quick``: one round, fewer repeats and sizes (minutes, not tens of them).
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
import flops  # noqa: E402

PROBE = str(HERE / "probe.py")
CPU_SECTIONS = ("peak", "dit", "bound", "peer", "scaling", "runtime")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def probe(kind: str, *args: str, threads: int, env: dict | None = None, timeout: float = 1800) -> dict:
    cmd = [sys.executable, PROBE, kind, "--threads", str(threads), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Suite:
    def __init__(self, args):
        self.args = args
        self.threads = args.threads
        self.rows: list[dict] = []
        self.info = common.machine()
        self.peak: float | None = None
        self.work = Path(args.work or tempfile.mkdtemp(prefix="ea-bench-"))
        self.extras: dict = {}

    def add(self, section: str, name: str, peak: float | None = None, **kw) -> dict:
        r = common.row(section, name, peak=peak or self.peak, threads=self.threads, info=self.info, **kw)
        self.rows.append(r)
        shown = f"{r['median_ms']} ms" if r["median_ms"] != "" else r["note"]
        frac = f", {100 * r['peak_fraction']:.1f}% of peak" if r["peak_fraction"] != "" else ""
        log(f"{section:8s} {name:42s} {r['backend']:14s} {shown}{frac}")
        return r

    # --- the DiT -----------------------------------------------------------------------------

    def dit_graphs(self, model: str) -> dict[str, str]:
        """The DiT's ONNX graph, plain and with the transformer fusions, exported once
        into the work directory."""
        from easyanimate_rt.engines.onnxruntime import try_fusions
        from easyanimate_rt.export.onnx import export_graph
        from easyanimate_rt.export.spec import dit_spec
        from probe import dit_holder

        out = self.work / "graphs" / Path(model).name
        plain, fused = out / "dit" / "model.onnx", out / "dit-fused.onnx"
        if not plain.exists():
            log(f"exporting the {model} DiT to {out}")
            holder = dit_holder(model)
            export_graph(holder, dit_spec(holder.config), out)
        if not fused.exists():
            from probe import model_config

            d = model_config(model).dit
            if try_fusions(plain, fused, d.num_attention_heads, d.hidden_size) is None:
                log(f"{model}: the transformer fusions do not apply")
        return {"ort": str(plain), "ort-basic": str(plain), "ort-fused": str(fused) if fused.exists() else ""}

    def dit_case(self, section: str, model: str, backends: list[str], batch: int, frames: int, height: int,
                 width: int, repeat: int, label: str = "") -> dict[str, common.Stats]:
        from probe import model_config

        config = model_config(model)
        graphs = self.dit_graphs(model) if any(b.startswith("ort") for b in backends) else {}
        fl = flops.dit_flops(config.dit, batch=batch, frames=frames, height=height, width=width,
                             text_len=config.text_encoder.max_length)
        shape = f"{batch}x{frames}x{height}x{width} ({flops.dit_tokens(config.dit, frames, height, width)} tok)"
        times: dict[str, list[float]] = {b: [] for b in backends}
        peaks: dict[str, list[float]] = {b: [] for b in backends}
        firsts: dict[str, float] = {}
        for _ in range(self.args.rounds):
            for b in backends:
                if b.startswith("ort") and not graphs.get(b):
                    continue
                extra = ["--onnx", graphs[b]] if b in graphs else []
                res = probe("dit", "--model", model, "--backend", b, "--batch", str(batch), "--frames", str(frames),
                            "--height", str(height), "--width", str(width), "--repeat", str(repeat),
                            "--min-seconds", "1", *extra, threads=self.threads)
                times[b] += res["times"]
                peaks[b].append(res["peak"])
                firsts[b] = res["first_call_s"]
        stats = {}
        for b, t in times.items():
            if not t:
                self.add(section, label or f"{model} DiT step", backend=b, shape=shape,
                         note="not run: the transformer fusions do not apply to this graph")
                continue
            stats[b] = common.Stats(t)
            peak = statistics.median(peaks[b])
            note = f"peak here {peak / 1e9:.0f} GFLOP/s"
            note += f"; first call {firsts[b]:.1f} s (compile)" if b == "torch-compile" else ""
            self.add(section, label or f"{model} DiT step", backend=b, precision="fp32", shape=shape,
                     stats=stats[b], flops=fl["total"], note=note, peak=peak)
        return stats

    # --- sections ----------------------------------------------------------------------------

    def section_peak(self) -> None:
        res = probe("peak", threads=self.threads)
        self.peak = res["peak"]
        best = max(res["per_size"], key=res["per_size"].get)
        self.add("peak", "fp32 matmul peak (best square GEMM)", backend=best.split()[0], precision="fp32",
                 shape=f"{best.split()[1]}^3", note=f"{self.peak / 1e9:.1f} GFLOP/s; all: " + ", ".join(
                     f"{k} {v / 1e9:.0f}" for k, v in res["per_size"].items()))
        self.extras["peak_flops"] = self.peak

    def section_dit(self) -> None:
        from probe import model_config

        m = self.args.model
        cfg = model_config(m)
        sc = cfg.vae.spatial_compression
        f, h, w = cfg.vae.latent_frames(cfg.sampling.frames), cfg.sampling.height // sc, cfg.sampling.width // sc
        self.prepare_runtime(m)
        backends = ["torch", "ort-basic", "ort", "ort-fused", "runtime"]
        if not self.args.quick:
            backends.insert(1, "torch-compile")
        st = self.dit_case("dit", m, backends, 2, f, h, w, self.repeat(50))
        self.extras["dit"] = {b: s.median for b, s in st.items()}
        for backend, why in absent_backends().items():
            self.add("dit", f"{m} DiT step", backend=backend, note=f"not run: {why}")

    def section_bound(self) -> None:
        # 256 x 256 pixels x 16 frames: 32 x 32 latents, 4 latent frames (x8 space, x4 time)
        backends = ["torch", "ort", "ort-fused"] + ([] if self.args.quick else ["torch-compile"])
        st = self.dit_case("bound", "compute-bound", backends, 2, 4, 32, 32, self.repeat(5),
                           label="compute-bound DiT step (1152 wide, 2 blocks)")
        self.extras["bound"] = {b: s.median for b, s in st.items()}
        self.extras["bound_peak_fraction"] = {r["backend"]: r["peak_fraction"] for r in self.rows
                                              if r["section"] == "bound" and r["peak_fraction"] != ""}

    def section_peer(self) -> None:
        from probe import model_config

        results = {}
        for m in ([self.args.model] if self.args.quick else [self.args.model, "compute-bound"]):
            cfg = model_config(m)
            h = w = cfg.dit.sample_size if m != "compute-bound" else 32
            backends = ["pixart", "torch", "ort", "ort-fused"]
            label = f"{Path(m).name if m != 'compute-bound' else m}: 1-frame step vs diffusers PixArt"
            st = self.dit_case("peer", m, backends, 2, 1, h, w, self.repeat(30 if m != "compute-bound" else 5),
                               label=label)
            results[m] = {b: s.median for b, s in st.items()}
        self.extras["peer"] = results

    def section_scaling(self) -> None:
        from probe import model_config

        m = self.args.model
        cfg = model_config(m)
        mult = cfg.dit.latent_multiple
        grid = [(5, 8, 8), (5, 16, 16), (9, 16, 16), (17, 16, 16), (5, 32, 32), (9, 32, 32)]
        if self.args.quick:
            grid = grid[:3]
        grid = [(f, max(mult, h // mult * mult), max(mult, w // mult * mult)) for f, h, w in grid]
        scaling = []
        for f, h, w in grid:
            st = self.dit_case("scaling", m, ["torch", "ort"], 2, f, h, w, self.repeat(10),
                               label="DiT step vs tokens")
            scaling.append({"tokens": flops.dit_tokens(cfg.dit, f, h, w), **{b: s.median for b, s in st.items()}})
        self.extras["dit_scaling"] = scaling
        # VAE decode vs frames: every slice through the runtime's decoder engines
        n = cfg.vae.slice_frames
        frames = [1 + n, 1 + 2 * n, 1 + 4 * n, 1 + 8 * n, 1 + 18 * n, 1 + 36 * n]
        if self.args.quick:
            frames = frames[:4]
        source = self.source(m)
        from probe import decode_buckets

        self.prepare_runtime(m, frames=decode_buckets(cfg))
        sc = cfg.vae.spatial_compression
        h, w = cfg.sampling.height, cfg.sampling.width
        vae = []
        for fr in frames:
            res = probe("decode", "--model", source, "--frames", str(fr), "--repeat", str(self.repeat(3)),
                        threads=self.threads)
            fl = flops.vae_decode_flops(cfg.vae, fr, h, w)
            stats = common.Stats(res["times"])
            self.add("scaling", "VAE decode vs frames", backend="runtime", precision="fp32",
                     shape=f"{h}x{w}x{fr} ({cfg.vae.latent_frames(fr)} latents, {h // sc}x{w // sc})",
                     stats=stats, flops=fl, peak_memory_mb=res["rss_growth_mb"], note="peak memory = RSS growth")
            vae.append({"frames": fr, "s": stats.median, "rss_mb": res["rss_growth_mb"]})
        fit = linear_fit([v["frames"] for v in vae], [v["s"] for v in vae])
        self.extras["vae_scaling"] = {"points": vae, "fit": fit}
        self.add("scaling", "VAE decode time fit: a + b x frames", backend="runtime",
                 note=f"a={1e3 * fit['a']:.2f} ms, b={1e3 * fit['b']:.3f} ms/frame, R^2={fit['r2']:.4f}")

    def section_runtime(self) -> None:
        out = self.work / "runtime.json"
        cmd = [sys.executable, str(HERE / "runtime.py"), "--model", self.source(self.args.model), "--json", str(out),
               "--repeat", str(self.repeat(5))]
        log("end to end: " + " ".join(cmd[1:]))
        subprocess.run(cmd, check=True, stdout=sys.stderr)
        r = json.loads(out.read_text())
        self.extras["runtime"] = r
        s = common.Stats
        self.add("runtime", "first run, process start to file (export + build)", backend="runtime",
                 stats=s([r["first_run_s"]]), shape=r["request"])
        self.add("runtime", "process start to file, cached engines", backend="runtime",
                 stats=s([r["process_runtime_s"]]), shape=r["request"], note="median of runs")
        self.add("runtime", "process start to file", backend="reference", stats=s([r["process_reference_s"]]),
                 shape=r["request"], note="median of runs")
        self.add("runtime", "end to end in process", backend="runtime", stats=s([r["end_to_end_runtime_s"]]),
                 shape=r["request"])
        self.add("runtime", "end to end in process", backend="reference", stats=s([r["end_to_end_reference_s"]]),
                 shape=r["request"])
        self.add("runtime", "denoising loop outside the DiT engine", backend="runtime", shape=r["request"],
                 note=f"{100 * r['overhead_share']:.2f}% of the loop ({r['denoise_s']:.3f} s)")

    # --- helpers -----------------------------------------------------------------------------

    def repeat(self, n: int) -> int:
        return max(2, n // 4) if self.args.quick else n

    def source(self, model: str) -> str:
        from easyanimate_rt.cli import default_model

        return default_model() if model == "shapes" else model

    def prepare_runtime(self, model: str, frames: list[int] | None = None) -> None:
        """The runtime's engines for the model's default size (and ``frames``), built into
        the engine cache if missing, so probes load them."""
        from easyanimate_rt.engines.buckets import Bucket
        from easyanimate_rt.runtime.pipeline import Pipeline
        from probe import model_config

        cfg = model_config(model)
        buckets = [Bucket(cfg.sampling.height, cfg.sampling.width, f) for f in (frames or [cfg.sampling.frames])]
        t0 = time.perf_counter()
        Pipeline.from_pretrained(self.source(model), buckets=buckets, threads=self.threads).close()
        log(f"runtime engines for {model} ready ({time.perf_counter() - t0:.1f} s)")


def absent_backends() -> dict[str, str]:
    """The GPU backends this machine cannot run, and why (rows that say so, not gaps)."""
    import importlib.util

    out = {}
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except ImportError:
        providers = []
    import torch

    gpu = torch.cuda.is_available()
    for backend, provider in (("ort-cuda", "CUDAExecutionProvider"), ("ort-trt", "TensorrtExecutionProvider")):
        if provider not in providers or not gpu:
            out[backend] = f"needs onnxruntime-gpu with {provider} and a CUDA device"
    for backend, module in (("trt", "tensorrt"), ("rtx", "tensorrt_rtx")):
        if importlib.util.find_spec(module) is None or not gpu:
            out[backend] = f"needs {module} and a CUDA device (engines run on the GPU only)"
    return out


def linear_fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least squares y = a + b x, with R^2."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((v - mx) ** 2 for v in x)
    b = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sxx
    a = my - b * mx
    ss = sum((v - my) ** 2 for v in y)
    res = sum((v - a - b * u) ** 2 for u, v in zip(x, y))
    return {"a": a, "b": b, "r2": 1 - res / ss if ss else 1.0}


def run_gpu(suite: Suite) -> bool:
    """The GPU suite; False (with a row saying so) when no CUDA device is visible."""
    import torch

    if not torch.cuda.is_available():
        suite.add("gpu", "GPU suite", note="not run: no CUDA device on this machine")
        return False
    suite.info = common.machine()
    for dtype in ("bf16", "fp16", "fp8"):
        try:
            res = probe("peak", "--device", "cuda", "--dtype", dtype, threads=suite.threads)
            suite.add("gpu-peak", f"{dtype} matmul", backend="torch", precision=dtype,
                      note=f"{res['peak'] / 1e12:.1f} TFLOP/s")
            suite.extras[f"gpu_peak_{dtype}"] = res["peak"]
        except RuntimeError as exc:
            suite.add("gpu-peak", f"{dtype} matmul", precision=dtype, note=f"failed: {str(exc).splitlines()[-1]}")
    out = suite.work / "gpu_runtime.json"
    subprocess.run([sys.executable, str(HERE / "gpu_runtime.py"), "--json", str(out)], check=True, stdout=sys.stderr)
    g = json.loads(out.read_text())
    suite.extras["gpu_runtime"] = g
    peak = g["bf16_peak"]
    for case, r in g["cases"].items():
        if "error" in r:
            suite.add("gpu", f"{case}: {g['steps']}-step loop", precision="bf16", note=r["error"])
        for kind in ("eager", "graph", "compile"):
            if f"{kind}_s" in r:
                note = f"CUDA graphs {r['graph_speedup']:.2f}x eager" if kind == "graph" else r.get("compile_error", "")
                suite.add("gpu", f"{case}: {g['steps']}-step loop", backend=f"torch {kind}", precision="bf16",
                          shape=r["request"], stats=common.Stats([r[f"{kind}_s"]]), flops=r["loop_flops"],
                          peak=peak, peak_memory_mb=1024 * r["peak_gib"], note=note)
    for size, v in g.get("vae", {}).items():
        suite.add("gpu", f"v2-512 VAE slice decode ({v['frames']} frames)", backend="torch eager", precision="bf16",
                  shape=size, stats=common.Stats([v["slice_s"]]), flops=v["flops"], peak=peak)
    up = g.get("upstream")
    if up:
        suite.add("gpu", "384x672x144, 25 steps + decode, vs upstream", backend="torch", precision="bf16",
                  stats=common.Stats([up["ours_s"]]), flops=up["work_flops"], peak=peak,
                  note=f"upstream {up['upstream_s']:.0f} s on an A100 = {100 * up['upstream_peak_fraction']:.1f}% "
                       f"of its bf16 peak; here {100 * up['ours_peak_fraction']:.1f}% of this card's")
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("cpu", "gpu", "all"), default="cpu")
    p.add_argument("--model", default="shapes", help="shapes (the shipped model), tiny, a preset or a model directory")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--work", default=None, help="exported graphs and scratch files (default: a new temp dir)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of every probe")
    p.add_argument("--sections", default=",".join(CPU_SECTIONS), help=f"CPU sections: {','.join(CPU_SECTIONS)}")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--no-report", action="store_true", help="do not regenerate benchmarks/RESULTS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = 1
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(CPU_SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; sections: {', '.join(CPU_SECTIONS)}")

    os.environ.setdefault("PYTHONPATH", "")
    suite = Suite(args)
    t0 = time.perf_counter()
    if args.suite in ("cpu", "all"):
        if "peak" not in sections:
            sections.insert(0, "peak")  # every FLOP/s is a fraction of it
        for s in sections:
            getattr(suite, f"section_{s}")()
    if args.suite in ("gpu", "all"):
        ran = run_gpu(suite)
        if args.suite == "gpu" and not ran:
            print("the GPU suite needs a CUDA device", file=sys.stderr)
            return 2
    suite.extras["seconds"] = time.perf_counter() - t0
    suite.extras["args"] = {k: v for k, v in vars(args).items() if k not in ("out", "work")}
    js, cs = common.write_rows(suite.rows, args.out, f"suite-{args.suite}")
    (Path(args.out) / f"suite-{args.suite}-extras.json").write_text(json.dumps(suite.extras, indent=1) + "\n")
    log(f"wrote {js} and {cs} ({suite.extras['seconds']:.0f} s)")
    if not args.no_report:
        import report

        report.regenerate(Path(args.out), args.suite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
