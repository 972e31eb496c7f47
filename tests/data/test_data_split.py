import shutil

import numpy as np
import pytest
from needs import require

require("scenedetect")

from data_synth import CUT_VIDEO_FRAMES, CUTS, FPS, cut_video_frames, write_video

from easyanimate_rt import media as vio
from easyanimate_rt.data.cli import main_data
from easyanimate_rt.data.manifest import read_manifest
from easyanimate_rt.data.split import SplitConfig, detect_cuts, merge_cuts, plan_clips, split_videos


def test_detect_cuts_finds_the_hard_cuts(synth):
    cuts, frames, fps, size = detect_cuts(synth["cuts"])
    assert len(cuts) == len(CUTS)
    assert all(abs(c - t) <= 1 for c, t in zip(cuts, CUTS)), cuts
    assert frames == CUT_VIDEO_FRAMES and fps == FPS and size == (64, 64)


def test_merge_cuts_prefers_finer_passes():
    # skip-2 pass reports the cut at 41 two frames late and finds one more at 90
    assert merge_cuts([(0, [39, 70]), (1, [40, 71]), (2, [41, 90])]) == [39, 70, 90]
    assert merge_cuts([(2, [10]), (0, [12])]) == [12]  # order of passes does not matter


def test_plan_clips_bounds_and_splits():
    # 10 fps: scenes of 2 s (dropped), 5 s (kept), 25 s (3 equal pieces of < 10 s)
    clips = plan_clips([20, 70], 320, 10.0, min_seconds=3, max_seconds=10)
    assert clips == [(20, 70), (70, 153), (153, 237), (237, 320)]
    # pieces of an even split would be < min: whole max-length pieces, remainder dropped
    assert plan_clips([], 110, 10.0, min_seconds=9, max_seconds=10) == [(0, 100)]


def test_split_writes_exact_clips_and_records(synth, tmp_path):
    report = split_videos(synth["raw"], tmp_path / "ds")
    assert report.ok and report.done == 1 and not report.failed
    records = read_manifest(tmp_path / "ds" / "clips.jsonl")
    starts = [r.start_frame for r in records]
    assert [abs(s - t) <= 1 for s, t in zip(starts, (0, *CUTS))] == [True] * 3, starts
    expected_colour = {0: (200, 40, 40), 2: (30, 40, 190)}
    frames = cut_video_frames()
    for i, r in enumerate(records):
        assert r.fps == FPS and (r.width, r.height) == (64, 64) and r.caption == ""
        assert r.end_frame - r.start_frame == r.frames and r.start == pytest.approx(r.start_frame / FPS)
        assert r.source.endswith("cuts.mp4") and r.extra["cut"] in ("copy", "reencode")
        info = vio.probe(r.resolve(tmp_path / "ds"))
        assert info.frames == r.frames  # the file holds exactly the planned frames
        first = vio.read_frames_at(r.resolve(tmp_path / "ds"), [0])[0].astype(float)
        ref = frames[r.start_frame].astype(float)
        assert np.abs(first - ref).mean() < 12  # first frame is the scene's first frame (lossy codec)
        if i in expected_colour:
            assert np.allclose(first.mean(axis=(0, 1)), expected_colour[i], atol=25)


def test_split_copies_when_cuts_are_keyframes(synth, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    keyed = write_video(raw / "keyed.mp4", cut_video_frames(),
                        keyframes_s=",".join(f"{c / FPS}" for c in CUTS))
    assert vio.keyframe_indices(keyed, FPS) == [0, *CUTS]
    split_videos(raw, tmp_path / "ds", SplitConfig(min_seconds=1.0, max_seconds=10.0))
    records = read_manifest(tmp_path / "ds" / "clips.jsonl")
    assert [r.start_frame for r in records] == [0, *CUTS]
    assert [r.extra["cut"] for r in records] == ["copy"] * 3
    assert all(vio.probe(r.resolve(tmp_path / "ds")).frames == r.frames for r in records)


def test_split_cli_skips_corrupt_input_and_resumes(synth, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(synth["cuts"], raw / "good.mp4")
    (raw / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    out = tmp_path / "ds"
    argv = ["split", str(raw), "--out", str(out), "--min-seconds", "1", "--max-seconds", "2.5",
            "--no-progress"]
    assert main_data(argv) == 0
    printed = capsys.readouterr()
    assert "1 failed" in printed.out and "broken.mp4" in printed.err
    records = read_manifest(out / "clips.jsonl")
    assert len(records) == 6  # three ~4.3 s scenes, each split in two
    assert all(10 <= r.frames <= 25 for r in records)
    # rerun: the good file is skipped, the broken one retried and reported again
    assert main_data(argv) == 0
    assert "1 already done" in capsys.readouterr().out
    again = read_manifest(out / "clips.jsonl")
    assert [r.path for r in again] == [r.path for r in records]


def test_split_with_two_workers(synth, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("a.mp4", "b.mp4"):
        shutil.copy(synth["cuts"], raw / name)
    report = split_videos(raw, tmp_path / "ds", workers=2)
    assert report.done == 2 and not report.failed
    paths = [r.path for r in read_manifest(tmp_path / "ds" / "clips.jsonl")]
    assert len(paths) == 6 == len(set(paths))
