"""``easyanimate-rt export`` end to end on the tiny preset, and the export directory it
writes (export.json, one folder per graph, atomic writes)."""

from __future__ import annotations

import json

import pytest

from easyanimate_rt.cli import main
from easyanimate_rt.export.index import load_export


def test_export_writes_the_directory_layout(exported):
    out, _ = exported
    index = json.loads((out / "export.json").read_text())
    assert index["graphs"] == ["text_encoder"]
    assert index["source"] == "tiny" and index["precision"] == "fp16" and index["seed"] == 0
    assert sorted(p.name for p in (out / "text_encoder").iterdir()) == ["inputs.npz", "model.onnx", "spec.json"]
    # no temporary files or folders left; the owner mark (fileio.mark_dir) is the one dotfile
    assert [p.name for p in out.rglob(".*")] == [".easyanimate-rt"]
    loaded = load_export(out)
    assert loaded.spec("text_encoder").precision.compute_dtype == "float32"  # fp16 keeps T5 in fp32


def test_export_prints_node_counts_and_builds(exported):
    _, printed = exported
    assert "text_encoder: " in printed and "MatMul 18" in printed and "wrote" in printed
    assert "tensorrt-rtx" not in printed  # engines are built by `easyanimate-rt build`


def test_export_errors_exit_2(tmp_path):
    for argv in (["--precision", "int4"], ["--rtx"]):  # --rtx moved to `build --backend rtx`
        with pytest.raises(SystemExit) as exc:
            main(["export", "tiny", "--out", str(tmp_path), *argv])
        assert exc.value.code == 2
