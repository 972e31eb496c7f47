"""``engines clean`` removes what the engine cache owns and nothing else: a folder
without the cache's mark is refused, foreign files in a marked cache stay byte for byte,
and nothing goes without --yes (or a "y" on a terminal)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from user_files import snapshot

from easyanimate_rt.cli import main
from easyanimate_rt.engines.cache import TAG_NAME, EngineCache
from easyanimate_rt.errors import InputError


def user_files(root: Path) -> dict[str, bytes | None]:
    """A folder of someone's files, some named like the cache's own."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "holiday.jpg").write_bytes(bytes(range(256)) * 40)
    (root / "main.py").write_text("print('hello')\n")
    (root / "project").mkdir()
    (root / "project" / "notes.txt").write_text("do not lose\n")
    (root / "models").mkdir()                      # the name of the runtime's folder, but not ours
    (root / "models" / "weights.bin").write_bytes(b"\x00\x01" * 100)
    (root / "0123456789abcdef01234567").mkdir()    # an entry-like name, without a manifest
    (root / "0123456789abcdef01234567" / "data.csv").write_text("a,b\n1,2\n")
    return snapshot(root)


def fake_entry(root: Path, key: str) -> Path:
    entry = root / key
    entry.mkdir(parents=True)
    (entry / "manifest.json").write_text("{}")
    (entry / "model.ort.onnx").write_bytes(b"x" * 1000)
    return entry


def test_clean_refuses_a_folder_that_is_not_a_cache(tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    before = user_files(home)
    for extra in ([], ["--yes"], ["--dry-run"]):
        assert main(["engines", "clean", "--cache-dir", str(home), *extra]) == 2
        err = capsys.readouterr().err
        assert f"{home} is not an easyanimate-rt engine cache" in err and TAG_NAME in err and "nothing removed" in err
        assert "Traceback" not in err
    assert snapshot(home) == before
    # a file where the cache should be
    (tmp_path / "file").write_text("x")
    assert main(["engines", "clean", "--cache-dir", str(tmp_path / "file"), "--yes"]) == 2
    assert "is a file" in capsys.readouterr().err and (tmp_path / "file").read_text() == "x"


def test_a_build_into_a_foreign_folder_does_not_mark_it(tmp_path):
    home = tmp_path / "home"
    user_files(home)
    cache = EngineCache(home)
    cache.get_or_build("a" * 24, lambda staging: (staging / "manifest.json").write_text("{}"))
    assert not cache.is_marked() and not (home / TAG_NAME).exists()
    with pytest.raises(InputError, match="not an easyanimate-rt engine cache"):
        cache.plan_clean()


def test_clean_removes_only_the_caches_own_items(tmp_path, capsys, monkeypatch):
    root = tmp_path / "cache"
    cache = EngineCache(root)
    key = "b" * 24
    cache.get_or_build(key, lambda staging: (staging / "manifest.json").write_text("{}"))  # creates and marks
    assert cache.is_marked() and (root / TAG_NAME).read_text().startswith("Signature: 8a477f597d28d172789f06886806bc55")
    fake_entry(root, "c" * 24)
    (root / f".{'d' * 24}.partial-123").mkdir()                         # a killed build's staging folder
    (root / "models" / "tiny-0123456789abcdef" / "ort-cpu-fp32-batched").mkdir(parents=True)
    (root / "timing-GPU-10.cache").write_bytes(b"t")
    ours = {key, "c" * 24, f".{'d' * 24}.partial-123", "models", "timing-GPU-10.cache", f".{key}.lock"}
    foreign_dir = tmp_path / "foreign"
    user_files(foreign_dir)
    for name in ("holiday.jpg", "main.py", "project"):  # someone's files that ended up in the cache folder
        os.rename(foreign_dir / name, root / name)
    kept = {k: v for k, v in snapshot(root).items() if k.split("/")[0] in ("holiday.jpg", "main.py", "project")}

    # no terminal, no --yes: refused, nothing removed, the plan is printed
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["engines", "clean", "--cache-dir", str(root)]) == 2
    out, err = capsys.readouterr()
    assert "pass --yes" in err and all(name in out for name in ours) and "holiday.jpg" in out  # listed as left
    assert ours <= {p.name for p in root.iterdir()}
    # --dry-run lists and keeps
    assert main(["engines", "clean", "--cache-dir", str(root), "--dry-run"]) == 0
    assert "would remove 6 cache items" in capsys.readouterr().out and ours <= {p.name for p in root.iterdir()}

    # a terminal answering "n" keeps everything, "y" removes the cache's items only
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdin", Tty("n\n"))
    assert main(["engines", "clean", "--cache-dir", str(root)]) == 0
    assert "nothing removed" in capsys.readouterr().out and ours <= {p.name for p in root.iterdir()}
    monkeypatch.setattr("sys.stdin", Tty("y\n"))
    assert main(["engines", "clean", "--cache-dir", str(root)]) == 0
    assert "removed 6 cache items" in capsys.readouterr().out
    assert {p.name for p in root.iterdir()} == {TAG_NAME, "holiday.jpg", "main.py", "project"}
    assert {k: v for k, v in snapshot(root).items() if k != TAG_NAME} == kept
    # and again: nothing left to remove
    assert main(["engines", "clean", "--cache-dir", str(root), "--yes"]) == 0
    assert "nothing to remove" in capsys.readouterr().out


def test_an_unmarked_cache_of_an_older_version_is_marked_on_its_next_build(tmp_path):
    root = tmp_path / "old-cache"
    fake_entry(root, "e" * 24)
    (root / f".{'e' * 24}.lock").write_text("")
    cache = EngineCache(root)
    assert not cache.is_marked()
    with pytest.raises(InputError, match="marked the next time it builds"):
        cache.plan_clean()
    cache.get_or_build("f" * 24, lambda staging: (staging / "manifest.json").write_text("{}"))
    assert cache.is_marked()
    assert [p.name for p in cache.clean().remove] == [".eeeeeeeeeeeeeeeeeeeeeeee.lock",
                                                      ".ffffffffffffffffffffffff.lock", "e" * 24, "f" * 24]
    assert [p.name for p in root.iterdir()] == [TAG_NAME]


def test_entries_lists_only_entries(tmp_path):
    root = tmp_path / "cache"
    fake_entry(root, "a" * 24)
    (root / "photos").mkdir()
    assert [p.name for p, _ in EngineCache(root).entries()] == ["a" * 24]
