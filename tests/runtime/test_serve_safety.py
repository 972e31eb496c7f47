"""The job server's store as a careful guest: it opens stores from older releases, stops
with one line (exit 2) on a database that is damaged or not a job store, touches no
file it did not write, and its Ctrl-C works from a shell that ignores SIGINT. The
server runs the torch backend here: no engines to build, a job in a second."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from serving import Server, default_sigint, wait_for

from easyanimate_rt.cli import main
from easyanimate_rt.runtime.serve.app import nesting_depth
from easyanimate_rt.runtime.serve.store import Conflict, JobStore

# The jobs table as the first release made it (before body_sha256).
OLD_SCHEMA = """
CREATE TABLE jobs (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT UNIQUE NOT NULL, status TEXT NOT NULL,
    request TEXT NOT NULL, idempotency_key TEXT UNIQUE, step INTEGER NOT NULL DEFAULT 0, total_steps INTEGER NOT NULL,
    error TEXT, timings TEXT, created REAL NOT NULL, started REAL, finished REAL, worker TEXT,
    attempts INTEGER NOT NULL DEFAULT 0, resumed_from INTEGER, cancel_requested INTEGER NOT NULL DEFAULT 0);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE TABLE checkpoints (job TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE, step INTEGER NOT NULL,
    state BLOB NOT NULL);
"""
OLD_ID = "vid_" + "0123456789abcdef01234567"
REQUEST = {"prompt": "a", "negative_prompt": "", "height": 64, "width": 64, "frames": 17, "steps": 2,
           "guidance_scale": 2.5, "sampler": "dpm++", "seed": 123}


@contextlib.contextmanager
def ignoring_sigint():
    """As under a shell that runs the tests in the background: SIGINT ignored, and so
    in every child started meanwhile unless it restores the default."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_an_old_store_gains_the_body_column_and_retries_match_the_body(tmp_path):
    path = tmp_path / "store" / "jobs.sqlite3"
    path.parent.mkdir()
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO jobs (id, status, request, idempotency_key, total_steps, created) VALUES "
                   "(?, 'completed', ?, 'old-key', 2, 0)", (OLD_ID, json.dumps(REQUEST, sort_keys=True)))
        db.commit()
    store = JobStore(path.parent)
    assert "body_sha256" in {r[1] for r in store._db().execute("PRAGMA table_info(jobs)")}
    assert store.get(OLD_ID).request == REQUEST and store.get(OLD_ID).status == "completed"
    # a job from before the migration: matched on its request, its own seed standing in for a missing one
    same, created = store.submit({**REQUEST, "seed": 999}, 2, "old-key", body={"prompt": "a", "steps": 2})
    assert same.id == OLD_ID and not created
    with pytest.raises(Conflict, match="'old-key' was used for a different request"):
        store.submit({**REQUEST, "prompt": "b"}, 2, "old-key", body={"prompt": "b", "steps": 2})
    # a new job: matched on the body sent (a drawn seed differs, a null field is a missing one)
    first, created = store.submit({**REQUEST, "seed": 1}, 2, "new-key", body={"prompt": "a"})
    again, created_again = store.submit({**REQUEST, "seed": 2}, 2, "new-key", body={"prompt": "a", "seed": None})
    assert created and not created_again and again.id == first.id and again.request["seed"] == 1
    with pytest.raises(Conflict, match=f"a different request \\(job {first.id}\\)"):
        store.submit({**REQUEST, "seed": 1}, 2, "new-key", body={"prompt": "a", "seed": 1})
    assert JobStore(path.parent).get(first.id).id == first.id  # a migrated store opens again as it is


def test_nesting_depth_counts_brackets_outside_strings_only():
    assert nesting_depth(b'{"prompt": "x"}') == 1
    assert nesting_depth(rb'{"a": "\"[[[{{", "b": [[1], {"c": "]]\\"}]}') == 3
    assert nesting_depth(b"[" * 30000) == 30000
    assert nesting_depth(b'"[[[') == 0  # an unterminated string: nothing after it counts


def _damaged(store: Path) -> None:
    jobs = JobStore(store)
    for k in range(40):
        jobs.submit({**REQUEST, "prompt": "p" * 500 + str(k)}, 2, f"key{k}")
    jobs._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
    jobs._db().close()
    data = bytearray((store / "jobs.sqlite3").read_bytes())
    data[8192:] = b"\xa5" * (len(data) - 8192)  # the pages after the schema's: garbage
    (store / "jobs.sqlite3").write_bytes(bytes(data))


def _sqlite(sql: str):
    def make(store: Path) -> None:
        store.mkdir()
        with contextlib.closing(sqlite3.connect(store / "jobs.sqlite3")) as db:
            db.executescript(sql)
            db.commit()
    return make


def _write(data: bytes):
    def make(store: Path) -> None:
        store.mkdir()
        (store / "jobs.sqlite3").write_bytes(data)
    return make


