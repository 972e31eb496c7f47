"""``easyanimate-rt train ...``: the shapes recipe, and VAE / DiT training on a manifest.

Multi-process: launch under ``torchrun --nproc-per-node N -m easyanimate_rt train ...``
(DDP; gloo on CPU, NCCL on GPU; ``--fsdp`` for release sizes).

Before any work each command checks ``--run`` (new, empty, or a run folder of ours,
marked by ``run.json``) and ``--out`` (new, empty, or a model directory of ours, which
the new model replaces whole), and that neither lies inside the other; anything else is
an InputError (exit 2) and nothing is written.
"""

from __future__ import annotations

import argparse

from ..errors import InputError, TrainingInterrupted


def _interrupted(exc: TrainingInterrupted) -> int:
    print(f"interrupted: {exc}")
    return 130


def _train_and_save(train, model, out: str, env) -> int:
    """Run ``train()`` (which updates ``model``), then write the model directory (once:
    on the main rank)."""
    from ..reference.weights import save_model

    try:
        train()
    except TrainingInterrupted as exc:
        return _interrupted(exc)
    if env.is_main:
        save_model(model, out)
        print(f"model written to {out}")
    return 0


def cmd_train_shapes(args: argparse.Namespace) -> int:
    from .recipe import ShapesRecipe, train_shapes

    recipe = ShapesRecipe(scale=args.scale, seed=args.seed)
    try:
        # train_shapes checks --run and --out before it does anything else.
        out = train_shapes(args.out, args.run, recipe, resume=not args.no_resume,
                           phases=tuple(args.phases.split(",")))
    except TrainingInterrupted as exc:
        return _interrupted(exc)
    print(f"model written to {out}" if out else f"phases {args.phases} done; checkpoints in {args.run}")
    return 0


def cmd_train_vae(args: argparse.Namespace) -> int:
    from .common import claim_run_and_model, init_distributed, start_run

    # Before any work: --out is only written when training ends, possibly hours from now.
    claim_run_and_model(args.run, args.out)
    from ..reference.weights import load_model_or_preset
    from .datasets import ManifestDataset
    from .vae_trainer import VAETrainConfig, train_vae

    model = load_model_or_preset(args.model)
    h = w = args.size
    stills = ManifestDataset(args.manifest, 1, h, w)
    clips = ManifestDataset(args.manifest, args.frames, h, w)
    cfg = VAETrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, decoder_only=args.decoder_only,
                         gan_start=args.gan_start, lpips_path=args.lpips, seed=args.seed,
                         checkpoint_every=args.checkpoint_every, bf16=args.bf16)
    env = init_distributed()
    start_run(args.run, env, "train vae")

    def train() -> None:
        model.vae = train_vae(model.vae, stills, clips, cfg, args.run, env=env, resume=not args.no_resume)

    return _train_and_save(train, model, args.out, env)


