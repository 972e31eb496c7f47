import argparse
import shutil
import textwrap

import pytest
from needs import require

from easyanimate_rt.data import cli
from easyanimate_rt.data.filter import Range
from easyanimate_rt.data.manifest import read_manifest


def test_add_data_parser_wires_every_stage():
    top = argparse.ArgumentParser(prog="easyanimate-rt")
    sub = top.add_subparsers(dest="command")
    cli.add_data_parser(sub)
    cases = {
        ("data", "split", "in", "--out", "o"): cli.cmd_split,
        ("data", "score", "d"): cli.cmd_score,
        ("data", "filter", "d"): cli.cmd_filter,
        ("data", "caption", "d", "--model", "m"): cli.cmd_caption,
    }
    for argv, func in cases.items():
        assert top.parse_args(argv).func is func
    args = top.parse_args(["data", "filter", "d"])
    assert (args.motion, args.max_text, args.min_aesthetic) == (Range(3.0, 8.0), 0.02, 4.0)
    args = top.parse_args(["data", "filter", "d", "--motion", "none", "--min-aesthetic", "none", "--duration", "3:"])
    assert args.motion is None and args.min_aesthetic is None and args.duration == Range(3.0, None)
    args = top.parse_args(["data", "split", "in", "--out", "o"])
    assert (args.min_seconds, args.max_seconds, args.cascade, args.cut) == (3.0, 10.0, "10:0,20:1,30:2", "auto")
    with pytest.raises(SystemExit):
        top.parse_args(["data"])  # a stage is required


def test_missing_input_is_an_input_error(tmp_path, capsys):
    assert cli.main_data(["score", str(tmp_path), "--no-progress"]) == 2
    assert "no manifest" in capsys.readouterr().err
    assert cli.main_data(["split", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert cli.main_data(["split", str(tmp_path), "--out", str(tmp_path / "o"), "--cascade", "10"]) == 2


def test_pipeline_end_to_end(synth, tmp_path, monkeypatch, capsys):
    require("scenedetect")
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(synth["cuts"], raw / "cuts.mp4")
    ds = tmp_path / "ds"
    (tmp_path / "cap_plugin.py").write_text(textwrap.dedent("""
        def make(model_path):
            return lambda image: f"an image of a scene with mean level {int(image.mean())}"
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    run = cli.main_data
    assert run(["split", str(raw), "--out", str(ds), "--no-progress"]) == 0
    assert run(["score", str(ds), "--scores", "motion", "--no-progress"]) == 0
    assert run(["filter", str(ds), "--motion", "none"]) == 0
    assert run(["caption", str(ds), "--captioner", "cap_plugin:make", "--no-progress"]) == 0
    final = read_manifest(ds / "manifest.jsonl")
    assert len(final) == 3
    for r in final:
        assert r.caption.startswith("In this video, a scene with mean level")
        assert r.resolve(ds).is_file() and r.scores["motion"] is not None and r.start_frame is not None
    assert {p.name for p in ds.iterdir()} >= {"clips", "clips.jsonl", "scores.jsonl", "filtered.jsonl",
                                               "filter_summary.json", "manifest.jsonl"}
    capsys.readouterr()
