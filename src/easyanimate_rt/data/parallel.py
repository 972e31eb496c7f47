"""Run one data-pipeline stage over many inputs: in parallel, resumable, never fatal per file.

A stage is a picklable ``Task``: ``check()`` runs once in the calling process (cheap
validation: paths exist, libraries import), ``setup()`` runs once in each worker
(loads models), and calling it on one input returns the manifest records it produced.

Resumability. The output manifest and a ledger beside it (``<name>.log.jsonl``) are
appended line by line with fsync, always records first, then the ledger line that says
the input is finished. A rerun skips every input with an ``ok`` ledger line, and
never appends a record whose ``path`` is already in the manifest, so a run killed at
any instant loses nothing written and leaves no duplicates. Inputs that failed are
recorded in the ledger as ``error`` (with the message) and retried by the next run.

Only the calling process writes; workers only compute.

Ownership. A stage writes only into an output it can recognise as its own: a ledger
starts with a header line naming its stage (``{"kind": "easyanimate-rt data ledger",
"stage": "score", ...}``), written before the first record, so an existing output
without a ledger of ours beside it (or with a ledger of another stage) was not written
by this stage and is refused before any work (:func:`claim_output`). Ledgers written
before the header existed are recognised by their lines.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, Sequence

from easyanimate_rt.errors import EasyAnimateError, InputError
from easyanimate_rt.data.manifest import append_jsonl, append_records, manifest_paths
from easyanimate_rt.fileio import atomic_write_text, check_writable_file

logger = logging.getLogger(__name__)


class Task(Protocol):
    name: str

    def check(self) -> None: ...

    def setup(self, threads: int) -> None: ...

    def __call__(self, item: Any) -> list[dict]: ...


@dataclass
class StageReport:
    """What one run of a stage did."""

    stage: str
    total: int = 0  # inputs given
    skipped: int = 0  # already finished by an earlier run
    done: int = 0  # finished by this run
    written: int = 0  # records appended by this run
    failed: list[tuple[str, str]] = field(default_factory=list)  # (input key, message)

    @property
    def ok(self) -> bool:
        """False only when every input failed (none finished, in this run or before)."""
        return not (self.failed and self.done == 0 and self.skipped == 0)


def ledger_path(manifest: str | Path) -> Path:
    manifest = Path(manifest)
    stem = manifest.name[: -len(".jsonl")] if manifest.name.endswith(".jsonl") else manifest.name
    return manifest.with_name(f"{stem}.log.jsonl")


def finished_keys(ledger: str | Path) -> set[str]:
    """Keys with an ``ok`` line in a ledger (a torn last line is ignored)."""
    ledger = Path(ledger)
    keys: set[str] = set()
    if not ledger.is_file():
        return keys
    for line in ledger.read_text(encoding="utf-8").split("\n"):
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # blank, or torn by a kill
        if isinstance(entry, dict) and entry.get("status") == "ok":
            keys.add(str(entry.get("key")))
    return keys


LEDGER_KIND = "easyanimate-rt data ledger"
_LEDGER_CHECK_BYTES = 1 << 20  # enough of a file to tell a ledger of ours from another file


def ledger_stage(ledger: str | Path) -> str | None:
    """The stage that keeps ``ledger``: the one its header names, ``""`` for a ledger
    from before headers (lines of ``{"key", "status"}`` only), None when the file is not
    a ledger this package wrote (or cannot be read). Reads the complete lines of the
    first MiB only: a line torn by a kill, or cut there, is not judged."""
    try:
        with open(ledger, "rb") as f:
            head = f.read(_LEDGER_CHECK_BYTES)
        entries = [json.loads(line.decode("utf-8")) for line in head.split(b"\n")[:-1] if line.strip()]
    except (OSError, ValueError):  # unreadable, not UTF-8, not JSON
        return None
    if not entries:
        return None
    first = entries[0]
    header = isinstance(first, dict) and first.get("kind") == LEDGER_KIND
    lines = entries[1:] if header else entries
    if not all(isinstance(e, dict) and "key" in e and e.get("status") in ("ok", "error") for e in lines):
        return None
    return str(first.get("stage", "")) if header else ""


def claim_output(output: str | Path, stage: str, source: str | Path | None = None, option: str = "--output"
                 ) -> Path:
    """Check, before any work, that ``stage`` may write ``output``: it does not exist (nor
    does a ledger beside it that is not ours), or it was written by this stage (its
    ledger says so). Anything else is an InputError naming the file: a stage never
    appends to, or replaces, a file it did not create. ``source``: the stage's input,
    which must be another file; ``option``: the command-line option that names a new path."""
    output = Path(output)
    ledger = ledger_path(output)
    check_writable_file(output, "output")
    if source is not None and output.resolve() == Path(source).resolve():
        raise InputError(f"output {output} is the input manifest; pass a new output path ({option})")
    if not (output.exists() or ledger.exists()):
        return output
    owner = ledger_stage(ledger) if ledger.is_file() else None
    if owner is None:
        if not output.exists():
            found, why = f"{ledger}, the ledger of output {output},", "it is not a ledger easyanimate-rt wrote"
        elif ledger.exists():
            found, why = f"output {output}", f"{ledger.name} beside it is not a ledger easyanimate-rt wrote"
        else:
            found, why = f"output {output}", f"there is no ledger {ledger.name} beside it"
        raise InputError(f"{found} already exists and was not written by `easyanimate-rt data {stage}` ({why}); "
                         f"a stage never overwrites a file it did not create: pass a new output path ({option}), "
                         f"nothing was written")
    if owner and owner != stage:
        raise InputError(f"output {output} was written by `easyanimate-rt data {owner}`, not `data {stage}`; "
                         f"pass a new output path ({option}), nothing was written")
    return output


def open_ledger(ledger: str | Path, stage: str) -> Path:
    """Start a new ledger with its header line (before any record is written, so every
    output of ours has a ledger); an existing one is left as it is."""
    ledger = Path(ledger)
    if not ledger.exists():
        atomic_write_text(ledger, json.dumps({"kind": LEDGER_KIND, "format": 1, "stage": stage}) + "\n")
    return ledger


# Worker-process state: the task, set up once per process by the pool initializer.
_WORKER_TASK: Task | None = None


def _init_worker(task: Task, threads: int) -> None:
    global _WORKER_TASK
    task.setup(threads)
    _WORKER_TASK = task


def _run_in_worker(item: Any) -> list[dict]:
    assert _WORKER_TASK is not None
    return _WORKER_TASK(item)


def unique_items(records) -> list[tuple[str, dict]]:
    """(path, record dict) per clip, keeping the first record of a path listed twice."""
    items: dict[str, dict] = {}
    for record in records:
        if record.path in items:
            logger.warning("clip %s is listed twice; using its first record", record.path)
            continue
        items[record.path] = record.to_dict()
    return list(items.items())


def _threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def run_stage(task: Task, items: Sequence[tuple[str, Any]], manifest: str | Path, *,
              workers: int = 1, progress: bool = False) -> StageReport:
    """Run ``task`` on each ``(key, item)`` not yet finished; append results to ``manifest``."""
    if workers < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    manifest = claim_output(manifest, task.name)
    ledger = ledger_path(manifest)
    report = StageReport(stage=task.name, total=len(items))
    done_keys = finished_keys(ledger)
    todo = [(k, it) for k, it in items if k not in done_keys]
    report.skipped = len(items) - len(todo)
    if not todo:
        return report
    task.check()
    open_ledger(ledger, task.name)
    written = manifest_paths(manifest)

    def commit(key: str, records: list[dict] | None, error: str | None) -> None:
        if error is not None:
            logger.warning("%s: skipped %s: %s", task.name, key, error)
            report.failed.append((key, error))
            append_jsonl(ledger, [{"key": key, "status": "error", "error": error}])
            return
        fresh = [r for r in records or [] if r["path"] not in written]
        report.written += append_records(manifest, fresh)
        written.update(r["path"] for r in fresh)
        append_jsonl(ledger, [{"key": key, "status": "ok", "records": len(records or [])}])
        report.done += 1

    from tqdm import tqdm

    bar = tqdm(total=len(todo), desc=task.name, unit="file", disable=not progress, dynamic_ncols=True)
    try:
        if workers == 1:
            task.setup(_threads_per_worker(1))
            for key, item in todo:
                try:
                    records = task(item)
                except Exception as e:  # one bad file never stops the batch
                    commit(key, None, _describe(e))
                else:
                    commit(key, records, None)
                bar.update(1)
        else:
            _run_pool(task, todo, workers, commit, bar)
    finally:
        bar.close()
    return report


def _run_pool(task: Task, todo: list[tuple[str, Any]], workers: int, commit, bar) -> None:
    # spawn, not fork: the parent may hold threads (ffmpeg readers, torch, onnxruntime).
    ctx = multiprocessing.get_context("spawn")
    max_in_flight = 4 * workers
    pending = iter(todo)
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_init_worker,
                                initargs=(task, _threads_per_worker(workers))) as pool:
        in_flight: dict[cf.Future, str] = {}

        def refill() -> None:
            for key, item in pending:
                in_flight[pool.submit(_run_in_worker, item)] = key
                if len(in_flight) >= max_in_flight:
                    break

        refill()
        while in_flight:
            finished, _ = cf.wait(in_flight, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                key = in_flight.pop(fut)
                try:
                    records = fut.result()
                except cf.process.BrokenProcessPool as e:
                    raise EasyAnimateError(
                        f"{task.name}: a worker process died ({e}); finished work is saved, rerun to resume"
                    ) from e
                except Exception as e:
                    commit(key, None, _describe(e))
                else:
                    commit(key, records, None)
                bar.update(1)
            refill()


def _describe(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def run_manifest_stage(make_task, manifest: str | Path, output: str | Path, *, workers: int = 1,
                       progress: bool = False):
    """Run the task ``make_task(in_root, out_root)`` over every clip of ``manifest`` into
    ``output`` (resumable; see :func:`run_stage`)."""
    from easyanimate_rt.data.manifest import read_manifest

    manifest, output = Path(manifest), Path(output)
    task = make_task(manifest.parent, output.parent)
    claim_output(output, task.name, source=manifest)
    items = unique_items(read_manifest(manifest))
    return run_stage(task, items, output, workers=workers, progress=progress)
