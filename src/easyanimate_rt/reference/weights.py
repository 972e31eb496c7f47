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
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..errors import CheckpointError
from ..fileio import atomic_save_safetensors, atomic_write_text, claim_dir, staged_dir
from .config import (CONFIG_NAME, PRESETS, DiTConfig, ModelConfig, VAEConfig, from_preset,  # noqa: F401
                     is_model_dir, preset_name, read_model_config)
from .dit import VideoDiT, sincos_1d_interleaved
from .text import TextEncoder, load_tokenizer, train_tokenizer
from .upstream import dit_fields, upstream_config
from .vae import SliceVAE

log = logging.getLogger(__name__)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"

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
    (random weights from ``seed``)."""
    path = Path(source)
    if path.is_dir():
        return load_model(path, preset=preset, device=device)
    name = preset_name(source)
    log.warning("%s is not a directory: building preset %r with RANDOM weights", source, name)
    return random_model(from_preset(name), seed=seed).to(device)


# --- state dicts -------------------------------------------------------------------------

#: Key prefixes of training-only tensors upstream VAE files carry (the loss module:
#: LPIPS, discriminators, the learned log-variance); ignored on load.
TRAINING_ONLY_PREFIXES = ("loss.",)


def load_state_dict_checked(module: nn.Module, state: Mapping[str, torch.Tensor], what: str,
                            allow_missing: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``module``: missing keys raise (listing them), shape
    mismatches raise, unexpected keys raise unless they are training-only tensors
    (``TRAINING_ONLY_PREFIXES``, logged and ignored): a key the model does not have means
    the architecture is not the checkpoint's. Returns the ignored keys."""

    def listing(keys: list[str]) -> str:
        return ", ".join(keys[:20]) + (f", ... ({len(keys)} in all)" if len(keys) > 20 else "")

    own = module.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith(allow_missing))
    if missing:
        raise CheckpointError(f"{what}: checkpoint is missing {len(missing)} weights: {listing(missing)}")
    bad = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
           if k in state and state[k].shape != v.shape]
    if bad:
        raise CheckpointError(f"{what}: shape mismatch (checkpoint vs model): " + "; ".join(bad[:10]))
    unexpected = sorted(k for k in state if k not in own)
    stray = [k for k in unexpected if not k.startswith(TRAINING_ONLY_PREFIXES)]
    if stray:
        raise CheckpointError(f"{what}: checkpoint has {len(stray)} weights the model does not "
                              f"(a different architecture?): {listing(stray)}")
    if unexpected:
        log.info("%s: ignoring %d training-only checkpoint keys (e.g. %s)", what, len(unexpected), unexpected[:3])
    with torch.no_grad():
        for k, v in own.items():
            if k in state:
                v.copy_(state[k].to(v.dtype))
    return unexpected


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); it may be truncated or "
                              f"corrupt") from None


# --- our model directory -----------------------------------------------------------------

def save_model(model: EasyAnimateModel, out_dir: str | Path, weights_dtype: torch.dtype | None = None) -> Path:
    """Write a model directory. Each file is written atomically; the whole directory is
    assembled under a temporary name and renamed, so readers never see half a model.

    ``weights_dtype`` (e.g. float16) stores the DiT and VAE floating-point tensors in a
    smaller type; loading casts them back to the modules' dtype."""
    # It is replaced whole: never a folder of the user's, nor another kind of ours.
    out_dir = claim_dir(out_dir, (CONFIG_NAME,), "model directory", is_ours=is_model_dir)
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


def load_dit(directory: str | Path, config: DiTConfig) -> VideoDiT:
    """``directory/transformer``'s weights into a :class:`VideoDiT` of ``config``. The
    motion modules' frame-position tables (``pos_encoder.pe``) are fixed functions of
    the config; a file without them (upstream loads with strict=False) gets them computed."""
    with torch.device("meta"):
        dit = VideoDiT(config)
    dit = dit.to_empty(device="cpu")
    state = _read_safetensors(Path(directory) / "transformer" / WEIGHTS_NAME)
    tables = [k for k in dit.state_dict() if k.endswith("pos_encoder.pe")]
    load_state_dict_checked(dit, state, "transformer", allow_missing=tuple(k for k in tables if k not in state))
    with torch.no_grad():
        for name, module in dit.named_modules():
            if name + ".pe" in tables and name + ".pe" not in state:
                module.pe.copy_(sincos_1d_interleaved(module.pe.shape[-1], module.pe.shape[1]))  # (1, L, D)
    return dit


def load_vae(directory: str | Path, config: VAEConfig) -> SliceVAE:
    """``directory/vae``'s weights into a :class:`SliceVAE` of ``config``."""
    vae = SliceVAE(config)
    load_state_dict_checked(vae, _read_safetensors(Path(directory) / "vae" / WEIGHTS_NAME), "vae")
    return vae


def load_model(path: str | Path, preset: str | None = None, device: torch.device | str = "cpu"
               ) -> EasyAnimateModel:
    """Load our model directory, or an upstream one (``preset`` names the release; default:
    inferred from the files, see ``reference.upstream``)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    config = read_model_config(path)
    if config is None:
        config = upstream_config(path, preset)
    text = TextEncoder.from_pretrained(path / "text_encoder", path / "tokenizer",
                                       config.text_encoder)
    vae = load_vae(path, config.vae)
    dit = load_dit(path, config.dit)
    return EasyAnimateModel(config, text, vae, dit).to(device).eval()


# --- PixArt backbones ------------------------------------------------------------------------

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
    keys = dit_fields(Path("config.json"), {k: v for k, v in raw.items()
                                            if k in ("num_layers", "num_attention_heads", "attention_head_dim",
                                                     "in_channels", "out_channels", "patch_size", "sample_size",
                                                     "caption_channels")})
    return DiTConfig(**keys, **video)


__all__ = [
    "EasyAnimateModel", "random_model", "save_model", "load_model", "load_dit", "load_vae", "upstream_config",
    "load_pixart_backbone", "load_state_dict_checked", "dit_config_from_pixart",
]
