"""The recipe that trains the shipped ``shapes`` model end to end.

1. tokenizer: sentencepiece trained on every caption the synthetic world can make;
2. text encoder: a small T5 with random weights, frozen (the DiT learns to read it);
3. Slice VAE: stage 1 whole VAE, stage 2 decoder only, stage 3 whole VAE again with
   object pixels weighted (``reconstruction_loss``), so hues survive in the latent;
4. DiT: the paper's three stages (images; low-resolution video; full video);
5. the model directory (EMA DiT weights), written atomically.

Each phase keeps its own checkpoints under RUN/, so an interrupted recipe resumes where
it stopped (``--resume``) and finished phases are not redone. RUN and OUT are checked
before any work: each new, empty or written by this package (``common.claim_run_and_model``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..fileio import atomic_write_text
from ..reference.config import ModelConfig, from_preset
from ..reference.dit import VideoDiT
from ..reference.text import TextEncoder, load_tokenizer, train_tokenizer
from ..reference.vae import SliceVAE
from ..reference.weights import EasyAnimateModel, save_model
from .common import DistEnv, claim_run_and_model, init_distributed, start_run
from .dit_trainer import DiTStage, DiTTrainConfig, train_dit
from .vae_trainer import VAETrainConfig, train_vae

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShapesRecipe:
    """Step counts and batch sizes; ``scale`` multiplies every step count (0.01 = smoke)."""

    preset: str = "shapes"
    size: int = 64
    frames: int = 17
    vae_steps: int = 7000
    vae_decoder_steps: int = 500
    vae_batch: int = 4
    vae_lr: float = 3e-4               # small VAE trained from scratch: above the paper's 1e-4
    vae_mse_weight: float = 2.0        # L1 alone learns the background before the objects
    vae_clip_frames: int = 9
    vae_object_steps: int = 3000       # stage 3: object pixels weighted, so hues survive encoding
    vae_object_lr: float = 1e-4
    vae_foreground_weight: float = 10.0
    dit_image_steps: int = 2000
    dit_lowres_steps: int = 1000
    dit_video_steps: int = 15000
    dit_batch: int = 16
    dit_lr: float = 3e-4               # from-scratch backbone, small model: higher than PixArt's 2e-5
    cache_size: int = 2048
    scale_clips: int = 64              # clips that set the latent scaling factor
    seed: int = 0
    scale: float = 1.0

    def steps(self, n: int) -> int:
        return max(1, round(n * self.scale))


def train_shapes(out_dir: str | Path, run_dir: str | Path, recipe: ShapesRecipe = ShapesRecipe(),
                 env: DistEnv | None = None, resume: bool = True, progress: bool = True,
                 phases: tuple[str, ...] = ("vae", "dit")) -> Path | None:
    """Run the recipe; returns the model directory (None when ``phases`` stops before
    the DiT, e.g. to train the VAE on one machine and the DiT on another)."""
    from ..shapes.world import caption_corpus
    from .datasets import shapes_sources

    # Before any work: the run folder and the model directory must each be new, empty or
    # ours (the model replaces out_dir whole, possibly hours from now).
    run_dir, out_dir = claim_run_and_model(run_dir, out_dir)
    env = env or init_distributed()
    start_run(run_dir, env, "train shapes")
    run_dir.mkdir(parents=True, exist_ok=True)
    config: ModelConfig = from_preset(recipe.preset)
    times: dict[str, float] = {}
    torch.manual_seed(recipe.seed)

    # 1-2. tokenizer and frozen text encoder
    t0 = time.perf_counter()
    tok_dir = run_dir / "tokenizer"
    if not (tok_dir / "spiece.model").exists():
        train_tokenizer(caption_corpus() + [""], tok_dir, vocab_size=config.text_encoder.vocab_size)
    text_dir = run_dir / "text_encoder"
    if (text_dir / "config.json").exists():
        text = TextEncoder.from_pretrained(text_dir, tok_dir, config.text_encoder)
    else:
        torch.manual_seed(recipe.seed)
        text = TextEncoder(config.text_encoder, load_tokenizer(tok_dir))
        text.model.save_pretrained(str(text_dir), safe_serialization=True)

    # 3. VAE
    vae = SliceVAE(config.vae)
    stills, clips = shapes_sources(recipe.vae_clip_frames, recipe.size, 100_000, recipe.seed)
    s1 = VAETrainConfig(steps=recipe.steps(recipe.vae_steps), batch_size=recipe.vae_batch, lr=recipe.vae_lr,
                        mse_weight=recipe.vae_mse_weight, seed=recipe.seed,
                        checkpoint_every=100, log_every=10)
    vae = train_vae(vae, stills, clips, s1, run_dir / "vae", env, resume, progress)
    s2 = dataclasses.replace(s1, steps=recipe.steps(recipe.vae_decoder_steps), decoder_only=True,
                             seed=recipe.seed + 1, image_fraction=0.25)
    # Stage 2 starts from stage 1's weights (loaded above) unless it has its own checkpoint.
    vae = train_vae(vae, stills, clips, s2, run_dir / "vae_decoder", env, resume, progress)
    # Small objects are a few percent of the pixels: after stages 1-2 the encoder maps
    # orange and yellow (or green and red) objects on white to nearly the same latent.
    s3 = dataclasses.replace(s1, steps=recipe.steps(recipe.vae_object_steps), lr=recipe.vae_object_lr,
                             foreground_weight=recipe.vae_foreground_weight, decay_fraction=0.2)
    vae = train_vae(vae, stills, clips, s3, run_dir / "vae_object", env, resume, progress)
    times["vae"] = time.perf_counter() - t0
    if "dit" not in phases:
        return None
    # The diffusion schedule assumes unit-variance data: measure this VAE's latent scale
    # (the release VAE's 0.18215 is specific to it) and store it in the config.
    scale = latent_scaling_factor(vae, clips, recipe.scale_clips)
    vae.config = dataclasses.replace(vae.config, scaling_factor=scale)
    config = dataclasses.replace(config, vae=vae.config)
    log.info("latent scaling factor %.5f", scale)

    # 4. DiT, three stages
    t1 = time.perf_counter()
    dit = VideoDiT(config.dit)
    low = recipe.size // 2
    stages = (
        DiTStage("1-images", recipe.steps(recipe.dit_image_steps), recipe.size, recipe.size, frames=1,
                 lr=recipe.dit_lr, batch_size=recipe.dit_batch * 2),
        DiTStage("2-video-lowres", recipe.steps(recipe.dit_lowres_steps), low, low, frames=recipe.frames,
                 image_fraction=0.1, train="all", lr=recipe.dit_lr, batch_size=recipe.dit_batch),
        DiTStage("3-video", recipe.steps(recipe.dit_video_steps), recipe.size, recipe.size,
                 frames=recipe.frames, image_fraction=0.1, lr=recipe.dit_lr, batch_size=recipe.dit_batch,
                 decay_fraction=0.2),
    )
    dcfg = DiTTrainConfig(stages=stages, warmup_steps=min(100, stages[0].steps), ema_decay=0.995,
                          cache_size=recipe.cache_size, seed=recipe.seed, checkpoint_every=100, log_every=10)

    def sources(stage: DiTStage):
        return shapes_sources(stage.frames, stage.height, recipe.cache_size, recipe.seed + 7)

    dit = train_dit(dit, vae, text, sources, dcfg, run_dir / "dit", env, resume, progress)
    times["dit"] = time.perf_counter() - t1

    # 5. the model directory
    model = EasyAnimateModel(config, text, vae.cpu().float(), dit.cpu().float())
    if env.is_main:
        save_model(model, out_dir)
        atomic_write_text(run_dir / "recipe.json", json.dumps(
            {"recipe": dataclasses.asdict(recipe), "seconds": times, "threads": torch.get_num_threads(),
             "device": str(env.device)}, indent=2))
    return out_dir


@torch.no_grad()
def latent_scaling_factor(vae: SliceVAE, clips, n: int) -> float:
    """1 / std of the unscaled posterior means of the first ``n`` clips (rounded to 5
    significant digits), so that scaled latents have unit variance."""
    device = next(vae.parameters()).device
    means = [vae.encode_posterior(clips[i]["video"][None].to(device))[0] for i in range(min(n, len(clips)))]
    std = float(torch.cat([m.flatten() for m in means]).float().std())
    return float(f"{1.0 / std:.5g}")
