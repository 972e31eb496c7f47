"""The job store: one SQLite database (WAL) in the store directory, beside the outputs.

Every state change is one transaction; a job's checkpoint (runtime/loop_state.py)
lives in the same database, so a job, its progress and its last checkpoint never
disagree after a crash. One server owns a store at a time (an exclusive lock file).

    STORE/jobs.sqlite3       jobs and checkpoints
    STORE/outputs/ID.mp4     finished videos, written atomically (temp file + rename)
    STORE/server.lock        held (flock) by the running server; never written or removed
    STORE/server.json        the running server's address (written once it listens)

The store may share its directory with other files: it removes only what it wrote,
named by the ids it recorded (a job's video, a dead writer's temporary copy of it, its
own server.json), never by a pattern alone. An existing jobs.sqlite3 is checked before
anything writes to it: a file that is not SQLite, a database with other tables, or a
damaged one stops the server (StoreError) and is left as it was.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shlex
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ...errors import EasyAnimateError

STATUSES = ("queued", "in_progress", "completed", "failed", "cancelled")
FINAL = ("completed", "failed", "cancelled")
ID_PATTERN = re.compile(r"vid_[0-9a-f]{24}")
# fileio.atomic_path's temporary name for outputs/ID.mp4: .ID.mp4.<mkstemp's 8 characters>.tmp
TMP_PATTERN = re.compile(r"\.(vid_[0-9a-f]{24})\.mp4\.[a-z0-9_]{8}\.tmp")
SQLITE_HEADER = b"SQLite format 3\x00"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    idempotency_key TEXT UNIQUE,
    step INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER NOT NULL,
    error TEXT,
    timings TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    resumed_from INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    body_sha256 TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    job TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    step INTEGER NOT NULL,
    state BLOB NOT NULL
);
"""
TABLES = {"jobs", "checkpoints", "sqlite_sequence"}  # sqlite_sequence: AUTOINCREMENT's own
CHECKPOINT_COLUMNS = {"job", "step", "state"}
# Columns added after the first release, with their migration (an older store gains them on open).
ADDED_COLUMNS = {"body_sha256": "ALTER TABLE jobs ADD COLUMN body_sha256 TEXT"}
JOB_COLUMNS = {"seq", "id", "status", "request", "idempotency_key", "step", "total_steps", "error", "timings",
               "created", "started", "finished", "worker", "attempts", "resumed_from", "cancel_requested",
               *ADDED_COLUMNS}


class StoreError(EasyAnimateError):
    """The store cannot be opened or used (locked by another server, unreadable)."""


class QueueFull(EasyAnimateError):
    def __init__(self, limit: int):
        super().__init__(f"the queue holds its limit of {limit} jobs (--max-queue); retry later")
        self.limit = limit


class Conflict(EasyAnimateError):
    """A request that contradicts the job's state (content before completion, ...)."""


def valid_id(job_id: str) -> bool:
    """Ids are ``vid_`` + 24 random hex digits; anything else is never looked up or used in a path."""
    return isinstance(job_id, str) and ID_PATTERN.fullmatch(job_id) is not None


