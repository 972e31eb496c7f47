"""Pieces every training loop shares: distributed setup, EMA, learning-rate warm-up,
checkpoints that survive interruption, stop signals, metric logs.

Checkpoint layout (one folder per saved step, written under a temporary name and
renamed, then ``latest`` is replaced atomically)::

    RUN/checkpoints/step-000120/  weights.safetensors (+ ema.safetensors)
                                  state.pt  (optimizer, scheduler, RNG, step, extras)
    RUN/checkpoints/latest        text file naming the newest complete folder
    RUN/metrics.csv               one row per logged step
    RUN/run.json                  the marker that makes RUN recognisably a run folder

A command trains only into a run folder it can recognise as its own (new, empty, or
marked) and only writes a model directory over one of ours: checkpoints are pruned and
the model directory is replaced whole, so a folder of the user's must never be either.

Resuming restores every piece of state; together with data and noise that are pure
functions of (seed, step, rank), a run interrupted at step k and resumed reaches the
same weights at step n as an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import InputError, TrainingInterrupted
from ..fileio import atomic_path, atomic_write_text, claim_dir, staged_dir
from ..reference.config import CONFIG_NAME, is_model_dir

log = logging.getLogger(__name__)


# --- distributed -------------------------------------------------------------------------

@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> DistEnv:
    """Join the process group when launched by ``torchrun`` (WORLD_SIZE > 1): NCCL on
    GPUs, gloo on CPU. A single process needs no group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world, local, dev)


def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool = False) -> nn.Module:
    """DDP (default) or FSDP for release sizes; unchanged for one process."""
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=env.device if env.device.type == "cuda" else None)
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


def unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


# --- optimisation helpers -------------------------------------------------------------------

class EMA:
    """Exponential moving average of a module's floating-point parameters."""

    def __init__(self, module: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: p.detach().clone().float() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        params = [p.detach().float() for _, p in module.named_parameters()]
        torch._foreach_lerp_(list(self.shadow.values()), params, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k in self.shadow:
            self.shadow[k].copy_(state[k])

    @torch.no_grad()
    def copy_to(self, module: nn.Module) -> None:
        for k, p in module.named_parameters():
            p.copy_(self.shadow[k].to(p.dtype))


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, rank, stream), so every random
    draw of a step is reproduced exactly after a resume."""
    mixed = (seed * 1_000_003 + step * 7_919 + rank * 104_729 + stream * 15_485_863) % (2**63 - 1)
    return torch.Generator("cpu").manual_seed(mixed)


# --- stop signals ---------------------------------------------------------------------------

class StopFlag:
    """Turns SIGTERM/SIGINT into a flag the loop checks between steps, so an interrupted
    run saves a checkpoint before it exits instead of dying mid-step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                pass
        return self

    def _handle(self, signum, frame) -> None:
        log.warning("signal %d received: saving a checkpoint and stopping", signum)
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --- checkpoints ----------------------------------------------------------------------------

def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def save_checkpoint(run_dir: str | Path, step: int, weights: dict[str, torch.Tensor],
                    state: dict[str, Any], ema: dict[str, torch.Tensor] | None = None,
                    keep: int = 2) -> Path:
    """Write ``checkpoints/step-N`` atomically and point ``latest`` at it."""
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    with staged_dir(final) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
        if ema is not None:
            save_file({k: v.contiguous().cpu() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
        torch.save({**state, "step": step, "rng": _rng_state()}, tmp / "state.pt")
    atomic_write_text(root / "latest", final.name + "\n")
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    root = Path(run_dir) / "checkpoints"
    pointer = root / "latest"
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    return path if (path / "state.pt").exists() else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any],
                                               dict[str, torch.Tensor] | None]:
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / "weights.safetensors"))
    ema = load_file(str(path / "ema.safetensors")) if (path / "ema.safetensors").exists() else None
    state = torch.load(path / "state.pt", weights_only=False)
    torch.set_rng_state(state["rng"]["torch"])
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return weights, state, ema


def resume_from(run_dir: str | Path, resume: bool, module: nn.Module, optimizer: torch.optim.Optimizer,
                ema: "EMA | None" = None) -> tuple[int, dict[str, Any] | None]:
    """Load the latest checkpoint of ``run_dir`` (when ``resume``) into ``module``,
    ``optimizer`` and ``ema`` (and the RNG); return (the step to start from, the saved
    state, for whatever else the trainer keeps in it), or (0, None)."""
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is None:
        return 0, None
    weights, state, ema_state = load_checkpoint(ckpt)
    module.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    if ema is not None and ema_state is not None:
        ema.load_state_dict(ema_state)
    log.info("resumed %s training from %s (step %d)", type(module).__name__, ckpt, state["step"])
    return int(state["step"]), state


# --- the run folder and the model directory ----------------------------------------------

RUN_MARKER = "run.json"
RUN_KIND = "easyanimate-rt training run"
#: Files that mark a run folder of ours: the marker; for runs made before it existed, the
#: checkpoint pointer of `train vae|dit` and of the first phase of `train shapes`.
RUN_MARKERS = (RUN_MARKER, "checkpoints/latest", "vae/checkpoints/latest")


