"""Atomic files and staged directories: an interrupted write never leaves a half result."""

import pytest

from easyanimate_rt.fileio import atomic_path, atomic_write_text, staged_dir


def test_atomic_write_replaces_whole_and_cleans_up(tmp_path):
    target = tmp_path / "a" / "config.json"
    atomic_write_text(target, "one")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "one"
    assert sorted(p.name for p in target.parent.iterdir()) == ["config.json"]


def test_staged_dir_swaps_in_a_complete_directory(tmp_path):
    final = tmp_path / "model"
    with staged_dir(final) as tmp:
        (tmp / "weights").write_text("v1")
    assert (final / "weights").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with staged_dir(final) as tmp:
            (tmp / "weights").write_text("v2, half written")
            raise RuntimeError("killed")
    assert (final / "weights").read_text() == "v1"  # the old directory, untouched
    with staged_dir(final) as tmp:
        (tmp / "other").write_text("v3")
    assert sorted(p.name for p in final.iterdir()) == ["other"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or old copy left
