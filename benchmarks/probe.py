"""One measurement in its own process (benchmarks/run.py starts one per backend, so that
thread pools of different libraries never share a process), printed as one JSON line.

    python benchmarks/probe.py dit --model shapes --backend ort --onnx DIR/dit/model.onnx \
        --batch 2 --frames 5 --height 8 --width 8 --threads 2 --repeat 20
    python benchmarks/probe.py decode --model shapes --frames 144 --threads 2
    python benchmarks/probe.py peak --threads 2

DiT backends: ``torch`` (the reference module, eager), ``torch-compile`` (inductor),
``ort-basic`` (ONNX Runtime, basic graph optimisations only), ``ort`` (all of ONNX
Runtime's own optimisations), ``ort-fused`` (``onnxruntime.transformers`` attention /
LayerNorm / GELU fusions, then all optimisations), ``runtime`` (the runtime's own DiT
engine from the engine cache, as ``generate`` runs it), ``pixart`` (diffusers'
``PixArtTransformer2DModel`` at the same configuration, 1 frame, eager). Sizes are
latent sizes. ONNX Runtime DiT sessions spin their threads, as the runtime's does.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import measure, pin_threads  # noqa: E402

DIT_BACKENDS = ("torch", "torch-compile", "ort-basic", "ort", "ort-fused", "runtime", "pixart")


# --- models ---------------------------------------------------------------------------------


def compute_bound_config():
    """The release width (v2-512's DiT: hidden 1152, 16 heads, T5-XXL text width) with
    Grid Reshape and 2 blocks: big enough matmuls for a roofline on a CPU."""
    from easyanimate_rt.reference.config import from_preset

    cfg = from_preset("v2-512")
    return cfg.replace(name="compute-bound", dit=cfg.dit.replace(num_layers=2, temporal_block_size=2))


def model_config(name: str):
    from easyanimate_rt.cli import default_model
    from easyanimate_rt.runtime.pipeline import read_config

    if name == "compute-bound":
        return compute_bound_config()
    config = read_config(default_model() if name == "shapes" else name)
    if config is None:
        from easyanimate_rt.reference.weights import load_model_or_preset

        config = load_model_or_preset(name).config
    return config


def dit_holder(name: str, seed: int = 0):
    """An object with ``.dit`` and ``.config`` (what export and graph_module read): the
    model's DiT with its weights, or random weights for a preset or ``compute-bound``."""
    import types

    import torch

    from easyanimate_rt.cli import default_model
    from easyanimate_rt.reference.dit import VideoDiT
    from easyanimate_rt.reference.weights import load_model_or_preset

    if name in ("compute-bound",) or (not Path(name).is_dir() and name not in ("shapes", "tiny")):
        config = model_config(name)
        torch.manual_seed(seed)
        dit = VideoDiT(config.dit).eval()
        with torch.no_grad():  # zero-initialised branches randomised: every block does work
            for p in dit.parameters():
                if p.dim() > 1 and not p.abs().sum():
                    p.normal_(0, 0.02)
        return types.SimpleNamespace(dit=dit, config=config)
    model = load_model_or_preset(default_model() if name == "shapes" else name, seed=seed)
    model.dit.eval()
    return model


def dit_feeds(config, batch: int, frames: int, height: int, width: int):
    import numpy as np

    from easyanimate_rt.export.spec import dit_spec

    spec = dit_spec(config)
    rng = np.random.default_rng(0)
    d = config.dit
    s, e = config.text_encoder.max_length, d.caption_channels
    feeds = {"latents": rng.standard_normal((batch, d.in_channels, frames, height, width), dtype=np.float32),
             "timestep": np.full((batch,), 500.0, np.float32),
             "text": rng.standard_normal((batch, s, e), dtype=np.float32),
             "text_mask": np.ones((batch, s), np.int64)}
    if d.inpaint:
        feeds["inpaint_latents"] = rng.standard_normal((batch, d.inpaint_channels, frames, height, width),
                                                       dtype=np.float32)
    if d.clip_channels:
        feeds["clip_embeds"] = rng.standard_normal((batch, d.clip_channels), dtype=np.float32)
        feeds["clip_mask"] = np.ones((batch, d.clip_tokens), np.int64)
    return spec, feeds


def pixart_for(config):
    """diffusers' PixArt transformer with our DiT's backbone configuration."""
    import diffusers
    import torch

    d = config.dit
    model = diffusers.PixArtTransformer2DModel(
        num_attention_heads=d.num_attention_heads, attention_head_dim=d.attention_head_dim,
        in_channels=d.in_channels, out_channels=d.out_channels, num_layers=d.num_layers,
        sample_size=d.sample_size, patch_size=d.patch_size, caption_channels=d.caption_channels,
        cross_attention_dim=d.hidden_size).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


# --- probes ---------------------------------------------------------------------------------


def ort_session(path: str, level: str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.graph_optimization_level = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                     "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}[level]
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1")
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def probe_dit(args) -> dict:
    import numpy as np

    config = model_config(args.model)
    spec, feeds = dit_feeds(config, args.batch, args.frames, args.height, args.width)
    if args.backend in ("ort-basic", "ort", "ort-fused"):
        session = ort_session(args.onnx, "basic" if args.backend == "ort-basic" else "all", args.threads)
        names = [i.name for i in session.get_inputs()]
        run = lambda: session.run(None, {n: feeds[n] for n in names})  # noqa: E731
    elif args.backend == "runtime":
        from easyanimate_rt.cli import default_model
        from easyanimate_rt.runtime.pipeline import Pipeline

        pipe = Pipeline.from_pretrained(default_model() if args.model == "shapes" else args.model, compile=False,
                                        threads=args.threads)
        dit = pipe.engine("dit")
        run = lambda: dit.run(feeds)  # noqa: E731
    else:
        import torch

        torch.set_grad_enabled(False)
        if args.backend == "pixart":
            model = pixart_for(config)
            x = torch.from_numpy(feeds["latents"][:, :, 0])
            t, text = torch.from_numpy(feeds["timestep"]), torch.from_numpy(feeds["text"])
            mask = torch.from_numpy(feeds["text_mask"])
            run = lambda: model(x, encoder_hidden_states=text, timestep=t, encoder_attention_mask=mask,  # noqa: E731
                                return_dict=False)
        else:
            from easyanimate_rt.export.graphs import graph_module

            module = graph_module(dit_holder(args.model), spec)
            if args.backend == "torch-compile":
                module = torch.compile(module, dynamic=False)
            tensors = [torch.from_numpy(np.asarray(feeds[t.name])) for t in spec.inputs]
            run = lambda: module(*tensors)  # noqa: E731
    t0 = time.perf_counter()
    run()  # first call: compiles for torch-compile
    first = time.perf_counter() - t0
    # This VM's speed drifts by tens of percent over minutes: each probe measures the
    # matmul peak it is compared with in the same process, right before its own timing.
    from common import matmul_peak

    peak = matmul_peak("fp32", "cpu", sizes=(3072,), repeat=3)[0]
    stats = measure(run, repeat=args.repeat, warmup=2, min_seconds=args.min_seconds)
    return {"times": stats.times, "first_call_s": first, "peak": peak}


def decode_buckets(config) -> list[int]:
    """Frame counts whose engines hold every decoder variant a video of any length uses
    (see export.spec.decoder_variants): one slice, and three slices after a lone frame."""
    n = config.vae.slice_frames
    return [n, 1 + n, 1 + 3 * n] if config.vae.slicing == "slice" else [1, n]


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def probe_decode(args) -> dict:
    """The whole-video decode through the runtime's decoder engines (cached), with the
    RSS growth during it sampled every 2 ms; random latents of the right shape."""
    import numpy as np

    from easyanimate_rt.cli import default_model
    from easyanimate_rt.engines.buckets import Bucket
    from easyanimate_rt.runtime.pipeline import Pipeline

    source = default_model() if args.model == "shapes" else args.model
    config = model_config(args.model)
    h, w = args.height or config.sampling.height, args.width or config.sampling.width
    pipe = Pipeline.from_pretrained(source, compile=False, threads=args.threads,
                                    buckets=[Bucket(h, w, f) for f in decode_buckets(config)])
    sc = config.vae.spatial_compression
    z = np.random.default_rng(0).standard_normal(
        (1, config.vae.latent_channels, config.vae.latent_frames(args.frames), h // sc, w // sc), dtype=np.float32)
    for _ in pipe.iter_frames(z[:, :, :1]):  # warm-up of the first-frame variant
        pass
    base, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    times = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        n = sum(len(chunk) for chunk in pipe.iter_frames(z))
        times.append(time.perf_counter() - t0)
    done.set()
    sampler.join()
    assert n == args.frames, (n, args.frames)
    return {"times": times, "rss_growth_mb": (max(peak[0], _rss()) - base) / 2**20, "frames": n}


def probe_peak(args) -> dict:
    from common import matmul_peak

    best, per_size = matmul_peak(args.dtype, args.device)
    return {"peak": best, "per_size": per_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=("dit", "decode", "peak"))
    p.add_argument("--model", default="shapes")
    p.add_argument("--backend", choices=DIT_BACKENDS, default="torch")
    p.add_argument("--onnx", default=None, help="the DiT ONNX graph (ort backends)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--min-seconds", type=float, default=0.0)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    pin_threads(args.threads)
    out = {"dit": probe_dit, "decode": probe_decode, "peak": probe_peak}[args.kind](args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
