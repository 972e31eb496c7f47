"""Saving and loading model directories (DESIGN.md 1.6).

Our own model directory uses the upstream layout so the same loader serves both:

    MODEL/easyanimate_rt.json                     whole ModelConfig (ours only)
    MODEL/transformer/config.json + diffusion_pytorch_model.safetensors
    MODEL/vae/config.json         + diffusion_pytorch_model.safetensors
    MODEL/text_encoder/           transformers layout (config.json + model.safetensors)
    MODEL/tokenizer/              spiece.model or tokenizer.json

An upstream EasyAnimate V2/V3 directory has no ``easyanimate_rt.json``; its
architecture comes from a preset, with the sizes its ``transformer/config.json``
states taking precedence. Missing weights are an error that lists them; unexpected
ones (upstream VAE files carry training-loss tensors) are logged and ignored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..fileio import atomic_save_safetensors, atomic_write_text, staged_dir
from .config import PRESETS, DiTConfig, ModelConfig, from_preset
from .dit import VideoDiT
from .samplers import NoiseSchedule
from .text import TextEncoder, load_tokenizer, train_tokenizer
from .vae import SliceVAE

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "easyanimate_rt.json"

# Words the randomly initialised tokenizer of the `tiny` preset knows (tests, smoke runs).
_TINY_CORPUS = (
    "a red green blue yellow white black purple orange gray circle square triangle star "
    "moving left right up down static growing shrinking bouncing on background small large "
    "in this video the shape object"
).split()


@dataclass
class EasyAnimateModel:
    """The three networks of a model and its configuration."""

    config: ModelConfig
    text_encoder: TextEncoder
    vae: SliceVAE
    dit: VideoDiT

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
           ) -> "EasyAnimateModel":
        for net in (self.text_encoder, self.vae, self.dit):
            net.to(device=device, dtype=dtype)
        return self

    def eval(self) -> "EasyAnimateModel":
        for net in (self.text_encoder, self.vae, self.dit):
            net.eval()
        return self


def random_model(config: ModelConfig, seed: int = 0, tokenizer_dir: str | Path | None = None
                 ) -> EasyAnimateModel:
    """A model with random weights (``tiny`` tests and smoke runs; release sizes on meta).

    The weights are a function of ``seed`` alone; torch's global RNG is left as it was.
    Without ``tokenizer_dir`` a small tokenizer is trained on a caption vocabulary in a
    temporary folder that is removed once the tokenizer is in memory."""
    with contextlib.ExitStack() as stack:
        if tokenizer_dir is None:
            tokenizer_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="easyanimate-rt-tok-"))
            sentences = [" ".join(_TINY_CORPUS[i:i + 6]) for i in range(len(_TINY_CORPUS))]
            train_tokenizer(sentences * 4, tokenizer_dir, vocab_size=min(config.text_encoder.vocab_size, 120))
        tokenizer = load_tokenizer(tokenizer_dir)
        if hasattr(tokenizer, "sp_model"):
            # A slow tokenizer re-reads its vocabulary file when saved; keep none pointing
            # into the folder about to be removed (it then saves its in-memory model).
            tokenizer.vocab_file = ""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = TextEncoder(config.text_encoder, tokenizer)
        model = EasyAnimateModel(config, text, SliceVAE(config.vae), VideoDiT(config.dit))
    return model.eval()


def load_model_or_preset(source: str | Path, seed: int = 0, preset: str | None = None,
                         device: torch.device | str = "cpu") -> EasyAnimateModel:
    """``source`` is a model directory (loaded with :func:`load_model`) or a preset name
    (random weights from ``seed``). A path-like ``source`` that does not exist is an
    error, not a preset name."""
    path = Path(source)
    if path.is_dir():
        return load_model(path, preset=preset, device=device)
    if str(source) not in PRESETS and (path.suffix or len(path.parts) > 1 or path.exists()):
        raise CheckpointError(f"model directory not found: {source} (and it is not a preset name; "
                              f"presets: {sorted(PRESETS)})")
    log.warning("%s is not a directory: building preset %r with RANDOM weights", source, str(source))
    return random_model(from_preset(str(source)), seed=seed).to(device)


# --- state dicts -------------------------------------------------------------------------

def load_state_dict_checked(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                            allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``module``: missing keys raise (listing them), unexpected keys
    are logged and ignored, shape mismatches raise. Returns the unexpected keys."""
    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith(allow_missing))
    if missing:
        shown = ", ".join(missing[:20]) + (f", ... ({len(missing)} in all)" if len(missing) > 20 else "")
        raise CheckpointError(f"{what}: checkpoint is missing {len(missing)} weights: {shown}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and state[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{what}: shape mismatch (checkpoint vs model): " + "; ".join(bad[:10]))
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        log.info("%s: ignoring %d unexpected checkpoint keys (e.g. %s)", what, len(unexpected), unexpected[:3])
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
    return unexpected


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    return load_file(str(path))


# --- our model directory -----------------------------------------------------------------

def save_model(model: EasyAnimateModel, out_dir: str | Path, weights_dtype: torch.dtype | None = None) -> Path:
    """Write a model directory. Each file is written atomically; the whole directory is
    assembled under a temporary name and renamed, so readers never see half a model.

    ``weights_dtype`` (e.g. float16) stores the DiT and VAE floating-point tensors in a
    smaller type; loading casts them back to the modules' dtype."""
    out_dir = Path(out_dir)
    with staged_dir(out_dir) as tmp:
        for sub, net in (("transformer", model.dit), ("vae", model.vae)):
            atomic_write_text(tmp / sub / "config.json",
                              json.dumps(net.config.to_dict(), indent=2, sort_keys=True) + "\n")
            state = net.state_dict()
            if weights_dtype is not None:
                state = {k: v.to(weights_dtype) if v.is_floating_point() else v for k, v in state.items()}
            atomic_save_safetensors(state, tmp / sub / WEIGHTS_NAME)
        model.text_encoder.save_pretrained(tmp / "text_encoder", tmp / "tokenizer")
        atomic_write_text(tmp / CONFIG_NAME, json.dumps(model.config.to_dict(), indent=2, sort_keys=True) + "\n")
    return out_dir


