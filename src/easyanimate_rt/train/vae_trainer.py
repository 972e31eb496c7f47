"""Slice VAE training (DESIGN.md 2): L1 reconstruction + KL (weight 1e-6) with a learned
log-variance; optional LPIPS (local weights only) and hinge GAN (2-D frame PatchGAN +
3-D clip discriminator, adaptive weight, switched on at ``gan_start``). Stage 1 trains
the whole VAE, stage 2 (``decoder_only``) the decoder with the encoder frozen.

Batches are all images (1 frame) or all clips of odd length (1 + 8k), so both the image
path and the video path of the slice encoder/decoder learn.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F_
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..reference.vae import SliceVAE
from .common import (DistEnv, MetricsLog, autocast, init_distributed, lr_factor, resume_from, run_steps,
                     save_checkpoint, step_generator, unwrap, wrap_model)
from .losses import (LPIPS, ClipDiscriminator3D, FramePatchGAN, adaptive_gan_weight, hinge_d_loss,
                     kl_standard_normal, reconstruction_loss)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VAETrainConfig:
    steps: int = 2000
    batch_size: int = 4
    lr: float = 1e-4
    decay_fraction: float = 0.0        # the lr decays linearly to 0 over this last share of steps
    betas: tuple[float, float] = (0.5, 0.9)
    kl_weight: float = 1e-6
    mse_weight: float = 0.0            # extra L2 term: small objects on flat backgrounds
    foreground_weight: float = 0.0     # extra weight of object pixels (see reconstruction_loss)
    image_fraction: float = 0.25       # share of steps whose batch is single images
    decoder_only: bool = False         # stage 2: encoder frozen
    gan_start: int | None = None       # step at which the GAN loss switches on; None = never
    gan_weight: float = 0.5
    lpips_path: str | None = None
    lpips_weight: float = 0.1
    grad_clip: float = 1.0
    crop: int | None = None            # random square crops (multiple of 8): cheaper steps
    seed: int = 0
    checkpoint_every: int = 200
    log_every: int = 10
    bf16: bool = False                 # autocast on GPU

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"VAETrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.crop is not None and (self.crop < 8 or self.crop % 8):
            raise ConfigError(f"VAETrainConfig.crop must be a multiple of 8, got {self.crop}")
        if self.mse_weight < 0 or self.foreground_weight < 0:
            raise ConfigError("VAETrainConfig.mse_weight and foreground_weight must be >= 0, got "
                              f"{self.mse_weight} and {self.foreground_weight}")
        if not 0.0 <= self.decay_fraction <= 1.0:
            raise ConfigError(f"VAETrainConfig.decay_fraction must be in [0, 1], got {self.decay_fraction}")
        if not 0.0 <= self.image_fraction <= 1.0:
            raise ConfigError(f"VAETrainConfig.image_fraction must be in [0, 1], got {self.image_fraction}")


def _batch(source: Dataset, indices: list[int], device: torch.device) -> torch.Tensor:
    return torch.stack([source[i]["video"] for i in indices]).to(device)     # (B, 3, F, H, W)


def train_vae(vae: SliceVAE, stills: Dataset, clips: Dataset, cfg: VAETrainConfig, run_dir: str | Path,
              env: DistEnv | None = None, resume: bool = True, progress: bool = True) -> SliceVAE:
    """Train ``vae`` in place; checkpoints under ``run_dir``. Returns the trained VAE."""
    env = env or init_distributed()
    run_dir = Path(run_dir)
    vae.to(env.device).train()
    model = wrap_model(vae, env)
    vae.requires_grad_(True)  # an earlier decoder-only stage on this module froze the encoder
    if cfg.decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas)
    use_gan = cfg.gan_start is not None
    discs = torch.nn.ModuleList([FramePatchGAN(), ClipDiscriminator3D()]).to(env.device) if use_gan else None
    opt_d = torch.optim.Adam(discs.parameters(), lr=cfg.lr, betas=cfg.betas) if use_gan else None
    lpips = LPIPS(cfg.lpips_path).to(env.device) if cfg.lpips_path else None
    metrics = MetricsLog(run_dir, enabled=env.is_main)

    start, state = resume_from(run_dir, resume, vae, opt)
    if use_gan and state is not None and "discriminators" in state:
        discs.load_state_dict(state["discriminators"])
        opt_d.load_state_dict(state["optimizer_d"])

    world, rank, b = env.world_size, env.rank, cfg.batch_size

    def step_fn(step: int) -> dict[str, float]:
        lr = cfg.lr * lr_factor(step, cfg.steps, decay_fraction=cfg.decay_fraction)
        for group in opt.param_groups:  # the config, not a resumed checkpoint, sets the rate
            group["lr"] = lr
        g = step_generator(cfg.seed, step)
        is_image = bool(torch.rand((), generator=g) < cfg.image_fraction)
        source = stills if is_image else clips
        # The global batch is drawn identically on every rank; each rank takes its share.
        indices = torch.randint(len(source), (b * world,), generator=g).tolist()[rank * b:(rank + 1) * b]
        video = _batch(source, indices, env.device)
        if cfg.crop is not None and cfg.crop < min(video.shape[-2:]):
            # The VAE is convolutional (mid-block attention aside): crops teach the same
            # local reconstruction at a fraction of the cost of whole frames.
            top = int(torch.randint(video.shape[-2] - cfg.crop + 1, (), generator=g))
            left = int(torch.randint(video.shape[-1] - cfg.crop + 1, (), generator=g))
            video = video[..., top:top + cfg.crop, left:left + cfg.crop]
        noise_gen = step_generator(cfg.seed, step, rank, stream=1)
        # A frozen encoder (stage 2) builds no graph: its parameters need no grad.
        # CPU noise generators make the posterior sample resume-exact; CUDA uses its own RNG.
        with autocast(env.device, cfg.bf16):
            rec, mean, logvar = model(video, generator=None if env.device.type == "cuda" else noise_gen)
        rec = rec.float()
        # L1 alone is median-seeking: with a small object on a flat background the decoder
        # first learns to paint the background only; L2 and the foreground weight pull
        # the object (and its hue) in.
        rec_loss = reconstruction_loss(rec, video, cfg.mse_weight, cfg.foreground_weight)
        kl = kl_standard_normal(mean.float(), logvar.float())
        loss = rec_loss + cfg.kl_weight * kl
        values = {"l1": F_.l1_loss(rec, video).item(), "kl": kl.item()}
        if lpips is not None:
            frames_a = rec.transpose(1, 2).flatten(0, 1)
            frames_b = video.transpose(1, 2).flatten(0, 1)
            p = lpips(frames_a, frames_b)
            loss = loss + cfg.lpips_weight * p
            values["lpips"] = p.item()
        gan_on = use_gan and step >= cfg.gan_start
        if gan_on:
            discs.requires_grad_(False)
            g_loss = -(discs[0](rec).mean() + discs[1](rec).mean())
            w = adaptive_gan_weight(loss, g_loss, vae.decoder.conv_out.weight, cfg.gan_weight)
            loss = loss + w * g_loss
            values.update(g_loss=g_loss.item(), gan_w=float(w))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        values["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        opt.step()
        if gan_on:
            discs.requires_grad_(True)
            d_loss = hinge_d_loss(discs[0](video), discs[0](rec.detach())) + \
                hinge_d_loss(discs[1](video), discs[1](rec.detach()))
            opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if env.distributed:
                for p in discs.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt_d.step()
            values["d_loss"] = d_loss.item()
        values["loss"] = loss.item()
        return values

    def save_fn(done: int) -> Path | None:
        if not env.is_main:
            return None
        state = {"optimizer": opt.state_dict(), "config": dataclasses.asdict(cfg)}
        if use_gan:
            state.update(discriminators=discs.state_dict(), optimizer_d=opt_d.state_dict())
        return save_checkpoint(run_dir, done, unwrap(model).state_dict(), state)

    stage = "vae-decoder" if cfg.decoder_only else "vae"
    run_steps(start, cfg.steps, step_fn, save_fn, metrics, lambda s: stage, env,
              cfg.checkpoint_every, cfg.log_every, progress, desc=stage)
    metrics.close()
    return vae.eval()
