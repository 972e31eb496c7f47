"""Someone's folder, for the tests that point a command at it: every file must stay
byte for byte (``snapshot`` before and after)."""

from __future__ import annotations

from pathlib import Path


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` -> its bytes (None for a folder)."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None)
            for p in sorted(Path(root).rglob("*"))}


def user_folder(path: Path, *names: str) -> Path:
    """A folder of the user's: a photo, a script, subfolders with a note and a video, and ``names``
    (files named like the ones a command writes), each with the user's own content."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "holiday.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(range(256)) * 8)
    (path / "prepare.py").write_text("print('my own script')\n")
    (path / "notes").mkdir(exist_ok=True)
    (path / "notes" / "todo.txt").write_text("back up the photos\n")
    (path / "videos").mkdir(exist_ok=True)
    (path / "videos" / "birthday.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    for name in names:
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(f'{{"mine": "the user\'s own {name}"}}\n')
    return path