def body_digest(body: dict[str, Any]) -> str:
    """The identity of a client's request body for Idempotency-Key: the SHA-256 of its
    fields as canonical JSON (sorted keys; a field given as null is a field left out)."""
    given = {k: v for k, v in body.items() if v is not None}
    return hashlib.sha256(json.dumps(given, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class Job:
    id: str
    seq: int
    status: str
    request: dict[str, Any]
    step: int
    total_steps: int
    error: str | None
    timings: dict[str, Any] | None
    created: float
    started: float | None
    finished: float | None
    worker: str | None
    attempts: int
    resumed_from: int | None
    cancel_requested: bool
    idempotency_key: str | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        d = dict(row)
        return cls(id=d["id"], seq=d["seq"], status=d["status"], request=json.loads(d["request"]), step=d["step"],
                   total_steps=d["total_steps"], error=d["error"],
                   timings=json.loads(d["timings"]) if d["timings"] else None, created=d["created"],
                   started=d["started"], finished=d["finished"], worker=d["worker"], attempts=d["attempts"],
                   resumed_from=d["resumed_from"], cancel_requested=bool(d["cancel_requested"]),
                   idempotency_key=d["idempotency_key"])


class JobStore:
    """Jobs in ``directory``; safe to share between threads (one connection per thread)."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        self.path = self.dir / "jobs.sqlite3"
        self._local = threading.local()
        self._lock_file = None
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"--store {self.dir}: cannot create it ({exc.strerror})") from None
        self._check_database()  # before anything writes to it (WAL mode, tables)
        try:
            db = self._db()
            db.executescript(SCHEMA)  # idempotent (IF NOT EXISTS); executescript commits itself
            have = {r["name"] for r in db.execute("PRAGMA table_info(jobs)")}
            for column, sql in ADDED_COLUMNS.items():
                if column not in have:
                    db.execute(sql)  # a store from an older release
        except sqlite3.DatabaseError as exc:
            raise self._damaged(exc) from None
        try:
            (self.dir / "outputs").mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"--store {self.dir}: cannot create {self.dir / 'outputs'} ({exc.strerror})") from None

    def _check_database(self) -> None:
        """An existing jobs.sqlite3 must be a sound job store: a StoreError (naming the
        file and how to move it aside) for anything else, the file left untouched."""
        if not self.path.exists():
            return
        try:
            with open(self.path, "rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise StoreError(f"--store {self.dir}: cannot read {self.path} ({exc.strerror})") from None
        if not head:
            return  # an empty file is an empty database
        if head != SQLITE_HEADER:
            raise self._foreign(f"is not a SQLite database (it starts with {head[:8]!r})")
        db = None
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            foreign, damaged = self._inspect(db)
        except sqlite3.DatabaseError as exc:
            foreign, damaged = None, str(exc)
        finally:
            if db is not None:
                db.close()  # first: the -wal and -shm files a reader made are gone again
        if foreign is not None:
            raise self._foreign(foreign)
        if damaged is not None:
            raise self._damaged(damaged)

    @staticmethod
    def _inspect(db: sqlite3.Connection) -> tuple[str | None, str | None]:
        """(why this is not a job store, or None; what is damaged, or None); reads only."""
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return None, None  # a new database: the schema is created next
        if not tables <= TABLES or "jobs" not in tables:
            return (f"is a SQLite database but not a job store (its tables: {sorted(tables)}; a job store has jobs "
                    f"and checkpoints)"), None
        missing = {f"jobs.{c}" for c in JOB_COLUMNS - set(ADDED_COLUMNS)} - \
            {f"jobs.{r[1]}" for r in db.execute("PRAGMA table_info(jobs)")}
        if "checkpoints" in tables:
            missing |= {f"checkpoints.{c}" for c in CHECKPOINT_COLUMNS} - \
                {f"checkpoints.{r[1]}" for r in db.execute("PRAGMA table_info(checkpoints)")}
        if missing:
            return f"has tables of another shape (missing columns {sorted(missing)}), so it is not a job store", None
        problems = [r[0] for r in db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            return None, problems[0] + (f" and {len(problems) - 1} more problems" if len(problems) > 1 else "")
        return None, None

    def _move_aside(self) -> str:
        """The shell commands that move the database (and SQLite's -wal/-shm beside it) aside."""
        files = [self.path] + [p for p in (Path(f"{self.path}-wal"), Path(f"{self.path}-shm")) if p.exists()]
        return "; ".join(f"mv {shlex.quote(str(p))} {shlex.quote(str(p) + '.bad')}" for p in files)

    def _foreign(self, what: str) -> StoreError:
        return StoreError(f"{self.path} {what}; the server will not start on it and leaves it as it is: move it "
                          f"aside ({self._move_aside()}) and restart, or give --store another directory")

    def _damaged(self, detail) -> StoreError:
        return StoreError(f"{self.path}: the job store's database is damaged ({detail}); the server will not start "
                          f"on it: move it aside ({self._move_aside()}) and restart with a new, empty store; finished "
                          f"videos in {self.dir / 'outputs'}/ stay usable")

    # --- connections -------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across a process crash, fsync at checkpoints
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    class _Tx:
        def __init__(self, db: sqlite3.Connection):
            self.db = db

        def __enter__(self) -> sqlite3.Connection:
            self.db.execute("BEGIN IMMEDIATE")  # the write lock up front: no read-then-upgrade deadlocks
            return self.db

        def __exit__(self, kind, exc, tb) -> None:
            self.db.execute("COMMIT" if kind is None else "ROLLBACK")

    def _tx(self) -> "JobStore._Tx":
        return JobStore._Tx(self._db())

    def lock(self) -> None:
        """Take the store for this process; a StoreError if another server holds it."""
        f = open(self.dir / "server.lock", "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise StoreError(f"--store {self.dir} is in use by another server (server.lock is held); give each "
                             f"server its own store") from None
        self._lock_file = f
        address = self.dir / "server.json"
        if address.exists() and self._address_pid() is None:
            raise StoreError(f"{address} is not a server address file (one holds {{\"url\": ..., \"pid\": ...}}); "
                             f"the server writes its address there: move that file aside or give --store another "
                             f"directory")

    def output(self, job_id: str) -> Path:
        if not valid_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.dir / "outputs" / f"{job_id}.mp4"

    # --- jobs --------------------------------------------------------------------------

    def submit(self, request: dict[str, Any], total_steps: int, idempotency_key: str | None = None,
               max_queue: int | None = None, body: dict[str, Any] | None = None) -> tuple[Job, bool]:
        """(job, created). ``request``: as resolved (a drawn seed included); ``body``: what
        the client sent (default: ``request``). A known ``idempotency_key`` returns its
        job if the body is the same (a Conflict if not); beyond ``max_queue`` queued
        jobs, QueueFull."""
        stored = json.dumps(request, sort_keys=True)
        body = request if body is None else body
        digest = body_digest(body)
        with self._tx() as db:
            if idempotency_key is not None:
                row = db.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
                if row is not None:
                    if row["body_sha256"] is not None:
                        same = row["body_sha256"] == digest
                    else:  # a job from before bodies were recorded: its request, with its seed if none is given
                        known = json.loads(row["request"])
                        seed = body.get("seed")
                        same = known == {**request, "seed": known.get("seed") if seed is None else seed}
                    if not same:
                        raise Conflict(f"Idempotency-Key {idempotency_key!r} was used for a different request "
                                       f"(job {row['id']}); a retry must send the same body")
                    return Job.from_row(row), False
            if max_queue is not None:
                queued = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]
                if queued >= max_queue:
                    raise QueueFull(max_queue)
            job_id = "vid_" + secrets.token_hex(12)
            db.execute("INSERT INTO jobs (id, status, request, idempotency_key, total_steps, created, body_sha256) "
                       "VALUES (?, 'queued', ?, ?, ?, ?, ?)",
                       (job_id, stored, idempotency_key, total_steps, time.time(), digest))
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()), True

    def get(self, job_id: str) -> Job | None:
        if not valid_id(job_id):
            return None
        row = self._db().execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row is not None else None

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see one state of the store (a WAL read transaction): a listing's
        queue positions agree with each other while workers claim jobs."""
        db = self._db()
        db.execute("BEGIN")
        try:
            yield
        finally:
            db.execute("COMMIT")

    def list(self, limit: int = 20, after: str | None = None, status: str | None = None) -> list[Job]:
        """Newest first; ``after``: the last id of the previous page."""
        sql, args = "SELECT * FROM jobs WHERE 1", []
        if status is not None:
            sql += " AND status = ?"
            args.append(status)
        if after is not None:
            sql += " AND seq < (SELECT seq FROM jobs WHERE id = ?)"
            args.append(after)
        rows = self._db().execute(sql + " ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [Job.from_row(r) for r in rows]

    def queue_position(self, job: Job) -> int | None:
        """1 for the next job to start; None unless queued."""
        if job.status != "queued":
            return None
        return 1 + self._db().execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND seq < ?",
                                      (job.seq,)).fetchone()[0]

    def claim(self, worker: str) -> Job | None:
        """The oldest queued job, now in progress on ``worker`` (one transaction: two
        workers never take the same job)."""
        with self._tx() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'in_progress', worker = ?, attempts = attempts + 1, "
                       "started = COALESCE(started, ?), resumed_from = (SELECT step FROM checkpoints WHERE job = ?) "
                       "WHERE id = ?", (worker, time.time(), row["id"], row["id"]))
            return Job.from_row(db.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone())

    def progress(self, job_id: str, step: int) -> bool:
        """Record ``step`` done; True if a cancel was asked for (checked in the same statement)."""
        row = self._db().execute("UPDATE jobs SET step = ? WHERE id = ? RETURNING cancel_requested",
                                 (step, job_id)).fetchone()
        return row is None or bool(row[0])  # a deleted job stops too

    def save_checkpoint(self, job_id: str, step: int, state: bytes) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO checkpoints (job, step, state) VALUES (?, ?, ?) ON CONFLICT (job) DO UPDATE "
                       "SET step = excluded.step, state = excluded.state", (job_id, step, state))

    def checkpoint(self, job_id: str) -> tuple[int, bytes] | None:
        row = self._db().execute("SELECT step, state FROM checkpoints WHERE job = ?", (job_id,)).fetchone()
        return (row["step"], bytes(row["state"])) if row is not None else None

    def finish(self, job_id: str, status: str, error: str | None = None,
               timings: dict[str, Any] | None = None) -> None:
        assert status in FINAL, status
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = ?, error = ?, timings = ?, finished = ?, "
                       "step = CASE WHEN ? = 'completed' THEN total_steps ELSE step END WHERE id = ?",
                       (status, error, json.dumps(timings) if timings is not None else None, time.time(), status,
                        job_id))
            db.execute("DELETE FROM checkpoints WHERE job = ?", (job_id,))

    def requeue(self, job_id: str, error: str | None = None, *, failed_attempt: bool = True) -> None:
        """Back to the queue, keeping its place and its checkpoint: a lost worker's job
        (the attempt counts), or a stopping server's (``failed_attempt=False``)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET status = 'queued', worker = NULL, error = ?, attempts = attempts - ? "
                       "WHERE id = ?", (error, 0 if failed_attempt else 1, job_id))

    def cancel(self, job_id: str) -> Job | None:
        """A queued job is cancelled at once; a running one at its next step boundary; a
        finished one is a Conflict (cancelled again: unchanged). None: no such job."""
        with self._tx() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
            elif row["status"] == "in_progress":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            elif row["status"] in ("completed", "failed"):
                raise Conflict(f"job {job_id} is already {row['status']}; there is nothing to cancel")
        return self.get(job_id)

    def delete(self, job_id: str) -> bool:
        """The job, its checkpoint and its video (outputs/ID.mp4, named by the id this
        store drew); a running job must be cancelled first. False: no such job."""
        out = self.output(job_id)
        with self._tx() as db:  # the status read and the delete in one transaction: no worker claims it between
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return False
            if row["status"] == "in_progress":
                raise Conflict(f"job {job_id} is in progress; cancel it (POST /v1/videos/{job_id}/cancel) before "
                               f"deleting it")
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        if out.is_file() and not out.is_symlink():
            out.unlink(missing_ok=True)
        return True

    def recover(self, max_attempts: int) -> tuple[int, int]:
        """At start-up: jobs a dead server left in progress go back to the queue (in
        their old order, with their checkpoints), except those that were running on
        each of their ``max_attempts`` attempts when a server died: they fail (a job
        that kills its server must not kill every restart). Returns (requeued, failed)."""
        with self._tx() as db:
            failed = db.execute("UPDATE jobs SET status = 'failed', worker = NULL, finished = ?, error = "
                                "'the server died while running this job, on each of its ' || attempts || "
                                "' attempts' WHERE status = 'in_progress' AND attempts >= ?",
                                (time.time(), max_attempts)).rowcount
            n = db.execute("UPDATE jobs SET status = 'queued', worker = NULL WHERE status = 'in_progress'").rowcount
            db.execute("DELETE FROM checkpoints WHERE job IN (SELECT id FROM jobs WHERE status = 'failed')")
        for tmp in (self.dir / "outputs").glob(".vid_*.mp4.*.tmp"):  # a dead writer's temporary copy of a video
            found = TMP_PATTERN.fullmatch(tmp.name)
            if found and self.get(found.group(1)) is not None and tmp.is_file() and not tmp.is_symlink():
                tmp.unlink(missing_ok=True)
        return n, failed

    def counts(self) -> dict[str, int]:
        rows = self._db().execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall()
        found = {r[0]: r[1] for r in rows}
        return {s: found.get(s, 0) for s in STATUSES}

    def write_address(self, url: str) -> None:
        from ...fileio import atomic_write_text

        atomic_write_text(self.dir / "server.json", json.dumps({"url": url, "pid": os.getpid()}))

    def _address_pid(self) -> int | None:
        """The pid in server.json, if it is an address file as write_address writes them."""
        try:
            found = json.loads((self.dir / "server.json").read_text())
        except (OSError, ValueError):
            return None
        ok = isinstance(found, dict) and set(found) == {"url", "pid"} and isinstance(found["pid"], int)
        return found["pid"] if ok else None

    def clear_address(self) -> None:
        """Remove server.json if this process wrote it."""
        if self._address_pid() == os.getpid():
            (self.dir / "server.json").unlink(missing_ok=True)
