import json

import numpy as np
import pytest
import torch

from easyanimate_rt.data.manifest import read_manifest
from easyanimate_rt.errors import InputError
from easyanimate_rt.media import read_video, write_clip
from easyanimate_rt.shapes import world as S


def _specs(n: int, seed: int, split: str | None = None) -> list[S.ShapeSpec]:
    rng = np.random.default_rng(seed)
    return [S.sample_spec(rng, split or S.SPLITS[i % 2]) for i in range(n)]


def test_render_is_deterministic_from_the_seed():
    a = S.ShapesDataset("train", frames=9, size=48, length=4, seed=3, still_fraction=0.5)
    b = S.ShapesDataset("train", frames=9, size=48, length=4, seed=3, still_fraction=0.5)
    c = S.ShapesDataset("train", frames=9, size=48, length=4, seed=4, still_fraction=0.5)
    for i in range(4):
        torch.testing.assert_close(a[i]["video"], b[i]["video"], rtol=0, atol=0)
        assert a[i]["caption"] == b[i]["caption"]
    assert any(not torch.equal(a[i]["video"], c[i]["video"]) for i in range(4))
    assert _specs(5, 7) == _specs(5, 7)


def test_dataset_items_and_collate():
    ds = S.ShapesDataset("train", frames=5, size=32, length=16, seed=0, still_fraction=0.5)
    items = [ds[i] for i in range(16)]
    stills = [it for it in items if it["spec"]["still"]]
    assert 0 < len(stills) < 16
    for it in items:
        f = 1 if it["spec"]["still"] else 5
        assert it["video"].shape == (3, f, 32, 32) and it["video"].dtype == torch.float32
        assert -1.0 <= float(it["video"].min()) and float(it["video"].max()) <= 1.0
        assert it["caption"] == S.ShapeSpec.from_dict(it["spec"]).caption
    clips = [it for it in items if not it["spec"]["still"]]
    batch = torch.utils.data.default_collate(clips[:2])
    assert batch["video"].shape == (2, 3, 5, 32, 32)
    with pytest.raises(IndexError):
        ds[16]
    with pytest.raises(InputError, match="split"):
        S.ShapesDataset("test")


def test_captions_follow_the_spec_and_are_in_the_corpus():
    spec = S.ShapeSpec("circle", "red", "white", "small", "left", 0.5, 0.5, 0.02)
    assert spec.caption == "a small red circle moving left on a white background"
    assert S.ShapeSpec("square", "blue", "black", "large", "static", 0.5, 0.5).caption == \
        "a large blue square static on a black background"
    assert S.ShapeSpec("triangle", "green", "gray", "small", "growing", 0.5, 0.5).caption == \
        "a green triangle growing on a gray background"
    assert S.ShapeSpec("circle", "red", "white", "small", "static", 0.5, 0.5, still=True).caption == \
        "a small red circle on a white background"
    corpus = set(S.caption_corpus())
    rng = np.random.default_rng(0)
    for i in range(300):
        spec = S.sample_spec(rng, S.SPLITS[i % 2], still=i % 5 == 0)
        words = spec.caption.split()
        assert spec.caption in corpus
        assert {spec.colour, spec.shape, spec.background} <= set(words)
        assert (spec.motion in words) == (not spec.still)
        assert spec.background in S.allowed_backgrounds(spec.colour)
    with pytest.raises(InputError, match="too close"):
        S.ShapeSpec("circle", "blue", "navy", "small", "static", 0.5, 0.5)


def test_split_by_attribute_combination():
    train, held = set(S.combinations("train")), set(S.combinations("heldout"))
    every = {(c, s, m) for c in S.COLOURS for s in S.SHAPES for m in S.MOTIONS}
    assert train.isdisjoint(held) and train | held == every
    assert 0.12 <= len(held) / len(every) <= 0.18
    # Every single value, and every pair of values, still appears in training.
    for axes in ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2)):
        assert {tuple(c[a] for a in axes) for c in train} == {tuple(c[a] for a in axes) for c in every}
    # Held-out prompts cover every colour and every motion.
    assert {c for c, _, _ in held} == set(S.COLOURS) and {m for _, _, m in held} == set(S.MOTIONS)
    for split, combos in (("train", train), ("heldout", held)):
        assert {s.combination for s in _specs(200, 1, split)} <= combos


@pytest.mark.parametrize("frames", [9, 17, 33])
def test_translation_paths_fit_and_are_centred(frames):
    """Every path stays inside the frame and its midpoint is within PATH_JITTER of the
    centre, so the mean clip of a caption moves the captioned way."""
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(400):
        spec = S.sample_spec(rng, "train", frames=frames)
        if spec.motion not in S.TRANSLATIONS:
            continue
        seen.add(spec.motion)
        start, end = spec.centre_at(0), spec.centre_at(frames - 1)
        reach = 1.15 * S.SIZE_RADIUS[spec.size]
        for c in (start, end):
            assert reach <= c[0] <= 1 - reach and reach <= c[1] <= 1 - reach, spec
        for axis in (0, 1):
            assert abs((start[axis] + end[axis]) / 2 - 0.5) <= S.PATH_JITTER + 1e-9, spec
        axis = 0 if spec.motion in ("left", "right") else 1
        sign = 1 if spec.motion in ("right", "down") else -1
        assert sign * (end[axis] - start[axis]) > 0
    assert seen == set(S.TRANSLATIONS)


@pytest.mark.parametrize("name, frames", [("clip.mp4", 17), ("still.png", 1)])
def test_clip_files_are_lossless(tmp_path, name, frames):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (frames, 24, 40, 3), dtype=np.uint8)  # worst case for a codec
    path = write_clip(video, tmp_path / name, fps=8)
    back, fps = read_video(path)
    assert back.shape == video.shape and np.array_equal(back, video)
    assert fps == 8.0
    assert [p.name for p in tmp_path.iterdir()] == [name]  # no temporary file left


def test_write_dataset_is_resumable(tmp_path):
    kwargs = dict(n=6, split="heldout", frames=9, size=32, fps=8, seed=2, still_fraction=0.3)
    manifest = S.write_dataset(tmp_path, **kwargs)
    records = read_manifest(manifest)
    assert sorted(r.path for r in records) == sorted({r.path for r in records}) and len(records) == 6
    ds = S.ShapesDataset("heldout", 9, 32, 6, seed=2, still_fraction=0.3)
    for r in records:
        i = r.extra["synthetic"]["index"]
        frames, _ = read_video(r.resolve(tmp_path))
        assert np.array_equal(frames, ds.frames_of(i))
        assert r.caption == ds.spec(i).caption and r.frames == len(frames)
        assert (r.width, r.height, r.fps) == (32, 32, 8.0)
        assert S.ShapeSpec.from_dict(r.extra["attributes"]) == ds.spec(i)
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "clips").iterdir()}
    text = manifest.read_text()

    S.write_dataset(tmp_path, **kwargs)  # nothing left to do
    assert manifest.read_text() == text
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "clips").iterdir()} == mtimes

    # An interrupted run: the last record is missing and half a line is left behind.
    lines = text.splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:10])
    S.write_dataset(tmp_path, **kwargs, workers=2)
    again = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(r["path"] for r in again) == sorted(r.path for r in records)

    with pytest.raises(InputError, match="other settings"):
        S.write_dataset(tmp_path, **{**kwargs, "seed": 3})