def _has_checkpoint(run_dir: Path) -> bool:
    try:
        return latest_checkpoint(run_dir) is not None
    except (OSError, ValueError):  # a `latest` that is a folder, binary, ...: not our pointer
        return False


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` is a run folder this package wrote: its ``run.json`` says so, or
    (a run from before the marker) it holds a checkpoint that resumes."""
    path = Path(path)
    try:
        info = json.loads((path / RUN_MARKER).read_text())
        if isinstance(info, dict) and info.get("kind") == RUN_KIND:
            return True
    except (OSError, ValueError):
        pass
    return _has_checkpoint(path) or _has_checkpoint(path / "vae")


def claim_run_dir(path: str | Path, option: str = "--run") -> Path:
    """An InputError, before any work, unless ``path`` is new, empty or a run folder of
    ours (:func:`is_run_dir`): training prunes ``checkpoints/step-*`` and appends to
    ``metrics.csv`` there."""
    return claim_dir(path, RUN_MARKERS, "training run folder", option, is_ours=is_run_dir)


def claim_model_dir(path: str | Path, option: str = "--out") -> Path:
    """An InputError, before any work, unless ``path`` is new, empty or a model directory
    of ours (its ``easyanimate_rt.json`` parses as a model config): writing a model
    replaces the directory whole."""
    return claim_dir(path, (CONFIG_NAME,), "model directory", option, is_ours=is_model_dir)


def claim_run_and_model(run_dir: str | Path, out_dir: str | Path) -> tuple[Path, Path]:
    """Check both folders of a training command before it does any work (the model
    directory is written at the end, possibly hours later): each new, empty or ours, and
    neither inside the other, since writing the model replaces ``out_dir`` whole."""
    run, out = claim_run_dir(run_dir), claim_model_dir(out_dir)
    r, o = run.resolve(), out.resolve()
    if r == o or r in o.parents or o in r.parents:
        raise InputError(f"--run {run} and --out {out} must be two separate folders, neither inside the other: "
                         f"the model directory --out is replaced whole when training ends, the run folder --run "
                         f"keeps the checkpoints to resume from; nothing was written")
    return run, out


def start_run(run_dir: str | Path, env: DistEnv, command: str) -> Path:
    """Claim ``run_dir`` (:func:`claim_run_dir`) and, on the main rank, mark it with
    ``run.json`` (once: a resumed run keeps its marker)."""
    run_dir = claim_run_dir(run_dir)
    if env.distributed:
        dist.barrier()  # every rank has checked the folder before any rank writes to it
    if env.is_main and not (run_dir / RUN_MARKER).exists():
        created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        atomic_write_text(run_dir / RUN_MARKER, json.dumps(
            {"format": 1, "kind": RUN_KIND, "command": command, "created": created}, indent=2) + "\n")
    return run_dir


# --- metrics --------------------------------------------------------------------------------

class MetricsLog:
    """Append rows to ``metrics.csv`` (and TensorBoard when it is installed)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.enabled = enabled
        self._fields: list[str] | None = None
        self._tb = None
        if enabled and tensorboard:
            with contextlib.suppress(ImportError):
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, step: int, stage: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, "stage": stage, **{k: f"{v:.6g}" for k, v in values.items()}}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self._fields is None:
            self._fields = self._existing_header() or list(row)
        if any(k not in self._fields for k in row):
            # A new metric (e.g. the GAN switching on): widen the header, keep the rows.
            self._fields += [k for k in row if k not in self._fields]
            self._rewrite()
        new = not self.path.exists()
        with self.path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{stage}/{k}", v, step)

    def _existing_header(self) -> list[str] | None:
        if not self.path.exists():
            return None
        with self.path.open(newline="") as f:
            return next(csv.reader(f), None)

    def _rewrite(self) -> None:
        if not self.path.exists():
            return
        with self.path.open(newline="") as f:
            rows = list(csv.DictReader(f))
        with atomic_path(self.path) as tmp, tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self._fields, restval="")
            writer.writeheader()
            writer.writerows(rows)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on GPU when asked; a no-op context otherwise."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def all_reduce_mean(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    if not env.distributed:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / env.world_size for k, v in zip(values, t)}


# --- the step loop --------------------------------------------------------------------------

def lr_factor(step: int, steps: int, warmup_steps: int = 0, decay_fraction: float = 0.0) -> float:
    """Learning-rate multiplier at 0-based ``step`` of ``steps``: linear warm-up over the
    first ``warmup_steps``, constant, then linear decay to 0 over the last
    ``decay_fraction`` of the steps."""
    warm = min(1.0, (step + 1) / max(1, warmup_steps))
    decay_steps = round(steps * decay_fraction)
    if decay_steps == 0:
        return warm
    return warm * min(1.0, (steps - step) / decay_steps)


def run_steps(start: int, end: int, step_fn, save_fn, metrics: MetricsLog, stage_of, env: DistEnv,
              checkpoint_every: int, log_every: int, progress: bool = True, desc: str = "train") -> int:
    """Run ``step_fn(step) -> metrics`` for steps [start, end).

    Saves through ``save_fn(step_count) -> Path`` every ``checkpoint_every`` steps, at the
    end, and when SIGTERM/SIGINT arrives (then raises :class:`TrainingInterrupted`).
    Shows a progress bar with the loss and speed on the main rank; logs metrics to CSV.
    """
    import time

    from tqdm import tqdm

    bar = tqdm(total=end, initial=start, desc=desc, unit="step", disable=not (progress and env.is_main),
               dynamic_ncols=True)
    last_saved = start
    t0 = time.perf_counter()
    with StopFlag() as stop:
        for step in range(start, end):
            values = step_fn(step)
            done = step + 1
            bar.update(1)
            if done % log_every == 0 or done == end:
                values = all_reduce_mean(values, env)
                values["sec_per_step"] = (time.perf_counter() - t0) / max(1, done - start)
                bar.set_postfix(loss=f"{values.get('loss', float('nan')):.4f}", stage=stage_of(step))
                if env.is_main:
                    metrics.write(done, stage_of(step), values)
            if stop.requested:
                path = save_fn(done)
                bar.close()
                raise TrainingInterrupted(done, path)
            if done % checkpoint_every == 0 and done != end:
                save_fn(done)
                last_saved = done
    bar.close()
    if last_saved != end:
        save_fn(end)
    return end
