"""``easyanimate-rt export`` / ``verify`` end to end on the tiny preset, and the export
directory they share (export.json, one folder per graph, atomic writes)."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from easyanimate_rt.engines import rtx
from easyanimate_rt.export.onnx import load_export
from easyanimate_rt.runtime.cli import main


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """One CLI export (T5 only: the cheapest graph; the other graphs' directories are
    covered by the library tests), with its printed report."""
    out = tmp_path_factory.mktemp("cli") / "tiny-fp16"
    argv = ["export", "tiny", "--out", str(out), "--precision", "fp16", "--networks", "text_encoder", "-q"]
    if rtx.is_available():
        argv.append("--rtx")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(argv) == 0
    return out, printed.getvalue()


def test_export_writes_the_directory_layout(exported):
    out, _ = exported
    index = json.loads((out / "export.json").read_text())
    assert index["graphs"] == ["text_encoder"]
    assert index["source"] == "tiny" and index["precision"] == "fp16" and index["seed"] == 0
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == ["inputs.npz", "model.onnx", "spec.json"]
    assert not [p for p in out.rglob(".*")]  # no temporary files or folders left
    loaded = load_export(out)
    assert loaded.spec("text_encoder").precision.compute_dtype == "float32"  # fp16 keeps T5 in fp32


def test_export_prints_node_counts_and_builds(exported):
    _, printed = exported
    assert "text_encoder: " in printed and "MatMul 18" in printed and "wrote" in printed
    if rtx.is_available():
        assert "tensorrt-rtx" in printed and "built in" in printed


def test_verify_on_saved_inputs(exported, capsys):
    assert main(["verify", str(exported[0])]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("text_encoder") and line.rstrip().endswith("yes") for line in out.splitlines()), out
    assert "all graphs within tolerance" in out


def test_verify_with_recorded_inputs_file(exported, tmp_path, capsys):
    spec = load_export(exported[0]).spec("text_encoder")
    feeds = [spec.random_inputs({"batch": b}, seed=b) for b in (1, 1, 1)]
    stacked = {k: np.stack([f[k] for f in feeds]) for k in feeds[0]}
    np.savez(tmp_path / "steps.npz", **stacked)
    assert main(["verify", str(exported[0]), "--networks", "text_encoder", "--inputs", str(tmp_path / "steps.npz"),
                 "--backends", "ort"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("text_encoder")]
    assert len(rows) == 3


def test_verify_errors_exit_2(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "not an export directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["export", "tiny", "--out", str(tmp_path), "--precision", "int4"])
    assert exc.value.code == 2