def load_model(path: str | Path, preset: str | None = None, device: torch.device | str = "cpu"
               ) -> EasyAnimateModel:
    """Load our model directory, or an upstream one (then ``preset`` names the architecture;
    default: inferred from the transformer's config)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    if (path / CONFIG_NAME).exists():
        config = ModelConfig.from_dict(json.loads((path / CONFIG_NAME).read_text()))
    else:
        config = upstream_config(path, preset)
    text = TextEncoder.from_pretrained(path / "text_encoder", path / "tokenizer",
                                       config.text_encoder)
    vae = SliceVAE(config.vae)
    load_state_dict_checked(vae, _read_safetensors(path / "vae" / WEIGHTS_NAME), "vae")
    with torch.device("meta"):
        dit = VideoDiT(config.dit)
    dit = dit.to_empty(device="cpu")
    # Non-persistent state (none today) would be lost by to_empty; pos_encoder.pe is persistent
    # and loaded below like any weight.
    load_state_dict_checked(dit, _read_safetensors(path / "transformer" / WEIGHTS_NAME), "transformer")
    return EasyAnimateModel(config, text, vae, dit).to(device).eval()


# --- upstream directories ------------------------------------------------------------------

# diffusers-style keys of an upstream transformer/config.json that map onto DiTConfig.
_UPSTREAM_DIT_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "in_channels",
                      "patch_size", "sample_size", "caption_channels")


def _upstream_scheduler(path: Path) -> dict[str, Any]:
    """DiTConfig overrides from ``scheduler/config.json`` (its prediction type); a schedule
    other than the one the samplers implement is refused rather than silently misused."""
    file = path / "scheduler" / "config.json"
    if not file.exists():
        return {}
    raw = json.loads(file.read_text())
    schedule = NoiseSchedule()  # the training schedule every sampler here assumes
    expected = {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
                "beta_end": schedule.beta_end, "beta_schedule": "linear"}
    for key, want in expected.items():
        got = raw.get(key, want)
        if got != want and not (isinstance(want, float) and isinstance(got, (int, float))
                                and abs(got - want) <= 1e-12):
            raise CheckpointError(f"{file}: {key}={got!r} is not supported (the samplers implement "
                                  f"{key}={want!r})")
    return {"prediction_type": raw["prediction_type"]} if "prediction_type" in raw else {}


def upstream_config(path: str | Path, preset: str | None = None) -> ModelConfig:
    """Architecture of an upstream model directory: a preset, overridden by the sizes
    that ``transformer/config.json`` states."""
    path = Path(path)
    cfg_file = path / "transformer" / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{path} is neither an easyanimate-rt model directory ({CONFIG_NAME}) "
                              f"nor an upstream one (transformer/config.json)")
    raw: dict[str, Any] = json.loads(cfg_file.read_text())
    if preset is None:
        preset = "v2-768" if raw.get("sample_size", 64) >= 96 else "v2-512"
        log.info("no preset given for upstream directory %s; using %s", path, preset)
    base = from_preset(preset)
    overrides = {k: raw[k] for k in _UPSTREAM_DIT_KEYS if k in raw}
    if "out_channels" in raw:
        overrides["learn_sigma"] = raw["out_channels"] == 2 * overrides.get("in_channels", base.dit.in_channels)
    overrides.update(_upstream_scheduler(path))
    dit = dataclasses.replace(base.dit, **overrides)
    text = base.text_encoder
    t5_file = path / "text_encoder" / "config.json"
    if t5_file.exists():
        t5 = json.loads(t5_file.read_text())
        text = dataclasses.replace(text, **{k: t5[k] for k in ("vocab_size", "d_model", "d_kv", "d_ff",
                                                               "num_layers", "num_heads") if k in t5})
    return dataclasses.replace(base, name=f"{preset}@{path.name}", dit=dit, text_encoder=text)


def load_pixart_backbone(dit: VideoDiT, source: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Initialise the DiT backbone from a PixArt-alpha transformer (diffusers layout).

    Motion modules and long skips keep their zero initialisation, so the video model
    equals the image model at step 0 (paper section 4, stage 1).
    """
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        p = Path(source)
        if p.is_dir():
            p = p / "transformer" / WEIGHTS_NAME if (p / "transformer").is_dir() else p / WEIGHTS_NAME
        state = _read_safetensors(p)
    video_only = tuple(
        f"transformer_blocks.{i}.attn_temporal." for i in range(dit.config.num_layers)
    ) + ("long_connect_fc.",)
    load_state_dict_checked(dit, state, "PixArt backbone", allow_missing=video_only)


def dit_config_from_pixart(raw: Mapping[str, Any], **video: Any) -> DiTConfig:
    """A DiTConfig whose backbone matches a diffusers PixArt ``config.json``."""
    keys = {k: raw[k] for k in _UPSTREAM_DIT_KEYS if k in raw}
    out = raw.get("out_channels")
    if out is not None:
        keys["learn_sigma"] = out == 2 * keys.get("in_channels", 4)
    return DiTConfig(**keys, **video)


__all__ = [
    "EasyAnimateModel", "random_model", "save_model", "load_model", "upstream_config",
    "load_pixart_backbone", "load_state_dict_checked", "dit_config_from_pixart",
]
