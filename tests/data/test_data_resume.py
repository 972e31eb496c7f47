"""Resume after a kill or a crash: nothing written is lost, nothing is written twice."""

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from needs import require

require("cv2")

from easyanimate_rt.data.cli import main_data  # noqa: E402
from easyanimate_rt.data.manifest import read_manifest, write_manifest  # noqa: E402
from easyanimate_rt.data.parallel import finished_keys, ledger_path  # noqa: E402
from easyanimate_rt.data.score import ScoreConfig, ScoreTask, score_clips  # noqa: E402

N = 8


@pytest.fixture()
def dataset(synth, tmp_path):
    """N good clips and one corrupt one, listed in DIR/clips.jsonl."""
    (tmp_path / "clips").mkdir()
    records = []
    for i in range(N):
        shutil.copy(synth["pan" if i % 2 else "static"], tmp_path / "clips" / f"c{i}.mp4")
        records.append({"path": f"clips/c{i}.mp4", "caption": "", "frames": 30, "fps": 10, "width": 96,
                        "height": 64})
    (tmp_path / "clips" / "bad.mp4").write_bytes(b"not a video at all" * 100)
    records.insert(3, {"path": "clips/bad.mp4", "caption": "", "frames": 30, "fps": 10, "width": 96,
                       "height": 64})
    write_manifest(tmp_path / "clips.jsonl", records)
    return tmp_path


def _assert_complete(folder):
    paths = [r.path for r in read_manifest(folder / "scores.jsonl")]
    assert sorted(paths) == sorted(f"clips/c{i}.mp4" for i in range(N))  # all good ones, once each
    assert finished_keys(ledger_path(folder / "scores.jsonl")) == set(paths)


def test_kill_midway_then_rerun(dataset, capsys):
    # A real process, slowed down per clip so the kill lands mid-run, killed with SIGKILL.
    script = dataset / "slow_score.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from easyanimate_rt.data import score
        from easyanimate_rt.data.cli import main_data
        original = score.ScoreTask.__call__
        def slow(self, item):
            time.sleep(0.15)
            return original(self, item)
        score.ScoreTask.__call__ = slow
        sys.exit(main_data(sys.argv[1:]))
    """))
    argv = ["score", str(dataset), "--scores", "motion", "--no-progress"]
    proc = subprocess.Popen([sys.executable, str(script), *argv], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = dataset / "scores.jsonl"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if out.is_file() and out.read_text().count("\n") >= 3:
                break
            time.sleep(0.01)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    before = read_manifest(out)
    assert 3 <= len(before) < N
    # rerun in-process: finishes the rest, reports the corrupt clip, duplicates nothing
    assert main_data(argv) == 0
    printed = capsys.readouterr()
    assert "clips/bad.mp4" in printed.err and "1 failed" in printed.out
    _assert_complete(dataset)
    assert [r.path for r in read_manifest(out)][: len(before)] == [r.path for r in before]


def test_crash_midway_then_rerun(dataset, monkeypatch):
    calls = {"n": 0}
    original = ScoreTask.__call__

    def crashing(self, item):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # not a per-file error: stops the whole run
        return original(self, item)

    config = ScoreConfig(scores=("motion",))
    monkeypatch.setattr(ScoreTask, "__call__", crashing)
    with pytest.raises(KeyboardInterrupt):
        score_clips(dataset / "clips.jsonl", dataset / "scores.jsonl", config)
    assert len(read_manifest(dataset / "scores.jsonl")) == 3  # c0, c1, c2; bad.mp4 failed
    monkeypatch.setattr(ScoreTask, "__call__", original)
    # simulate a kill between a record and its ledger line: the record must not be doubled
    ledger = ledger_path(dataset / "scores.jsonl")
    lines = [line for line in ledger.read_text().splitlines() if "clips/c2.mp4" not in line]
    ledger.write_text("\n".join(lines) + "\n")
    report = score_clips(dataset / "clips.jsonl", dataset / "scores.jsonl", config)
    assert report.skipped == 2 and [k for k, _ in report.failed] == ["clips/bad.mp4"]
    _assert_complete(dataset)


def test_parallel_score_matches_serial(dataset):
    config = ScoreConfig(scores=("motion",))
    serial = dataset / "serial" / "scores.jsonl"
    score_clips(dataset / "clips.jsonl", serial, config)
    report = score_clips(dataset / "clips.jsonl", dataset / "scores.jsonl", config, workers=2)
    assert report.done == N and len(report.failed) == 1
    _assert_complete(dataset)
    by_path = {r.path: r.scores["motion"] for r in read_manifest(dataset / "scores.jsonl")}
    for r in read_manifest(serial):
        assert by_path[r.path.removeprefix("../")] == pytest.approx(r.scores["motion"], rel=1e-6)
