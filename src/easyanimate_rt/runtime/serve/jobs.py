"""What a job is and how one runs: the request body and its rules (the runtime's own,
plus the server's limits), the work of one job on a Pipeline, and the worker loop that
takes jobs from the store in order.

A job's work is the same wherever it runs (a local worker thread, a Ray Serve
replica): ``run_job`` on a Pipeline, reporting each step (the reply says whether to
stop) and handing over a LoopState every ``every`` steps. The loop that feeds it
(``WorkerLoop``) is the only code that writes a job's state to the store.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from ...engines.budget import check_budget
from ...errors import CheckpointError, ConfigError, EasyAnimateError, InputError
from ...reference.config import ModelConfig
from ...reference.request import GenerationRequest, default_request
from ..loop_state import LoopState
from .store import JobStore

log = logging.getLogger(__name__)

FIELDS = ("prompt", "negative_prompt", "height", "width", "frames", "steps", "guidance_scale", "sampler", "seed",
          "decode")
SEED_LIMIT = 2**63  # a seed the server draws for a request without one (stored, so a resumed job keeps it)


class JobCancelled(EasyAnimateError):
    """Raised from a step callback: the job was cancelled; the run stops at this step boundary."""


@dataclass(frozen=True)
class Limits:
    """Server-side request limits, checked before a job is queued (400; a body over
    ``max_body_bytes``: 413). ``max_tokens``: DiT tokens, the memory rule."""

    max_frames: int = 144
    max_height: int = 1024
    max_width: int = 1024
    max_steps: int = 100
    max_prompt_chars: int = 2000
    max_body_bytes: int = 64 * 1024
    max_tokens: int | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is None and name == "max_tokens":
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"server limit {name} must be a positive integer, got {value!r}")


def body_model():
    """The pydantic model of POST /v1/videos (strict types, no unknown fields)."""
    from pydantic import BaseModel, ConfigDict

    class VideoRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        prompt: str
        negative_prompt: str | None = None
        height: int | None = None
        width: int | None = None
        frames: int | None = None
        steps: int | None = None
        guidance_scale: float | None = None
        sampler: str | None = None
        seed: int | None = None
        decode: str | None = None
        lora: list[str] | None = None  # names of the server's --lora-dir adapters, "NAME[:WEIGHT]"

    return VideoRequest


class LoraLibrary:
    """The LoRA adapters a server offers by name: ``NAME.safetensors`` in ``serve --lora-dir``,
    each file checked and hashed at start-up. A request names them (never a path)."""

    MAX_PER_REQUEST = 4

    def __init__(self, adapters: dict[str, Any] | None = None):
        self.adapters = dict(adapters or {})

    @classmethod
    def scan(cls, directory: str | Path | None) -> "LoraLibrary":
        if directory is None:
            return cls()
        directory = Path(directory)
        if not directory.is_dir():
            raise InputError(f"--lora-dir must be a directory of .safetensors LoRA files, got {str(directory)!r}")
        from ...reference.lora import Adapter

        return cls({f.stem: Adapter.open(f) for f in sorted(directory.glob("*.safetensors"))})

    def resolve(self, specs: list[str] | None) -> list[dict[str, Any]]:
        """``NAME[:WEIGHT]`` entries -> what a job stores: name, weight, path, sha256."""
        if not specs:
            return []
        if len(specs) > self.MAX_PER_REQUEST:
            raise InputError(f"lora: at most {self.MAX_PER_REQUEST} adapters per request, got {len(specs)}")
        out: list[dict[str, Any]] = []
        for spec in specs:
            name, sep, text = spec.partition(":")
            if name not in self.adapters:
                offered = ", ".join(sorted(self.adapters)) or "none (the server has no --lora-dir)"
                raise InputError(f"lora: unknown adapter {name!r}; this server offers: {offered}")
            try:
                weight = float(text) if sep else 1.0
            except ValueError:
                raise InputError(f"lora: the weight of {name!r} must be a number (NAME:WEIGHT), got {text!r}") from None
            if not math.isfinite(weight):
                raise InputError(f"lora: the weight of {name!r} must be finite, got {text!r}")
            if any(o["name"] == name for o in out):
                raise InputError(f"lora: {name!r} is named twice; give it once with the summed weight")
            a = self.adapters[name]
            out.append({"name": name, "weight": weight, "path": str(a.path), "sha256": a.sha256})
        return out


def adapters_of_job(request: dict[str, Any]) -> list:
    """The Adapters a stored job names (the files are checked against their hashes when read)."""
    from ...reference.lora import Adapter

    return [Adapter(Path(e["path"]), e["weight"], e["sha256"]) for e in request.get("lora") or []]


def resolve_request(fields: dict[str, Any], config: ModelConfig, limits: Limits,
                    loras: LoraLibrary | None = None) -> tuple[dict[str, Any], GenerationRequest]:
    """(the request as stored: every field resolved, a drawn seed included, the LoRA names
    resolved against ``loras``; the GenerationRequest), or an InputError naming the rule
    and the value."""
    for name, value in fields.items():
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:  # JSON's "\ud800" escapes decode to lone surrogates
                raise InputError(f"{name} must be Unicode text (no unpaired surrogates), got "
                                 f"{value[exc.start]!r} at index {exc.start}") from None
    if len(fields.get("prompt", "")) > limits.max_prompt_chars:
        raise InputError(f"prompt must be at most {limits.max_prompt_chars} characters (server limit), got "
                         f"{len(fields['prompt'])}")
    if len(fields.get("negative_prompt") or "") > limits.max_prompt_chars:
        raise InputError(f"negative_prompt must be at most {limits.max_prompt_chars} characters (server limit), "
                         f"got {len(fields['negative_prompt'])}")
    lora = (loras or LoraLibrary()).resolve(fields.get("lora"))
    seed = fields.get("seed")
    given = {k: v for k, v in fields.items() if v is not None and k != "lora"}
    if seed is None:
        given["seed"] = secrets.randbelow(SEED_LIMIT)
    req = default_request(config, **given)
    for name, limit in (("frames", limits.max_frames), ("height", limits.max_height), ("width", limits.max_width),
                        ("steps", limits.max_steps)):
        value = getattr(req, name)
        if isinstance(value, int) and value > limit:
            raise InputError(f"{name} must be at most {limit} (server limit), got {value}")
    req.validate(config)
    check_budget(config, req, limits.max_tokens)
    stored = {k: getattr(req, k) for k in FIELDS}
    if lora:
        stored["lora"] = lora
    return stored, req


def run_job(pipe, request: dict[str, Any], out: Path, on_step: Callable[[int, int], bool],
            save: Callable[[int, bytes], None] | None, every: int, resume: bytes | None = None,
            stopping: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Generate ``request`` into ``out`` (atomically) on ``pipe``; returns the timings.
    ``on_step(done, total)`` after every step: True stops the run (JobCancelled, no
    file). ``save(step, state)`` every ``every`` steps and at the step where
    ``stopping()`` turns true (a server shutting down); ``resume``: a saved state."""
    from ..pipeline import Checkpoints

    request = dict(request)
    adapters = adapters_of_job(request)
    request.pop("lora", None)
    if hasattr(pipe, "set_loras"):
        pipe.set_loras(adapters)  # the job's adapters (none: the base model); engines kept in a small LRU
    elif adapters:
        raise InputError("this worker cannot merge LoRA adapters")
    req = default_request(pipe.config, **request)
    state = None
    if resume is not None:
        try:
            state = LoopState.from_bytes(resume)
            state.check(req)
        except (CheckpointError, InputError) as exc:
            log.warning("job checkpoint not used (%s); starting from step 0", exc)
            state = None

    def callback(done: int, total: int) -> None:
        if on_step(done, total):
            raise JobCancelled(f"cancelled after step {done} of {total}")

    checkpoints = Checkpoints(save=(lambda s: save(s.step, s.to_bytes())) if save else None, every=every,
                              resume=state, urgent=stopping)
    video = pipe.generate_to(out, req, callback, checkpoints=checkpoints)
    timings = dict(video.timings)
    steps = timings.pop("steps", [])
    if steps:
        timings["step_mean"], timings["step_max"] = sum(steps) / len(steps), max(steps)
    timings["resumed_from"] = state.step if state is not None else None
    return timings


