"""``easyanimate-rt verify`` end to end: the CLI export of conftest's ``exported`` fixture
compared with the torch reference on its saved inputs and on a recorded-inputs file."""

from __future__ import annotations

import numpy as np
import pytest
from needs import ON_CI

from easyanimate_rt.cli import main
from easyanimate_rt.engines import tensorrt_rtx as rtx
from easyanimate_rt.export.index import load_export


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


@pytest.mark.tensorrt
@pytest.mark.skipif(not rtx.is_available() and not ON_CI, reason="tensorrt-rtx is not installed (extra: rtx)")
def test_verify_rtx_builds_every_graph(exported, capsys):
    assert main(["verify", str(exported[0]), "--rtx"]) == 0
    out = capsys.readouterr().out
    assert f"tensorrt-rtx {rtx.version()} SM89: text_encoder" in out and "built in" in out
