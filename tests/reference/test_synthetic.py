import json
from collections import deque

import numpy as np
import pytest
import torch

from easyanimate_rt.data.manifest import read_manifest
from easyanimate_rt.errors import InputError
from easyanimate_rt.reference.train import shapes_metrics as M
from easyanimate_rt.reference.train import synthetic as S
from easyanimate_rt.reference.video import read_video


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


def _frame_specs() -> list[S.ShapeSpec]:
    specs = _specs(56, 11)
    # Make sure every motion shows up however the draw falls.
    rng = np.random.default_rng(5)
    for motion in S.MOTIONS:
        while True:
            spec = S.sample_spec(rng, "train")
            if spec.motion == motion:
                specs.append(spec)
                break
    return specs


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


def test_metrics_are_right_on_ground_truth_renders():
    specs = _frame_specs()
    assert len(specs) >= 48
    for spec in specs:
        video = S.render(spec, 17, 64)
        score = M.score_video(video, spec)
        assert score["colour"] == spec.colour, spec
        assert score["motion"] == spec.motion, spec
        assert score["direction_ok"] is (True if spec.motion in S.TRANSLATIONS else None)
        assert score["coherent"], (spec, M.blob_stats(video))


def test_metrics_at_other_geometries_and_on_stills():
    rng = np.random.default_rng(2)
    for size, frames in ((32, 9), (96, 25)):
        for _ in range(4):
            spec = S.sample_spec(rng, "train", frames=frames)
            video = S.render(spec, frames, size)
            assert video.shape == (frames, size, size, 3)
            assert M.score_video(video, spec)["motion"] == spec.motion
    spec = S.sample_spec(rng, "heldout", still=True)
    still = S.render(spec, 1, 64)
    score = M.score_video(still[0], spec)
    assert score["colour_ok"] and score["coherent"] and score["motion_ok"] is None


def test_metrics_tolerate_mild_noise():
    rng = np.random.default_rng(3)
    for spec in _specs(12, 4):
        video = S.render(spec)
        noisy = np.clip(video + rng.normal(0, 6, video.shape), 0, 255).astype(np.uint8)
        score = M.score_video(noisy, spec)
        assert score["colour_ok"] and score["motion_ok"] and score["coherent"], (spec, score)


def test_metrics_negative_controls():
    a = S.ShapeSpec("circle", "red", "white", "large", "right", 0.25, 0.25, 0.02)
    b = S.ShapeSpec("square", "green", "white", "small", "static", 0.75, 0.75)
    va = S.render(a)
    # Two separate blobs.
    vb = S.render(b)
    two = np.where((vb != 255).any(-1, keepdims=True), vb, va)
    assert not M.is_coherent_blob(two)
    # Random noise.
    noise = np.random.default_rng(0).integers(0, 256, va.shape, dtype=np.uint8)
    assert not M.is_coherent_blob(noise)
    # A shape of another colour, or going the other way.
    score = M.score_video(va, S.ShapeSpec("circle", "blue", "white", "large", "left", 0.5, 0.5, 0.02))
    assert score["colour"] == "red" and not score["colour_ok"] and score["direction_ok"] is False
    # The object blinking out every other frame, and an empty video.
    blink = va.copy()
    blink[1::2] = 255
    assert not M.is_coherent_blob(blink)
    empty = np.full_like(va, 255)
    assert not M.is_coherent_blob(empty) and M.dominant_colour(empty) is None
    assert M.motion_direction(empty) == "static"


def _bfs_count(mask: np.ndarray) -> list[int]:
    seen, sizes = np.zeros_like(mask), []
    h, w = mask.shape
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0], queue, n = True, deque([(y0, x0)]), 0
        while queue:
            y, x = queue.popleft()
            n += 1
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        sizes.append(n)
    return sorted(sizes)


def test_label_components_matches_a_bfs():
    rng = np.random.default_rng(0)
    masks = [rng.random((24, 31)) < p for p in (0.2, 0.45, 0.6, 0.9)]
    snake = np.zeros((21, 21), bool)  # one long serpentine component
    snake[::4] = True
    for k, row in enumerate(range(1, 21, 4)):
        snake[row:row + 3, -1 if k % 2 == 0 else 0] = True
    masks += [snake, np.zeros((5, 5), bool), np.ones((5, 5), bool)]
    for mask in masks:
        labels, count = M.label_components(mask)
        sizes = sorted(np.bincount(labels.reshape(-1), minlength=count + 1)[1:].tolist())
        assert sizes == _bfs_count(mask) and (labels > 0).sum() == mask.sum()
    assert M.label_components(snake)[1] == 1


def test_psnr():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    assert M.psnr(a, b) == float("inf")
    b[...] = 1
    assert M.psnr(a, b) == pytest.approx(20 * np.log10(255.0))


@pytest.mark.parametrize("name, frames", [("clip.mp4", 17), ("still.png", 1)])
def test_clip_files_are_lossless(tmp_path, name, frames):
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (frames, 24, 40, 3), dtype=np.uint8)  # worst case for a codec
    path = S.write_clip(video, tmp_path / name, fps=8)
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
