"""The measured effect of a LoRA: every object in one colour, whatever the prompt says.

    python benchmarks/lora_effect.py [--lora FILE] [--colour red] [--prompts 24] [--json PATH]

1. Training set (unless ``--lora`` names an existing file): clips of the shapes world's
   training split with their captions unchanged but every object rendered in
   ``--colour``; a manifest of them.
2. ``easyanimate-rt train lora`` on the shipped model (rank 4, DiT Linears).
3. The shapes evaluation's held-out prompts (``shapes.evaluate``, fixed seeds) through
   the reference pipeline with the LoRA merged by ``LoraMerger`` at weights 0, 0.25, 0.5,
   0.75, 1, and the base model: the share of videos whose object is in the LoRA's
   colour, the prompt-colour rate, direction and coherence. Weight 0 must give the base
   videos bit for bit (checked by a hash of every video).

Writes ``benchmarks/results/lora-effect-cpu.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from easyanimate_rt.cli import default_model
from easyanimate_rt.reference.lora import Adapter, LoraMerger
from easyanimate_rt.reference.pipeline import ReferencePipeline
from easyanimate_rt.shapes.evaluate import evaluate

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "lora" / "red-rank4.safetensors"
TARGET = 0.80  # share of held-out videos in the LoRA's colour at weight 1


def write_one_colour_set(out_dir: str | Path, colour: str, n: int, frames: int = 17, size: int = 64,
                         seed: int = 0) -> Path:
    """``n`` training-split clips with the object drawn in ``colour`` and the caption of
    the clip as sampled (so it names another colour five times in six); returns the manifest."""
    from easyanimate_rt.data.manifest import write_manifest
    from easyanimate_rt.media import write_clip
    from easyanimate_rt.shapes.world import allowed_backgrounds, render, sample_at

    root = Path(out_dir)
    records = []
    i = 0
    while len(records) < n:
        spec = sample_at(i, "train", seed, frames)
        i += 1
        if spec.background not in allowed_backgrounds(colour):  # never a low-contrast pair
            continue
        name = f"clips/{colour}_{i:06d}.mp4"
        write_clip(render(dataclasses.replace(spec, colour=colour), frames, size), root / name, 8)
        records.append({"path": name, "caption": spec.caption, "frames": frames, "fps": 8, "width": size,
                        "height": size, "attributes": {**spec.to_dict(), "drawn_colour": colour}})
    manifest = root / "manifest.jsonl"
    write_manifest(manifest, records)
    return manifest


class _Hashing:
    """A pipeline wrapper that keeps a sha256 of every video it returns."""

    def __init__(self, pipe):
        self.pipe, self.config, self.hashes = pipe, pipe.config, []

    def generate(self, prompt, **kw):
        out = self.pipe.generate(prompt, **kw)
        self.hashes.append(hashlib.sha256(np.ascontiguousarray(out.frames).tobytes()).hexdigest())
        return out


def measure(pipe, colour: str, prompts: int, steps: int | None = None) -> tuple[dict, list[str]]:
    wrapped = _Hashing(pipe)
    report = evaluate(wrapped, prompts, vae_clips=0, steps=steps)
    rows = report.rows
    other = [r for r in rows if not r["prompt"].split()[1:3].__contains__(colour)]
    summary = {
        "lora_colour_rate": float(np.mean([r["colour"] == colour for r in rows])),
        "lora_colour_rate_other_prompts": float(np.mean([r["colour"] == colour for r in other])) if other else None,
        "other_prompts": len(other),
        "colour_rate": report.colour_rate,
        "direction_rate": report.direction_rate,
        "coherent_rate": report.coherent_rate,
        "seconds_per_video": report.seconds_per_video,
        "colours": {c: sum(r["colour"] == c for r in rows) for c in sorted({str(r["colour"]) for r in rows})},
    }
    return summary, wrapped.hashes


def train(lora: Path, colour: str, clips: int, steps: int, work: Path, lr: float, rank: int) -> float:
    from easyanimate_rt.cli import main as cli

    manifest = write_one_colour_set(work / "data", colour, clips)
    t0 = time.perf_counter()
    rc = cli(["train", "lora", "--model", default_model(), "--manifest", str(manifest), "--rank", str(rank),
              "--run", str(work / "run"), "--out", str(lora), "--steps", str(steps), "--lr", str(lr),
              "--batch-size", "8", "--cache-size", str(clips), "--checkpoint-every", "100"])
    if rc:
        raise SystemExit(rc)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lora", default=str(FIXTURE), help="LoRA file; trained first when it does not exist")
    p.add_argument("--colour", default="red")
    p.add_argument("--clips", type=int, default=128, help="training clips (when training)")
    p.add_argument("--train-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--work", default="/tmp/lora-effect", help="training data and run folder (when training)")
    p.add_argument("--prompts", type=int, default=24, help="held-out prompts per weight")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--weights", default="0,0.25,0.5,0.75,1")
    p.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "lora-effect-cpu.json"))
    args = p.parse_args(argv)

    lora = Path(args.lora)
    train_seconds = None
    if not lora.exists():
        train_seconds = train(lora, args.colour, args.clips, args.train_steps, Path(args.work), args.lr, args.rank)
        print(f"trained {lora} in {train_seconds:.0f} s")
    pipe = ReferencePipeline.from_pretrained(default_model())
    base, base_hashes = measure(pipe, args.colour, args.prompts, args.steps)
    print(f"{'weight':>8s} {'in ' + args.colour:>10s} {'(others)':>9s} {'prompt colour':>14s} "
          f"{'direction':>10s} {'coherent':>9s}")
    print(f"{'base':>8s} {base['lora_colour_rate']:10.3f} {base['lora_colour_rate_other_prompts']:9.3f} "
          f"{base['colour_rate']:14.3f} {base['direction_rate']:10.3f} {base['coherent_rate']:9.3f}")
    merger = LoraMerger.of(pipe.model)
    curve = []
    for w in (float(x) for x in args.weights.split(",")):
        merger.merge([Adapter.open(lora, w)])
        row, hashes = measure(pipe, args.colour, args.prompts, args.steps)
        row.update(weight=w, videos_equal_base=hashes == base_hashes)
        curve.append(row)
        print(f"{w:8.2f} {row['lora_colour_rate']:10.3f} {row['lora_colour_rate_other_prompts']:9.3f} "
              f"{row['colour_rate']:14.3f} {row['direction_rate']:10.3f} {row['coherent_rate']:9.3f}"
              + ("  (videos identical to base)" if row["videos_equal_base"] else ""))
    merger.unmerge()
    one = next((r for r in curve if r["weight"] == 1.0), None)
    ok = one is None or one["lora_colour_rate"] >= TARGET
    zero = next((r for r in curve if r["weight"] == 0.0), None)
    ok &= zero is None or zero["videos_equal_base"]
    result = {"lora": str(lora.relative_to(REPO) if lora.is_relative_to(REPO) else lora),
              "lora_sha256": Adapter.open(lora).sha256, "colour": args.colour, "prompts": args.prompts,
              "target_rate_at_weight_1": TARGET, "train_seconds": train_seconds, "base": base, "curve": curve,
              "threads": torch.get_num_threads(), "ok": ok}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {args.json}; {'ok' if ok else 'BELOW TARGET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
