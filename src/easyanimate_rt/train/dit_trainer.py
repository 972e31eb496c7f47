"""Video DiT training in the paper's three stages (section 4 / DESIGN.md 2).

1. images only, to adapt the (PixArt) backbone to the VAE's latent space;
2. video at low resolution, training the motion modules (and optionally the rest);
3. higher resolution and/or longer clips, whole model.

Each step's batch is all images or all videos; a video batch's length is the stage's
full length most of the time, otherwise a shorter 1 + 8k. Objective: epsilon MSE plus
the variational bound for learned-variance channels. AdamW with warm-up, weight decay,
gradient clipping, EMA weights, caption dropout (to the empty prompt, the unconditional
branch of classifier-free guidance). With a frozen VAE and text encoder, latents and
text embeddings are computed once per stage and cached on disk.

Symbols: N cached items, B batch, C latent channels, F latent frames, h, w latent size,
S text tokens, E text width.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..fileio import atomic_path
from ..reference.dit import VideoDiT
from ..reference.samplers import NoiseSchedule
from ..reference.text import TextEncoder
from ..reference.vae import SliceVAE
from .common import (EMA, DistEnv, MetricsLog, autocast, init_distributed, lr_factor, resume_from, run_steps,
                     save_checkpoint, step_generator, unwrap, wrap_model)
from .losses import DiffusionLoss

log = logging.getLogger(__name__)

TRAIN_SETS = ("all", "motion")


@dataclass(frozen=True)
class DiTStage:
    name: str
    steps: int
    height: int
    width: int
    frames: int = 1                 # full clip length; 1 = images only
    image_fraction: float = 0.0     # share of image batches in a video stage
    full_length_prob: float = 0.75  # otherwise a shorter 1 + 8k clip
    train: str = "all"              # "all" or "motion" (motion modules + skips)
    lr: float = 2e-5
    batch_size: int = 8
    decay_fraction: float = 0.0     # last share of the stage where the lr falls linearly to 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ConfigError(f"stage {self.name!r}: steps and batch_size must be >= 1")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"stage {self.name!r}: decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if self.train not in TRAIN_SETS:
            raise ConfigError(f"stage {self.name!r}: train must be one of {list(TRAIN_SETS)}, got {self.train!r}")
        if self.frames != 1 and (self.frames - 1) % 8:
            raise ConfigError(f"stage {self.name!r}: frames must be 1 or 1 + 8k, got {self.frames}")


@dataclass(frozen=True)
class DiTTrainConfig:
    stages: tuple[DiTStage, ...] = field(default_factory=tuple)
    weight_decay: float = 0.03
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    snr_weight_cap: float = 1.0     # > 1: grade high-noise steps on x0 error (losses.DiffusionLoss)
    cache_latents: bool = True
    cache_size: int = 512           # items per cached source and stage
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    sample_every: int = 0           # 0 = no sample videos during training
    bf16: bool = False
    gradient_checkpointing: bool = False
    fsdp: bool = False

    def __post_init__(self) -> None:
        if not self.stages:
            raise ConfigError("DiTTrainConfig.stages must name at least one stage")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ConfigError(f"DiTTrainConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def locate(self, step: int) -> tuple[int, int]:
        """(stage index, step within the stage) of a global step."""
        for i, s in enumerate(self.stages):
            if step < s.steps:
                return i, step
            step -= s.steps
        raise ConfigError(f"step {step} is past the last stage")


def stage_lr_factor(stage: DiTStage, local: int, warmup_steps: int) -> float:
    """Learning-rate multiplier at step ``local`` of ``stage`` (see ``common.lr_factor``)."""
    return lr_factor(local, stage.steps, warmup_steps, stage.decay_fraction)


SourceFactory = Callable[[DiTStage], tuple[Dataset, Dataset]]  # stage -> (stills, clips)


@dataclass
class LatentCache:
    latents: torch.Tensor  # (N, C, F, h, w) scaled latents
    text: torch.Tensor     # (N, S, E)
    mask: torch.Tensor     # (N, S)


@torch.no_grad()
def build_cache(source: Dataset, vae: SliceVAE, text_encoder: TextEncoder, size: int,
                device: torch.device, batch: int = 8, progress: bool = True) -> LatentCache:
    """Encode the first ``size`` items of ``source`` with the frozen VAE and T5."""
    from tqdm import tqdm

    lat, txt, msk = [], [], []
    n = min(size, len(source))
    for a in tqdm(range(0, n, batch), desc="caching latents", unit="batch", disable=not progress):
        items = [source[i] for i in range(a, min(n, a + batch))]
        video = torch.stack([it["video"] for it in items]).to(device)
        lat.append(vae.encode(video).float().cpu())
        emb, mask = text_encoder.encode([it["caption"] for it in items], device=device)
        txt.append(emb.float().cpu())
        msk.append(mask.cpu())
    return LatentCache(torch.cat(lat), torch.cat(txt), torch.cat(msk))


def _cached(path: Path, build: Callable[[], LatentCache]) -> LatentCache:
    if path.exists():
        return LatentCache(**torch.load(path, weights_only=True))
    cache = build()
    with atomic_path(path) as tmp:
        torch.save(dataclasses.asdict(cache), tmp)
    return cache


def _trainable(dit: VideoDiT, which: str) -> None:
    if which == "all":
        dit.requires_grad_(True)
        return
    dit.requires_grad_(False)
    for blk in dit.transformer_blocks:
        if blk.attn_temporal is not None:
            blk.attn_temporal.requires_grad_(True)
    dit.long_connect_fc.requires_grad_(True)


def train_dit(dit: VideoDiT, vae: SliceVAE, text_encoder: TextEncoder, sources: SourceFactory,
              cfg: DiTTrainConfig, run_dir: str | Path, env: DistEnv | None = None, resume: bool = True,
              progress: bool = True, sample_fn: Callable[[VideoDiT, int], None] | None = None) -> VideoDiT:
    """Train ``dit`` through ``cfg.stages``; returns it holding the EMA weights."""
    env = env or init_distributed()
    run_dir = Path(run_dir)
    device = env.device
    dit.to(device)
    dit.gradient_checkpointing = cfg.gradient_checkpointing
    vae.to(device).eval().requires_grad_(False)
    text_encoder.to(device).eval().requires_grad_(False)
    schedule = NoiseSchedule()
    loss_fn = DiffusionLoss(schedule, dit.config.learn_sigma, cfg.snr_weight_cap, dit.config.prediction_type)
    opt = torch.optim.AdamW(dit.parameters(), lr=cfg.stages[0].lr, weight_decay=cfg.weight_decay)
    ema = EMA(dit, cfg.ema_decay)
    metrics = MetricsLog(run_dir, enabled=env.is_main)
    empty_emb, empty_mask = text_encoder.encode([""], device=device)            # (1, S, E), (1, S)

    start, _ = resume_from(run_dir, resume, dit, opt, ema)

    # Per-stage data: cached latents (frozen VAE) or live sources.
    caches: dict[int, tuple[LatentCache, LatentCache]] = {}

    def stage_data(i: int) -> tuple[LatentCache, LatentCache]:
        if i not in caches:
            st = cfg.stages[i]
            stills, clips = sources(st)
            key = (f"{st.height}x{st.width}x{st.frames}-n{cfg.cache_size}-s{cfg.seed}"
                   f"-z{vae.config.scaling_factor:.5g}")
            mk = lambda src: lambda: build_cache(src, vae, text_encoder, cfg.cache_size, device,  # noqa: E731
                                                 progress=progress and env.is_main)
            root = run_dir / "cache"
            # Every rank builds the same deterministic cache; only file writes race, and
            # they are atomic renames of identical content.
            img = _cached(root / f"images-{key}.pt", mk(stills))
            vid = img if st.frames == 1 else _cached(root / f"clips-{key}.pt", mk(clips))
            caches.clear()
            to = lambda c: LatentCache(c.latents.to(device), c.text.to(device), c.mask.to(device))  # noqa: E731
            caches[i] = (to(img), to(vid)) if vid is not img else (to(img),) * 2
        return caches[i]

    wrapped: dict[int, torch.nn.Module] = {}

    def model_for(i: int) -> torch.nn.Module:
        if i not in wrapped:
            _trainable(dit, cfg.stages[i].train)
            wrapped.clear()
            wrapped[i] = wrap_model(dit, env, fsdp=cfg.fsdp)
        return wrapped[i]

    world, rank = env.world_size, env.rank
    lat_per_slice = vae.config.latents_per_slice

    def step_fn(step: int) -> dict[str, float]:
        si, local = cfg.locate(step)
        st = cfg.stages[si]
        images, clips = stage_data(si)
        model = model_for(si)
        model.train()
        b = st.batch_size
        g = step_generator(cfg.seed, step)
        # 1. batch plan, identical on every rank
        is_image = st.frames == 1 or bool(torch.rand((), generator=g) < st.image_fraction)
        cache = images if is_image else clips
        full = cache.latents.shape[2]
        n_lat = full
        if not is_image and full > 1 + lat_per_slice and not bool(torch.rand((), generator=g) < st.full_length_prob):
            choices = list(range(1 + lat_per_slice, full, lat_per_slice))     # shorter 1 + 8k clips
            n_lat = choices[int(torch.randint(len(choices), (), generator=g))]
        idx = torch.randint(len(cache.latents), (b * world,), generator=g)
        drop = torch.rand(b * world, generator=g) < cfg.caption_dropout
        t = torch.randint(0, schedule.num_train_timesteps, (b * world,), generator=g)
        noise = torch.randn((b * world, *cache.latents.shape[1:2], n_lat, *cache.latents.shape[3:]), generator=g)
        share = slice(rank * b, (rank + 1) * b)
        idx = idx[share].to(device)
        x0 = cache.latents[idx][:, :, :n_lat]
        noise, t, drop = noise[share].to(device), t[share].to(device), drop[share].to(device)
        text, mask = cache.text[idx], cache.mask[idx]
        text = torch.where(drop[:, None, None], empty_emb.to(text.dtype), text)
        mask = torch.where(drop[:, None], empty_mask.to(mask.dtype), mask)
        # 2. forward / backward
        xt = schedule.add_noise(x0, noise, t)
        with autocast(device, cfg.bf16):
            out = model(xt, t, text, mask)
        loss, values = loss_fn(out, x0, xt, noise, t)
        for group in opt.param_groups:
            group["lr"] = st.lr * stage_lr_factor(st, local, cfg.warmup_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in dit.parameters() if p.grad is not None]
        values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        # EMA with a warm-up so early checkpoints are not dominated by the init.
        ema.decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        ema.update(dit)
        values.update(loss=loss.item(), lr=opt.param_groups[0]["lr"], frames=float(n_lat))
        if sample_fn is not None and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and env.is_main:
            sample_fn(dit, step + 1)
        return values

    def save_fn(done: int) -> Path | None:
        if not env.is_main:
            return None
        state = {"optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg)}
        return save_checkpoint(run_dir, done, unwrap(dit).state_dict(), state, ema=ema.state_dict())

    run_steps(start, cfg.total_steps, step_fn, save_fn, metrics, lambda s: cfg.stages[cfg.locate(s)[0]].name,
              env, cfg.checkpoint_every, cfg.log_every, progress, desc="dit")
    metrics.close()
    ema.copy_to(dit)
    dit.requires_grad_(True)
    return dit.eval()
