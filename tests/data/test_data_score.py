import json
from pathlib import Path

import numpy as np
import pytest
import torch
from needs import require

require("cv2")
require("rapidocr")

from data_synth import FPS, PAN_PX_PER_FRAME  # noqa: E402

from easyanimate_rt.data.aesthetic import LaionAestheticHead, load_aesthetic_head  # noqa: E402
from easyanimate_rt.data.cli import main_data  # noqa: E402
from easyanimate_rt.data.filter import FilterConfig, Range, filter_records  # noqa: E402
from easyanimate_rt.data.manifest import read_manifest, write_manifest  # noqa: E402
from easyanimate_rt.data.score import (  # noqa: E402
    ScoreConfig,
    motion_indices,
    score_clips,
    uniform_indices,
)


def _manifest(synth, names) -> Path:
    root = synth["root"]
    path = root / f"in-{'-'.join(names)}.jsonl"
    write_manifest(path, [{"path": f"clips/{n}.mp4", "caption": "", "frames": 1, "fps": 1, "width": 1,
                           "height": 1} for n in names])
    return path


@pytest.fixture(scope="module")
def scored(synth, tmp_path_factory):
    """All four clips scored once with every score; no aesthetic model, so that one is missing."""
    out = tmp_path_factory.mktemp("scored") / "scores.jsonl"
    report = score_clips(_manifest(synth, ["static", "pan", "text", "notext"]), out)
    assert report.ok and report.done == 4 and not report.failed
    return {r.path.split("/")[-1][:-4]: r for r in read_manifest(out)}, out


def test_sampling_positions():
    assert motion_indices(30, 10.0) == [0, 5, 10, 15, 20, 25]
    assert motion_indices(50, 25.0) == [0, 12, 25, 38]  # 12.5-frame steps, rounded
    assert uniform_indices(100, 4) == [12, 37, 62, 87]


def test_basic_fields_are_measured(synth, scored):
    records, out = scored
    r = records["pan"]
    assert (r.frames, r.fps, r.width, r.height) == (30, FPS, 96, 64)
    assert r.duration == pytest.approx(3.0)
    assert r.resolve(out.parent).samefile(synth["pan"])  # path rebased to the output folder


def test_motion_scores_ordered_and_in_range(scored):
    records, _ = scored
    static, pan = records["static"].scores["motion"], records["pan"].scores["motion"]
    assert static < 0.3
    expected = PAN_PX_PER_FRAME * FPS / 2  # pixels moved between two 2 fps samples
    assert pan == pytest.approx(expected, rel=0.2)
    kept, summary = filter_records(list(records.values()), FilterConfig(max_text=None, min_aesthetic=None))
    assert [r.path.split("/")[-1] for r in kept] == ["pan.mp4"]
    assert summary.removed_by == {"motion 3:8": 3}
    kept, _ = filter_records([records["pan"]], FilterConfig(motion=Range(6.0, 8.0), max_text=None))
    assert kept == []


def test_text_area_near_rendered_area(synth, scored):
    records, _ = scored
    area = synth["text_area"]
    assert abs(records["text"].scores["text_area"] - area) < 0.5 * area
    assert records["notext"].scores["text_area"] < 0.005
    assert records["static"].scores["text_area"] < 0.005


def test_aesthetic_missing_without_model(scored):
    records, _ = scored
    for r in records.values():
        assert r.scores["aesthetic"] is None
        assert "aesthetic" in r.missing


def test_filter_cli_defaults_and_summary(scored, tmp_path, capsys):
    _, out = scored
    dst = tmp_path / "filtered.jsonl"
    assert main_data(["filter", str(out.parent), "--output", str(dst)]) == 0
    printed = capsys.readouterr().out
    assert "kept 1 of 4" in printed and "motion 3:8" in printed
    assert [r.path.split("/")[-1] for r in read_manifest(dst)] == ["pan.mp4"]
    summary = json.loads((tmp_path / "filter_summary.json").read_text())
    assert summary["removed_by"]["motion 3:8"] == 3 and summary["missing"] == {"aesthetic": 4}
    assert read_manifest(dst)[0].resolve(tmp_path).is_file()  # path rebased to the new folder
    # a missing score drops the clip when asked to
    assert main_data(["filter", str(out.parent), "--output", str(dst), "--on-missing", "drop"]) == 0
    assert read_manifest(dst) == []


def _tiny_clip(folder):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)


def test_aesthetic_plumbing_with_tiny_models(synth, tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    _tiny_clip(tmp_path / "clip")
    torch.manual_seed(1)
    head = LaionAestheticHead((16, 32, 16, 8, 4, 1))
    torch.save(head.state_dict(), tmp_path / "head.pth")
    out = tmp_path / "scores.jsonl"
    config = ScoreConfig(scores=("aesthetic",), clip_model=str(tmp_path / "clip"),
                         aesthetic_head=str(tmp_path / "head.pth"))
    report = score_clips(_manifest(synth, ["pan", "text"]), out, config)
    assert report.done == 2
    records = read_manifest(out)
    # the same score computed here by hand, from an independent decode of the frames
    import imageio.v2 as iio

    model = CLIPVisionModelWithProjection.from_pretrained(tmp_path / "clip").eval()
    processor = CLIPImageProcessor.from_pretrained(tmp_path / "clip")
    loaded = load_aesthetic_head(tmp_path / "head.pth").eval()
    for r in records:
        frames = iio.mimread(r.resolve(out.parent), memtest=False)
        picked = [frames[i] for i in uniform_indices(len(frames), 4)]
        with torch.no_grad():
            emb = model(**processor(images=picked, return_tensors="pt")).image_embeds
            expected = loaded(emb / emb.norm(dim=-1, keepdim=True)).mean().item()
        assert r.scores["aesthetic"] == pytest.approx(expected, rel=1e-4, abs=1e-5)
        assert r.scores["motion"] is None and r.missing["motion"] == "not requested"
        assert "aesthetic" not in r.missing


def test_head_loader_rejects_foreign_weights(tmp_path):
    from easyanimate_rt.errors import CheckpointError

    torch.save({"fc.weight": torch.zeros(1, 4)}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match="not a LAION aesthetic head"):
        load_aesthetic_head(tmp_path / "x.pth")
    assert np.prod(LaionAestheticHead().layers[0].weight.shape) == 768 * 1024
