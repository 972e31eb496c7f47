"""Models and exported graphs shared by the export, engine and validation tests (the
``exports`` fixture in conftest.py hands out one :class:`Exports` per session).

"CI-exportable models" are the ``tiny`` preset (random weights, zero-initialised DiT
branches randomised so every path carries signal) and the shipped ``shapes`` model
when its directory exists. Every graph is traced once per session (tracing is the slow
part) and lowered/written per precision from a copy of that trace.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.weights import load_model, random_model

SHAPES_DIR = Path(__file__).resolve().parents[1] / "src" / "easyanimate_rt" / "assets" / "shapes"


def ci_models() -> list[str]:
    """tiny, plus the shipped ``shapes`` model once it exists."""
    return ["tiny"] + (["shapes"] if (SHAPES_DIR / "easyanimate_rt.json").exists() else [])


def randomize_zero_init(module: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Give zero-initialised parameters (motion-module outputs, skips, cross-attention
    output, final projection) random values, so the exported function is not the
    identity on those branches."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.abs().any():
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def build_model(name: str):
    if name == "shapes":
        return load_model(SHAPES_DIR).eval()
    if name == "tiny":
        model = random_model(from_preset("tiny"))
    elif name == "tiny-inp":
        # A V3 InP DiT at the tiny size: 8 more input channels and a CLIP projection.
        cfg = from_preset("tiny")
        cfg = cfg.replace(dit=cfg.dit.replace(inpaint_channels=8, clip_channels=24))
        model = random_model(cfg, seed=2)
    elif name == "tiny-v2":
        # V2's VAE at the tiny size: causal padding, 9-frame chunks -> 3 latents.
        cfg = from_preset("tiny")
        cfg = cfg.replace(vae=cfg.vae.replace(padding_mode="causal", slicing="chunk", slice_frames=9),
                          sampling=cfg.sampling.replace(frames=9))
        model = random_model(cfg, seed=3)
    elif name == "tiny-grid":
        # The release DiT's code paths: Grid Reshape (V2) and hybrid global attention (V3).
        cfg = from_preset("tiny")
        cfg = cfg.replace(dit=cfg.dit.replace(temporal_block_size=2, hybrid_global_attention=True))
        model = random_model(cfg, seed=1)
    else:
        raise KeyError(name)
    randomize_zero_init(model.dit)
    return model.eval()


class Exports:
    """Session cache: models, fp32 traces and written graphs."""

    def __init__(self, root: Path):
        self.root = root
        self._models: dict[str, object] = {}
        self._traces: dict[tuple[str, str], bytes] = {}
        self._written: dict[tuple, tuple] = {}
        self.amax: dict[str, dict] = {}

    def model(self, name: str):
        if name not in self._models:
            self._models[name] = build_model(name)
        return self._models[name]

    def spec(self, name: str, key: str, precision: str = "fp32"):
        from easyanimate_rt.export.spec import make_specs

        network = key.split("/")[0]
        for spec in make_specs(self.model(name).config, precision, [network]):
            if spec.key == key:
                return spec
        raise KeyError(key)

    def trace(self, name: str, key: str):
        """A fresh copy of the fp32 trace of ``key``."""
        import onnx_ir as ir

        from easyanimate_rt.export.onnx import trace

        if (name, key) not in self._traces:
            self._traces[(name, key)] = ir.to_proto(trace(self.model(name), self.spec(name, key))).SerializeToString()
        import onnx

        return ir.from_proto(onnx.load_from_string(self._traces[(name, key)]))

    def calibration(self, name: str):
        """fp8 amax of the DiT from two recorded generations."""
        from easyanimate_rt.export import fp8

        if name not in self.amax:
            model = self.model(name)
            batches = fp8.record_dit_inputs(model, fp8.DEFAULT_PROMPTS[:2], **small_sampling(model))
            self.amax[name] = fp8.calibrate(model.dit, batches, method="max")
        return self.amax[name]

    def written(self, name: str, key: str, precision: str = "fp32", policy=None):
        """(spec, path of model.onnx) of ``key`` lowered to ``precision`` (or ``policy``)."""
        from easyanimate_rt.export.onnx import lower, write_graph

        cache_key = (name, key, precision, policy)
        if cache_key not in self._written:
            spec = self.spec(name, key, precision)
            if policy is not None:
                spec = spec.replace(precision=policy)
            ir_model = self.trace(name, key)
            amax = self.calibration(name) if spec.precision.fp8 else None
            stats = lower(ir_model, spec, amax)
            tag = precision if policy is None else f"{precision}-{policy.compute_dtype}"
            directory = self.root / name / tag / key
            spec = write_graph(ir_model, spec, directory, stats=stats)
            self._written[cache_key] = (spec, directory / "model.onnx")
        return self._written[cache_key]


def small_sampling(model) -> dict:
    """A short sampling run at the model's default size (realistic latent scales)."""
    return dict(steps=min(model.config.sampling.steps, 6))


def ort_session(path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("OMP_NUM_THREADS", "1") or 1)
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def parity_dims(spec) -> list[dict[str, int]]:
    """Three or more dimension sets inside the spec's ranges, none equal to the export
    sample, with batch 1, the smallest size (1 frame for the DiT) and non-square sizes."""
    lo = {d.name: d.min for d in spec.dims}
    opt = spec.opt_dims()
    if set(opt) == {"batch"}:  # text encoder: only the batch varies
        d = spec.dim("batch")
        return [{"batch": b} for b in range(d.min, d.max + 1) if b != spec.sample["batch"]]
    hi = {d.name: d.max for d in spec.dims}
    out = [dict(lo, batch=1)]
    b = dict(opt, batch=spec.dim("batch").max)
    c = dict(hi, batch=1)
    if "height" in opt:
        h, w = spec.dim("height"), spec.dim("width")
        if b["height"] == b["width"]:
            b["width"] = b["width"] - w.multiple if b["width"] - w.multiple >= w.min else b["width"] + w.multiple
            b["width"] = min(max(b["width"], w.min), w.max)
        c["width"] = max(w.min, c["width"] - 2 * w.multiple)
        c["height"] = h.max
    out += [b, c]
    if "frames" in opt:
        out.append(dict(opt, batch=2, frames=max(1, spec.dim("frames").max)))
    seen, unique = [], []
    for dims in out:
        if dims != dict(spec.sample) and dims not in seen:
            seen.append(dims)
            unique.append(dims)
    assert len(unique) >= 3, unique
    return unique


def feeds_to_torch(feeds):
    return {k: torch.from_numpy(np.asarray(v)) for k, v in feeds.items()}
