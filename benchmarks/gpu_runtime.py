"""The torch backend on a GPU: the denoising loop eager vs CUDA graphs vs torch.compile,
achieved TFLOP/s against the measured bf16 matmul peak, the VAE slice decode, and the
release size against upstream's published figure.

    python benchmarks/gpu_runtime.py [--json results/gpu_runtime.json] [--steps 4] [--dry-run]

bf16. Cases: the shipped model and ``tiny`` at their default sizes, ``v2-512`` (random
weights, DiT only: random text embeddings stand in for T5-XXL, whose 4.7 B random
parameters would take minutes to make) at 384 x 672 x 18 and 384 x 672 x 144 where
memory allows. Per case: ``--steps``-step loop times (median of ``--repeat``), the
graph-vs-eager difference of the final latents, peak memory. VAE: one slice decode of the
``v2-512`` VAE at 384 x 672 and 512 x 512. Upstream: EasyAnimate's README gives ~180 s
for a 384 x 672 x 144 video on an A100 (V4 table); the same work here, 25 steps +
decode, is compared per FLOP (each as a fraction of its card's bf16 peak; A100: 312
TFLOP/s dense). ``--dry-run`` prints the cases and their FLOPs without a GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flops  # noqa: E402
from common import matmul_peak, measure  # noqa: E402

UPSTREAM = {"seconds": 180.0, "card": "A100", "bf16_peak": 312e12, "size": (384, 672, 144), "steps": 25}


def cases(skip_release: bool) -> list[tuple[str, str, dict]]:
    from easyanimate_rt.cli import default_model

    out = [("shapes", default_model(), {}), ("tiny", "tiny", {})]
    if not skip_release:
        out += [("v2-512 384x672x18", "v2-512", dict(height=384, width=672, frames=18)),   # V2: 1 or 9k frames
                ("v2-512 384x672x144", "v2-512", dict(height=384, width=672, frames=144))]
    return out


def loop_flops(config, req, steps: int) -> float:
    """FLOPs of ``steps`` batched-guidance DiT calls at the request's latent size."""
    _, _, f, h, w = req.latent_shape(config)
    return steps * flops.dit_flops(config.dit, batch=2, frames=f, height=h, width=w,
                                   text_len=config.text_encoder.max_length)["total"]


