"""Shapes metrics (colour, direction, coherence, PSNR) on renders of the world."""

from collections import deque

import numpy as np
import pytest

from easyanimate_rt.shapes import metrics as M
from easyanimate_rt.shapes import world as S


def _specs(n: int, seed: int, split: str | None = None) -> list[S.ShapeSpec]:
    rng = np.random.default_rng(seed)
    return [S.sample_spec(rng, split or S.SPLITS[i % 2]) for i in range(n)]


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
