"""The benchmark suite's arithmetic and report: the time fit, the target verdicts, the
fixed result columns, and RESULTS.md's generated section replaced in place."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import common  # noqa: E402
import report  # noqa: E402
from run import linear_fit  # noqa: E402


def test_linear_fit():
    fit = linear_fit([9, 17, 33, 65], [0.1 + 0.01 * f for f in (9, 17, 33, 65)])
    assert fit["a"] == pytest.approx(0.1) and fit["b"] == pytest.approx(0.01) and fit["r2"] == pytest.approx(1.0)
    bent = linear_fit([1, 2, 3, 4], [1, 4, 9, 16])
    assert bent["r2"] < 0.97


EXTRAS = {
    "dit": {"torch": 30.0, "ort": 20.0, "ort-fused": 14.0, "runtime": 16.0},
    "bound": {"torch": 2.0, "ort": 1.0}, "bound_peak_fraction": {"ort": 0.6, "torch": 0.3},
    "vae_scaling": {"points": [{"frames": 17, "s": 0.1, "rss_mb": 10.0}, {"frames": 145, "s": 0.8, "rss_mb": 12.0}],
                    "fit": {"a": 0.0, "b": 0.0055, "r2": 0.999}},
    "runtime": {"overhead_share": 0.016, "end_to_end_reference_s": 3.0, "end_to_end_runtime_s": 1.0,
                "process_runtime_s": 1.0, "process_reference_s": 5.0, "first_run_s": 40.0},
    "peer": {"shapes": {"pixart": 7.0, "ort": 3.5}},
}


def test_target_verdicts():
    t = {row[0].strip(): row[1:] for row in report.targets(EXTRAS)}
    runtime = t["DiT step, runtime ORT engine vs torch eager (shipped model)"]
    assert runtime[0] == "1.88x" and runtime[2] == "no (missed by 6%)"
    assert t["best ONNX Runtime variant (ort-fused) vs torch eager"][2] == "yes"
    assert t["DiT step, ORT vs torch eager (compute-bound config)"][0] == "2.00x"
    assert t["compute-bound DiT step, fraction of the fp32 matmul peak (ort)"] == ("60.0%", ">= 50%", "yes")
    assert t["VAE decode peak memory, 145 / 17 frames"][2] == "no"  # 1.2x > 1.1x
    assert t["runtime overhead (loop outside the DiT engine)"] == ("1.60%", "<= 3%", "yes")
    assert t["shapes: diffusers PixArt (eager) / our 1-frame DiT step on ort"][0] == "2.00x"


def test_rows_have_the_fixed_columns_and_the_report_replaces_its_block(tmp_path):
    info = {"machine": "m", "cpu": "c", "gpu": "", "versions": "v", "commit": "abc"}
    stats = common.Stats([0.010, 0.012, 0.011, 0.013])
    r = common.row("dit", "step", backend="ort", stats=stats, flops=1e9, peak=2e11, threads=2, info=info)
    assert tuple(r) == common.COLUMNS
    assert r["median_ms"] == pytest.approx(11.5) and r["flops_per_s"] == pytest.approx(1e9 / 0.0115)
    assert r["peak_fraction"] == pytest.approx(1e9 / 0.0115 / 2e11, abs=1e-4)
    out = tmp_path / "results"
    js, cs = common.write_rows([r], out, "suite-cpu")
    assert next(csv.reader(cs.open())) == list(common.COLUMNS)
    (out / "suite-cpu-extras.json").write_text(json.dumps(EXTRAS))
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmark results\n\nhand-written part\n")
    for _ in range(2):  # the second run replaces the block, it does not append another
        report.regenerate(out, "cpu", md)
    text = md.read_text()
    begin, end = report.markers("cpu")
    assert text.count(begin) == 1 and text.count(end) == 1 and "hand-written part" in text
    assert "| dit | step | ort |" in text and "(missed by 6%)" in text