def release_dit(preset: str, device: str, dtype):
    """A random-weight DiT of ``preset`` made on the device, with the preset's config."""
    import torch

    from easyanimate_rt.reference.config import from_preset
    from easyanimate_rt.reference.dit import VideoDiT

    config = from_preset(preset)
    with torch.device(device):
        dit = VideoDiT(config.dit).to(dtype).eval()
    with torch.no_grad():
        for p in dit.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.02)
    return types.SimpleNamespace(dit=dit, config=config)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-release", action="store_true", help="only the shipped model and tiny")
    p.add_argument("--dry-run", action="store_true", help="list the cases and their FLOPs; no GPU needed")
    args = p.parse_args(argv)

    from easyanimate_rt.reference.config import from_preset
    from easyanimate_rt.reference.request import default_request
    from easyanimate_rt.runtime.pipeline import read_config

    if args.dry_run:
        for name, source, size in cases(args.skip_release):
            config = read_config(source) or from_preset(source)
            req = default_request(config, "x", steps=args.steps, **size)
            print(f"{name}: latents {req.latent_shape(config)}, {args.steps}-step loop "
                  f"{loop_flops(config, req, args.steps) / 1e12:.3f} TFLOP")
        return 0

    import torch

    from easyanimate_rt.reference.pipeline import ReferencePipeline
    from easyanimate_rt.reference.weights import load_model_or_preset
    from easyanimate_rt.runtime.denoiser import Denoiser, DeviceArrays

    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    torch.set_grad_enabled(False)
    sync = torch.cuda.synchronize
    card = torch.cuda.get_device_name()
    peak, per_size = matmul_peak("bf16", "cuda")
    results = {"card": card, "torch": torch.__version__, "steps": args.steps, "bf16_peak": peak,
               "bf16_peak_per_size": per_size, "cases": {}}
    print(f"{card}: bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    dtype = torch.bfloat16
    for name, source, size in cases(args.skip_release):
        row: dict = {}
        try:
            if source in ("tiny",) or Path(source).is_dir():
                model = load_model_or_preset(source).to("cuda", dtype).eval()
                ref = ReferencePipeline(model, device="cuda")
                req = ref.request("a red circle moving left", steps=args.steps, **size)
                emb, mask = ref.encode_prompt(req.prompt, req.negative_prompt)
            else:
                model = release_dit(source, "cuda", dtype)
                req = default_request(model.config, "x", steps=args.steps, **size)
                s, e = model.config.text_encoder.max_length, model.config.dit.caption_channels
                emb = torch.randn(2, s, e, device="cuda", dtype=dtype)
                mask = torch.ones(2, s, device="cuda", dtype=torch.int64)
            row["request"] = f"{req.height}x{req.width}x{req.frames}"
            row["latents"] = list(req.latent_shape(model.config))
            row["loop_flops"] = loop_flops(model.config, req, args.steps)

            host_emb, host_mask = (torch.as_tensor(a).float().cpu().numpy() if a.is_floating_point()
                                   else torch.as_tensor(a).cpu().numpy() for a in (emb, mask))
            loops = {graph: Denoiser.on_model(model, DeviceArrays("cuda"), cuda_graphs=graph) for graph in (False, True)}

            def loop(graph: bool):  # the runtime's loop on the DiT's torch engine (its CUDA graph inside)
                return torch.from_numpy(loops[graph].run([req], host_emb, host_mask).latents)

            for kind, graph in (("eager", False), ("graph", True)):
                row[f"{kind}_s"] = measure(lambda: loop(graph), repeat=args.repeat, warmup=1, sync=sync).median
            row["graph_vs_eager_max_abs"] = float((loop(True) - loop(False)).abs().max())
            row["graph_speedup"] = row["eager_s"] / row["graph_s"]
            eager_dit = model.dit
            try:
                model.dit = torch.compile(eager_dit)
                loops[False] = Denoiser.on_model(model, DeviceArrays("cuda"))  # its engine wraps the compiled DiT
                row["compile_s"] = measure(lambda: loop(False), repeat=args.repeat, warmup=1, sync=sync).median
            except Exception as exc:  # report, do not hide
                row["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            finally:
                model.dit = eager_dit
            for kind in ("eager", "graph", "compile"):
                if f"{kind}_s" in row:
                    row[f"{kind}_tflops"] = row["loop_flops"] / row[f"{kind}_s"] / 1e12
                    row[f"{kind}_peak_fraction"] = row["loop_flops"] / row[f"{kind}_s"] / peak
        except torch.cuda.OutOfMemoryError as exc:
            row["error"] = f"out of memory: {str(exc).splitlines()[0]}"
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results["cases"][name] = row
        print(name, json.dumps(row), flush=True)
        model = ref = emb = mask = None  # free the GPU memory before the next case
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()

    # VAE slice decode of the release VAE (random weights)
    from easyanimate_rt.export.spec import decoder_variants
    from easyanimate_rt.reference.vae import SliceVAE

    config = from_preset("v2-512")
    with torch.device("cuda"):
        vae = SliceVAE(config.vae).to(dtype).eval()
    ctx, start, length = decoder_variants(config)["chunk" if config.vae.slicing == "chunk" else "interior"]
    results["vae"] = {}
    for h, w in ((384, 672), (512, 512)):
        sc = config.vae.spatial_compression
        z = torch.randn(1, config.vae.latent_channels, ctx, h // sc, w // sc, device="cuda", dtype=dtype)
        t = measure(lambda: vae.decode_slice(z, start, length), repeat=args.repeat, warmup=1, sync=sync).median
        fl = flops.vae_slice_decode_flops(config.vae, ctx, start, length, h // sc, w // sc)
        results["vae"][f"{h}x{w}"] = {"slice_s": t, "flops": fl, "tflops": fl / t / 1e12, "peak_fraction": fl / t / peak,
                                      "frames": config.vae.decoded_frames(length)}
        print("vae", h, w, json.dumps(results["vae"][f"{h}x{w}"]), flush=True)

    # upstream's 384x672x144 figure, per FLOP
    big = results["cases"].get("v2-512 384x672x144", {})
    if "graph_s" in big:
        h, w, f = UPSTREAM["size"]
        per_step = min(big[k] for k in ("graph_s", "compile_s") if k in big) / args.steps
        slices = len(config.vae.slice_plan(config.vae.latent_frames(f)))
        ours = UPSTREAM["steps"] * per_step + slices * results["vae"]["384x672"]["slice_s"]
        work = (UPSTREAM["steps"] * big["loop_flops"] / args.steps
                + flops.vae_decode_flops(config.vae, f, h, w))
        results["upstream"] = {
            "ours_s": ours, "upstream_s": UPSTREAM["seconds"], "work_flops": work,
            "ours_peak_fraction": work / ours / peak,
            "upstream_peak_fraction": work / UPSTREAM["seconds"] / UPSTREAM["bf16_peak"],
            "note": "upstream's figure is V4's (the closest published size class); work is this model's FLOPs",
        }
        print("upstream", json.dumps(results["upstream"]), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