BROKEN = {
    # name: (how to make it, what the message says about it)
    "damaged pages": (_damaged, "the job store's database is damaged (database disk image is malformed)"),
    "random bytes": (_write(os.urandom(16384)), "is not a SQLite database"),
    "a text file": (_write(b"my notes\n" * 100), "is not a SQLite database (it starts with b'my notes')"),
    "other tables": (_sqlite("CREATE TABLE photos (name TEXT); INSERT INTO photos VALUES ('cat.jpg');"),
                     "is a SQLite database but not a job store (its tables: ['photos']"),
    "jobs of another shape": (_sqlite("CREATE TABLE jobs (id TEXT, owner TEXT);"),
                              "has tables of another shape (missing columns ['jobs.attempts'"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_a_store_that_is_damaged_or_not_a_job_store_is_exit_2_and_left_as_it_is(kind, tmp_path, capsys,
                                                                                monkeypatch):
    make, what = BROKEN[kind]
    store = tmp_path / "store"
    make(store)
    before = files(store)
    argv = ["serve", "--store", str(store), "--port", "0", "--backend", "torch"]
    if kind == "damaged pages":  # the reported case, end to end: a process and its exit code
        r = subprocess.run([sys.executable, "-m", "easyanimate_rt", *argv], capture_output=True, text=True,
                           timeout=120)
        code, err = r.returncode, r.stderr
    else:
        def accepted(model):
            raise AssertionError(f"the server went on with {kind}")

        monkeypatch.setattr("easyanimate_rt.runtime.serve.server.model_config", accepted)
        code, err = main(argv), capsys.readouterr().err
    path = store / "jobs.sqlite3"
    assert code == 2 and err.count("\n") == 1 and err.startswith(f"error: {path}"), (code, err)
    assert what in err and "the server will not start on it" in err
    assert f"move it aside (mv {path} {path}.bad) and restart" in err
    if kind == "damaged pages":
        assert f"finished videos in {store / 'outputs'}/ stay usable" in err
    assert "Traceback" not in err
    assert files(store) == before  # nothing written, created or removed


def test_a_server_json_the_server_did_not_write_is_refused(tmp_path, capsys, monkeypatch):
    store = tmp_path / "mine"
    store.mkdir()
    (store / "server.json").write_text('{"theme": "dark"}\n')
    monkeypatch.setattr("easyanimate_rt.runtime.serve.server.model_config",
                        lambda model: pytest.fail("the server went on"))
    assert main(["serve", "--store", str(store), "--port", "0", "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {store / 'server.json'} is not a server address file") and "Traceback" not in err
    assert (store / "server.json").read_text() == '{"theme": "dark"}\n'


def test_recovery_removes_only_the_temporary_videos_of_its_own_jobs(tmp_path):
    store = JobStore(tmp_path / "store")
    job, _ = store.submit(REQUEST, 2)
    outputs = tmp_path / "store" / "outputs"
    ours = outputs / f".{job.id}.mp4.abcd_123.tmp"  # fileio.atomic_path's name: a writer died mid-video
    foreign = [outputs / f".{OLD_ID}.mp4.abcd_123.tmp", outputs / ".notes.tmp", outputs / f".{job.id}.mp4.tmp"]
    for p in [ours, *foreign]:
        p.write_bytes(b"bytes")
    store.recover(3)
    assert not ours.exists() and all(p.read_bytes() == b"bytes" for p in foreign)


def test_children_get_sigint_back_from_a_parent_that_ignores_it():
    code = "import signal, sys; sys.exit(0 if signal.getsignal(signal.SIGINT) is signal.default_int_handler else 3)"
    with ignoring_sigint():
        plain = subprocess.run([sys.executable, "-c", code])
        restored = subprocess.run([sys.executable, "-c", code], preexec_fn=default_sigint)
    assert (plain.returncode, restored.returncode) == (3, 0)  # without default_sigint Ctrl-C would do nothing


def test_a_store_in_a_folder_of_user_files_touches_none_of_them(tmp_path):
    """--store at a folder already holding other files: start, two jobs, delete one, stop
    with Ctrl-C: every file that was there is there, byte for byte."""
    home = tmp_path / "mine"
    user = {
        "holiday.jpg": b"\xff\xd8\xff\xe0" + os.urandom(30000),
        "train.py": b"import torch\nprint('hello')\n",
        "notes/todo.txt": b"buy milk\n",
        "outputs/notes.txt": b"my outputs, not the server's\n",
        "outputs/.draft.tmp": b"an editor's temporary file\n",
        f"outputs/.{OLD_ID}.mp4.abcd_123.tmp": b"named like a temporary video of no job here\n",
        f"outputs/{OLD_ID}.mp4": b"named like a video of no job here\n",
        "checkpoints/stray.npz": b"PK\x03\x04" + os.urandom(1000),
        "server.lock": b"my lock file\n",
    }
    for name, data in user.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_bytes(data)
    with ignoring_sigint():
        srv = Server(home, "--backend", "torch", "--threads", "1")
    try:
        with srv.client() as c:
            kept, deleted = (c.post("/v1/videos", json={"prompt": f"a grey square {k}", "steps": 2}).json()["id"]
                             for k in range(2))
            assert wait_for(c, kept, timeout=60)["status"] == wait_for(c, deleted, timeout=60)["status"] == "completed"
            assert (home / "outputs" / f"{deleted}.mp4").is_file()
            r = c.delete(f"/v1/videos/{deleted}")
            assert r.status_code == 200 and r.json()["deleted"], r.text
            assert c.get(f"/v1/videos/{deleted}").status_code == 404
    finally:
        code = srv.stop(signal.SIGINT)  # Ctrl-C
    assert code == 0 and "server stopped" in srv.output(), srv.output()
    after = files(home)
    assert {name: after.get(name) for name in user} == user  # all there, byte for byte
    added = set(after) - set(user)
    assert f"outputs/{kept}.mp4" in added and f"outputs/{deleted}.mp4" not in added
    assert added <= {f"outputs/{kept}.mp4", "jobs.sqlite3", "jobs.sqlite3-wal", "jobs.sqlite3-shm"}, added