class Executor(Protocol):
    """Where jobs run: a Pipeline in this process, or a Ray Serve replica."""

    name: str
    load_seconds: float

    def run(self, request: dict[str, Any], out: Path, on_step: Callable[[int, int], bool],
            save: Callable[[int, bytes], None], every: int, resume: bytes | None,
            stopping: Callable[[], bool]) -> dict[str, Any]: ...


class LocalExecutor:
    def __init__(self, name: str, pipe):
        self.name = name
        self.pipe = pipe
        self.load_seconds = float(pipe.timings.get("load", 0.0))

    def run(self, request, out, on_step, save, every, resume, stopping):
        return run_job(self.pipe, request, out, on_step, save, every, resume, stopping)


class WorkerLost(EasyAnimateError):
    """The process running a job died (a Ray replica); the job goes back to the queue."""


MAX_ATTEMPTS = 3


class WorkerLoop(threading.Thread):
    """Takes the oldest queued job, runs it on its executor, records every change."""

    def __init__(self, store: JobStore, executor: Executor, every: int, wake: threading.Event,
                 stop: threading.Event, metrics=None):
        super().__init__(name=f"worker-{executor.name}", daemon=True)
        self.store, self.executor, self.every = store, executor, every
        self.wake, self.stop = wake, stop
        self.metrics = metrics

    def run(self) -> None:
        while not self.stop.is_set():
            job = self.store.claim(self.executor.name)
            if job is None:
                self.wake.wait(0.2)
                self.wake.clear()
                continue
            try:
                self.execute(job)
            finally:
                self.wake.set()  # a finished job may free a queue slot another worker waits on

    def execute(self, job) -> None:
        store, last = self.store, [None]
        saved = store.checkpoint(job.id)
        if saved is not None:
            log.info("job %s: resuming from its checkpoint at step %d", job.id, saved[0])

        def on_step(done: int, total: int) -> bool:
            now = time.perf_counter()
            if last[0] is not None and self.metrics is not None:
                self.metrics.step(now - last[0])
            last[0] = now
            return store.progress(job.id, done) or self.stop.is_set()

        try:
            timings = self.executor.run(job.request, store.output(job.id), on_step,
                                        lambda step, state: store.save_checkpoint(job.id, step, state), self.every,
                                        saved[1] if saved else None, self.stop.is_set)
        except JobCancelled:
            if self.stop.is_set() and not store.get(job.id).cancel_requested:
                # the server is stopping: the job resumes at the next start, no attempt lost
                store.requeue(job.id, failed_attempt=False)
            else:
                store.finish(job.id, "cancelled")
        except WorkerLost as exc:
            if job.attempts >= MAX_ATTEMPTS:
                store.finish(job.id, "failed", f"{exc} ({job.attempts} attempts)")
            else:
                log.warning("job %s: %s; back in the queue", job.id, exc)
                store.requeue(job.id, str(exc))
        except EasyAnimateError as exc:
            store.finish(job.id, "failed", str(exc))
        except Exception as exc:  # a bug or an environment failure: the job fails, the worker lives on
            log.exception("job %s failed", job.id)
            detail = str(exc).splitlines()[0] if str(exc) else ""
            store.finish(job.id, "failed", f"internal error: {type(exc).__name__}: {detail}")
        else:
            store.finish(job.id, "completed", timings=timings)
        if self.metrics is not None:
            self.metrics.finished(store.get(job.id))

