"""LoRA training: low-rank factors on a frozen model, written in the kohya format (issue 27).

Every module :func:`~easyanimate_rt.reference.lora.lora_targets` names (the DiT's
Linears, the motion module and the T5 Linears when asked) gets a pair of factors; the
module's output gains ``scale * up(down(x))`` with ``scale = alpha / rank`` (Hu et al.
2021, eq. 3), through a forward hook, so the model's module tree and state dict stay as
they are and the base weights are never touched. ``up`` starts at zero (step 0 is the
base model), ``down`` as a Linear's default (Kaiming uniform, as PEFT and kohya).

The loop is the DiT trainer's at one stage: cached latents from the frozen VAE (and T5
embeddings, unless T5 is adapted), noise and data from (seed, step), the same diffusion
loss, AdamW with warm-up, checkpoints in RUN/checkpoints that resume bit for bit. No
EMA: upstream's LoRA training keeps none and the factors are what the file carries.

The file is written with :func:`~easyanimate_rt.reference.lora.save_kohya`, the layout
upstream EasyAnimate merges (``lora_unet__<path>.lora_down.weight`` ...), so merging it
with weight 1 reproduces the trained model.

Symbols: B batch, C latent channels, F latent frames, h, w latent size, S text tokens,
E text width, R rank, I input features, O output features.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F_
from torch import nn
from torch.utils.data import Dataset

from ..errors import ConfigError, InputError
from ..reference.lora import lora_targets, save_kohya
from ..reference.samplers import NoiseSchedule
from .common import (DistEnv, MetricsLog, autocast, init_distributed, lr_factor, resume_from, run_steps,
                     save_checkpoint, step_generator)
from .dit_trainer import LatentCache, _cached, build_cache
from .losses import DiffusionLoss

log = logging.getLogger(__name__)

#: Written into the file's header: ``train lora`` replaces only files that say so.
WRITER_KEY, WRITER_VALUE = "easyanimate_rt", "train lora"


@dataclass(frozen=True)
class LoraTrainConfig:
    rank: int = 4
    alpha: float | None = None      # None: alpha = rank (scale 1)
    motion_module: bool = False
    text_encoder: bool = False
    steps: int = 1000
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-2
    warmup_steps: int = 20
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    cache_size: int = 512
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    bf16: bool = False
    save_dtype: str = "float16"     # of the factors in the written file

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha is not None and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ConfigError(f"LoRA alpha must be a finite number > 0, got {self.alpha!r}")
        for name in ("steps", "batch_size", "cache_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"LoraTrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"learning rate must be a finite number > 0, got {self.lr!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.save_dtype not in ("float16", "bfloat16", "float32"):
            raise ConfigError(f"save_dtype must be float16, bfloat16 or float32, got {self.save_dtype!r}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


# --- the adapter being trained --------------------------------------------------------------

class LoraFactors(nn.Module):
    """One (down, up) pair for a Linear or 1x1 convolution."""

    def __init__(self, base: nn.Module, rank: int):
        super().__init__()
        out_f, in_f = base.weight.shape[0], base.weight.shape[1]
        self.down = nn.Parameter(torch.empty(rank, in_f))                   # (R, I)
        self.up = nn.Parameter(torch.zeros(out_f, rank))                    # (O, R)
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))                  # nn.Linear's default init

    def delta(self, base: nn.Module, x: torch.Tensor, scale: float) -> torch.Tensor:
        if isinstance(base, nn.Linear):
            return F_.linear(F_.linear(x, self.down), self.up) * scale      # (..., O)
        # 1x1 convolution: the same product per position, at the base's stride.
        conv = {1: F_.conv1d, 2: F_.conv2d, 3: F_.conv3d}[base.weight.dim() - 2]
        ones = (1,) * (base.weight.dim() - 2)
        h = conv(x, self.down.view(*self.down.shape, *ones), stride=base.stride, padding=base.padding)
        return conv(h, self.up.view(*self.up.shape, *ones)) * scale          # (B, O, ...)


class LoraNetwork(nn.Module):
    """Factors for every target of a model, attached by forward hooks (:meth:`attach`).
    Its state dict (``<kohya name>.down`` / ``.up``) is what checkpoints hold."""

    def __init__(self, targets: dict[str, nn.Module], rank: int, scale: float, seed: int = 0):
        super().__init__()
        if not targets:
            raise InputError("LoRA training found no Linear or 1x1 convolution to adapt in this model")
        self.rank, self.scale = rank, scale
        self.targets = dict(targets)
        self.names = {q: q.replace(".", "_") for q in targets}  # ModuleDict keys may not hold '.'
        torch.manual_seed(seed)  # the init is a function of the seed (a resume overwrites it anyway)
        self.factors = nn.ModuleDict({self.names[q]: LoraFactors(m, rank) for q, m in targets.items()})
        self._hooks: list = []

    def attach(self) -> "LoraNetwork":
        self.detach()
        for q, module in self.targets.items():
            f = self.factors[self.names[q]]
            self._hooks.append(module.register_forward_hook(
                lambda mod, args, out, f=f: out + f.delta(mod, args[0], self.scale).to(out.dtype)))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def kohya_tensors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """``{qualified module name: (down (R, I), up (O, R))}``, as :func:`save_kohya` takes."""
        out = {}
        for q, module in self.targets.items():
            f = self.factors[self.names[q]]
            shape = module.weight.shape
            down, up = f.down.detach(), f.up.detach()
            if module.weight.dim() > 2:  # 1x1 conv: the file keeps the kernel's trailing 1s
                down = down.reshape(*down.shape, *shape[2:])
                up = up.reshape(*up.shape, *shape[2:])
            out[q] = (down, up)
        return out


# --- checks before any work -------------------------------------------------------------------

def check_lora_out(path: str | Path, option: str = "--out") -> Path:
    """An InputError unless ``path`` may receive the LoRA file: its folder is writable and
    it is new or a LoRA this trainer wrote (a file of the user's is never replaced)."""
    from ..fileio import check_writable_file

    path = check_writable_file(path, option)
    if path.exists() and not (path.is_file() and _written_by_us(path)):
        raise InputError(f"{option} {path} already exists and is not a LoRA written by easyanimate-rt "
                             f"train lora; give a new file name, nothing was written")
    return path


def _written_by_us(path: Path) -> bool:
    import json

    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 1 << 24:
                return False
            header = json.loads(f.read(n))
    except (OSError, ValueError):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and meta.get(WRITER_KEY) == WRITER_VALUE


# --- training ---------------------------------------------------------------------------------

def _captions(source: Dataset, n: int) -> list[str]:
    """The first ``n`` captions of ``source``, read without decoding video where the
    source lists them (a manifest)."""
    records = getattr(source, "records", None)
    if records is not None:
        return [r.caption for r in records[:n]]
    return [source[i]["caption"] for i in range(n)]


def train_lora(model, source: Dataset, cfg: LoraTrainConfig, run_dir: str | Path,
               env: DistEnv | None = None, resume: bool = True, progress: bool = True) -> LoraNetwork:
    """Train LoRA factors for ``model`` (an ``EasyAnimateModel``; its weights stay frozen
    and unchanged) on ``source`` (clips ``{"video", "caption"}``). Returns the trained
    network, detached from the model; write it with :func:`save_lora`."""
    env = env or init_distributed()
    run_dir = Path(run_dir)
    device = env.device
    dit, vae, text = model.dit, model.vae, model.text_encoder
    # Frozen while training; the flags are put back at the end, since some kernels take
    # another path for weights that require grad (outputs differ in the last bits).
    flags = [(p, p.requires_grad) for part in (dit, vae, text) for p in part.parameters()]
    for part in (dit, vae, text):
        part.to(device).eval().requires_grad_(False)
    network = None
    try:
        network = LoraNetwork(lora_targets(model, cfg.motion_module, cfg.text_encoder), cfg.rank, cfg.scale,
                              cfg.seed).to(device)
        log.info("LoRA rank %d on %d modules (%d parameters)", cfg.rank, len(network.targets),
                 sum(p.numel() for p in network.parameters()))
        schedule = NoiseSchedule()
        loss_fn = DiffusionLoss(schedule, dit.config.learn_sigma, 1.0, dit.config.prediction_type)
        opt = torch.optim.AdamW(network.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        metrics = MetricsLog(run_dir, enabled=env.is_main)
        start, _ = resume_from(run_dir, resume, network, opt)

        # Latents (and T5 embeddings, used unless T5 is adapted) once, from the frozen base:
        # the hooks are attached only after the cache exists.
        video = source[0]["video"]
        key = (f"{video.shape[2]}x{video.shape[3]}x{video.shape[1]}-n{cfg.cache_size}"
               f"-z{vae.config.scaling_factor:.5g}")
        show = progress and env.is_main
        cache = _cached(run_dir / "cache" / f"lora-clips-{key}.pt",
                        lambda: build_cache(source, vae, text, cfg.cache_size, device, progress=show))
        cache = LatentCache(cache.latents.to(device), cache.text.to(device), cache.mask.to(device))
        n = len(cache.latents)
        captions = _captions(source, n) if cfg.text_encoder else []
        empty_emb, empty_mask = text.encode([""], device=device)                 # (1, S, E), (1, S)
        world, rank = env.world_size, env.rank
        network.attach()

        def step_fn(step: int) -> dict[str, float]:
            network.train()
            b = cfg.batch_size
            g = step_generator(cfg.seed, step)
            # 1. batch, identical on every rank; each rank takes its share
            idx = torch.randint(n, (b * world,), generator=g)
            drop = torch.rand(b * world, generator=g) < cfg.caption_dropout
            t = torch.randint(0, schedule.num_train_timesteps, (b * world,), generator=g)
            noise = torch.randn((b * world, *cache.latents.shape[1:]), generator=g)  # (B, C, F, h, w)
            share = slice(rank * b, (rank + 1) * b)
            idx, drop = idx[share], drop[share].to(device)
            noise, t = noise[share].to(device), t[share].to(device)
            x0 = cache.latents[idx.to(device)]                                    # (B, C, F, h, w)
            if cfg.text_encoder:
                prompts = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
                ids, mask = text.tokenize(prompts)
                ids, mask = ids.to(device), mask.to(device)
                with autocast(device, cfg.bf16):
                    emb = text(ids, mask)                                         # (B, S, E)
            else:
                emb, mask = cache.text[idx.to(device)], cache.mask[idx.to(device)]
                emb = torch.where(drop[:, None, None], empty_emb.to(emb.dtype), emb)
                mask = torch.where(drop[:, None], empty_mask.to(mask.dtype), mask)
            # 2. forward / backward through the frozen model and the hooked factors
            xt = schedule.add_noise(x0, noise, t)
            with autocast(device, cfg.bf16):
                out = dit(xt, t, emb, mask)
            loss, values = loss_fn(out, x0, xt, noise, t)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, cfg.steps, cfg.warmup_steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for p in network.parameters() if p.grad is not None]
            if env.distributed:  # the model is not DDP-wrapped (its weights are frozen): average by hand
                import torch.distributed as dist

                for p in params:
                    dist.all_reduce(p.grad)
                    p.grad.div_(world)
            values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            opt.step()
            values.update(loss=loss.item(), lr=opt.param_groups[0]["lr"])
            return values

        def save_fn(done: int) -> Path | None:
            if not env.is_main:
                return None
            state = {"optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg)}
            return save_checkpoint(run_dir, done, network.state_dict(), state)

        run_steps(start, cfg.steps, step_fn, save_fn, metrics, lambda s: "lora", env, cfg.checkpoint_every,
                  cfg.log_every, progress, desc="lora")
        metrics.close()
    finally:
        if network is not None:
            network.detach()
        for p, flag in flags:
            p.requires_grad_(flag)
    return network.eval()


def save_lora(network: LoraNetwork, path: str | Path, cfg: LoraTrainConfig,
              metadata: dict[str, str] | None = None) -> Path:
    """Write the trained factors as a kohya/upstream file (atomically)."""
    alpha = cfg.alpha if cfg.alpha is not None else float(cfg.rank)
    meta = {WRITER_KEY: WRITER_VALUE, "ss_training_steps": str(cfg.steps), **(metadata or {})}
    return save_kohya(path, network.kohya_tensors(), alpha, cfg.rank, dtype=getattr(torch, cfg.save_dtype),
                      metadata=meta)


def clip_frames(frames: int) -> int:
    """Check a training clip length: 1 or 1 + 8k (the Slice VAE's slices)."""
    if frames < 1 or (frames != 1 and (frames - 1) % 8):
        raise InputError(f"--frames must be 1 or 1 + 8k, got {frames}")
    return frames


__all__ = ["LoraNetwork", "LoraTrainConfig", "check_lora_out", "save_lora", "train_lora"]