def cmd_train_dit(args: argparse.Namespace) -> int:
    from .common import claim_run_and_model, init_distributed, start_run

    # Before any work: --out is only written when training ends, possibly hours from now.
    claim_run_and_model(args.run, args.out)
    from ..reference.weights import load_model_or_preset, load_pixart_backbone
    from .datasets import ManifestDataset
    from .dit_trainer import DiTStage, DiTTrainConfig, train_dit

    f, s, lr, b = args.frames, args.size, args.lr, args.batch_size
    for option in ("image_steps", "lowres_steps", "video_steps"):
        if getattr(args, option) < 0:
            raise InputError(f"--{option.replace('_', '-')} must be >= 0, got {getattr(args, option)}")
    stages = []  # a stage given 0 steps is left out
    if args.image_steps:
        stages.append(DiTStage("1-images", args.image_steps, s, s, frames=1, lr=lr, batch_size=b))
    if args.lowres_steps:
        stages.append(DiTStage("2-video-lowres", args.lowres_steps, s // 2, s // 2, frames=f, image_fraction=0.1,
                               train="motion" if args.motion_only else "all", lr=lr, batch_size=b))
    if args.video_steps:
        stages.append(DiTStage("3-video", args.video_steps, s, s, frames=f, image_fraction=0.1, lr=lr,
                               batch_size=b))
    if not stages:
        raise InputError("at least one of --image-steps, --lowres-steps, --video-steps must be > 0")
    cfg = DiTTrainConfig(stages=tuple(stages), seed=args.seed, checkpoint_every=args.checkpoint_every,
                         bf16=args.bf16, gradient_checkpointing=args.grad_checkpointing, fsdp=args.fsdp,
                         cache_size=args.cache_size)
    model = load_model_or_preset(args.model)
    if args.pixart:
        load_pixart_backbone(model.dit, args.pixart)

    def sources(stage: DiTStage):
        return (ManifestDataset(args.manifest, 1, stage.height, stage.width),
                ManifestDataset(args.manifest, stage.frames, stage.height, stage.width))

    sources(stages[0])  # a bad manifest fails here, before the run folder is made
    env = init_distributed()
    start_run(args.run, env, "train dit")

    def train() -> None:
        model.dit = train_dit(model.dit, model.vae, model.text_encoder, sources, cfg, args.run, env=env,
                              resume=not args.no_resume)

    return _train_and_save(train, model, args.out, env)


def cmd_train_lora(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .common import claim_run_dir, init_distributed, start_run
    from .lora_trainer import LoraTrainConfig, check_lora_out, clip_frames, save_lora, train_lora

    # Before any work: every option, the run folder and the file written at the end.
    cfg = LoraTrainConfig(rank=args.rank, alpha=args.alpha, motion_module=args.motion_module,
                          text_encoder=args.text_encoder, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                          cache_size=args.cache_size, seed=args.seed, checkpoint_every=args.checkpoint_every,
                          bf16=args.bf16)
    if args.frames is not None:
        clip_frames(args.frames)
    if args.size is not None and (args.size < 8 or args.size % 8):
        raise InputError(f"--size must be a multiple of 8 and >= 8, got {args.size}")
    if not Path(args.model).is_dir():
        from ..reference.config import preset_name

        preset_name(args.model)  # a missing model directory (or unknown preset) fails here
    run = claim_run_dir(args.run)
    out = check_lora_out(args.out)
    if run.resolve() == out.resolve() or run.resolve() in out.resolve().parents:
        raise InputError(f"--out {out} must not lie inside the run folder --run {run} (its checkpoints are "
                         f"pruned); nothing was written")
    if not Path(args.manifest).is_file():
        raise InputError(f"--manifest {args.manifest}: file not found")
    from ..reference.weights import load_model_or_preset
    from .datasets import ManifestDataset

    model = load_model_or_preset(args.model)
    sampling = model.config.sampling
    size = args.size or sampling.height
    source = ManifestDataset(args.manifest, args.frames or sampling.frames, size, size)
    env = init_distributed()
    start_run(args.run, env, "train lora")
    try:
        network = train_lora(model, source, cfg, args.run, env=env, resume=not args.no_resume)
    except TrainingInterrupted as exc:
        return _interrupted(exc)
    if env.is_main:
        save_lora(network, out, cfg, metadata={"ss_base_model": model.config.name})
        print(f"LoRA written to {out} (rank {cfg.rank}, alpha {cfg.alpha or cfg.rank:g}, "
              f"{len(network.targets)} modules)")
    return 0


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train models (shapes recipe, VAE, DiT, LoRA)")
    tsub = p.add_subparsers(dest="train_command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run", required=True,
                        help="run folder: checkpoints, metrics.csv, caches (new, empty, or a run of ours to resume)")
    common.add_argument("--out", required=True,
                        help="model directory to write at the end (new, empty, or a model of ours to replace)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --run")

    q = tsub.add_parser("shapes", parents=[common], help="train the shipped shapes model end to end")
    q.add_argument("--scale", type=float, default=1.0, help="multiply every step count (0.01 = smoke run)")
    q.add_argument("--phases", default="vae,dit", help="vae,dit (default) or vae: stop after the VAE")
    q.set_defaults(func=cmd_train_shapes)

    manifest = argparse.ArgumentParser(add_help=False)
    manifest.add_argument("--manifest", required=True, help="JSONL manifest (data pipeline output)")
    manifest.add_argument("--model", required=True, help="model directory or preset to start from")
    manifest.add_argument("--size", type=int, default=256, help="training resolution (square)")
    manifest.add_argument("--frames", type=int, default=25, help="clip length, 1 + 8k")
    manifest.add_argument("--batch-size", type=int, default=4)
    manifest.add_argument("--checkpoint-every", type=int, default=500)
    manifest.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")

    q = tsub.add_parser("vae", parents=[common, manifest], help="train the Slice VAE on a manifest")
    q.add_argument("--steps", type=int, default=10000)
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--decoder-only", action="store_true", help="stage 2: freeze the encoder")
    q.add_argument("--gan-start", type=int, default=None, help="step at which the GAN loss switches on")
    q.add_argument("--lpips", help="local LPIPS weights file (VGG16)")
    q.set_defaults(func=cmd_train_vae)

    q = tsub.add_parser("dit", parents=[common, manifest], help="train the DiT (three stages) on a manifest")
    q.add_argument("--pixart", help="PixArt-alpha transformer (diffusers layout) to initialise the backbone")
    q.add_argument("--image-steps", type=int, default=1000)
    q.add_argument("--lowres-steps", type=int, default=1000)
    q.add_argument("--video-steps", type=int, default=2000)
    q.add_argument("--motion-only", action="store_true", help="stage 2 trains only motion modules and skips")
    q.add_argument("--lr", type=float, default=2e-5)
    q.add_argument("--cache-size", type=int, default=512)
    q.add_argument("--grad-checkpointing", action="store_true")
    q.add_argument("--fsdp", action="store_true", help="FSDP instead of DDP under torchrun")
    q.set_defaults(func=cmd_train_dit)

    q = tsub.add_parser("lora", help="train a LoRA (kohya/upstream format) on a frozen model and a manifest")
    q.add_argument("--model", required=True, help="model directory (or preset) the LoRA adapts; kept frozen")
    q.add_argument("--manifest", required=True, help="JSONL manifest (data pipeline output)")
    q.add_argument("--rank", type=int, required=True, help="LoRA rank (>= 1)")
    q.add_argument("--alpha", type=float, default=None, help="LoRA alpha; scale = alpha / rank (default: rank)")
    q.add_argument("--run", required=True,
                   help="run folder: checkpoints, metrics.csv, caches (new, empty, or a run of ours to resume)")
    q.add_argument("--out", required=True,
                   help="LoRA .safetensors to write at the end (new, or a LoRA this command wrote)")
    q.add_argument("--motion-module", action="store_true", help="adapt the motion modules too")
    q.add_argument("--text-encoder", action="store_true", help="adapt the T5 encoder's Linears too")
    q.add_argument("--steps", type=int, default=1000)
    q.add_argument("--lr", type=float, default=1e-4)
    q.add_argument("--size", type=int, default=None, help="training resolution (default: the model's)")
    q.add_argument("--frames", type=int, default=None, help="clip length, 1 + 8k (default: the model's)")
    q.add_argument("--batch-size", type=int, default=4)
    q.add_argument("--cache-size", type=int, default=512, help="clips encoded once and trained on")
    q.add_argument("--checkpoint-every", type=int, default=200)
    q.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--no-resume", action="store_true", help="ignore checkpoints in --run")
    q.set_defaults(func=cmd_train_lora)


__all__ = ["add_train_parser"]
