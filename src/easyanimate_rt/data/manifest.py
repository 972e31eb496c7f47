"""The clip manifest: JSONL, one record per clip.

Every stage of the data pipeline, the synthetic-data generator and the trainer share
this format. A record needs ``path``, ``caption``, ``frames``, ``fps``, ``width`` and
``height``; everything else is optional. ``path`` is either absolute or relative to
the folder that holds the manifest. Keys this module does not know are kept in
``ClipRecord.extra`` and written back unchanged, so a stage never drops another
stage's fields.

Writes are crash-safe in two ways:
- ``append_records`` appends, flushes and fsyncs one line at a time, so an interrupted
  run loses nothing it has already written; a half line left by a kill is cut off on
  the next append (and ignored on read), and the record it held is simply redone.
- ``write_manifest`` writes a temporary file and renames it over the target.

A clip's identity is its ``path``: a rerun skips clips whose path is already there.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from easyanimate_rt.errors import InputError
from easyanimate_rt.fileio import atomic_path

logger = logging.getLogger(__name__)

REQUIRED_KEYS = ("path", "caption", "frames", "fps", "width", "height")


@dataclass
class ClipRecord:
    """One clip of the training set.

    ``scores`` maps a score name (``motion``, ``text_area``, ``aesthetic``) to its value,
    or to ``None`` when the score could not be computed; ``missing`` then says why
    (``{"aesthetic": "no aesthetic model given"}``), so a missing score is never a number
    that was made up.
    """

    path: str
    caption: str
    frames: int
    fps: float
    width: int
    height: int
    duration: float | None = None
    start: float | None = None  # seconds into `source`
    end: float | None = None  # seconds into `source`, exclusive
    start_frame: int | None = None
    end_frame: int | None = None  # exclusive
    source: str | None = None
    scores: dict[str, float | None] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise InputError(f"path must be a non-empty string, got {self.path!r}")
        if not isinstance(self.caption, str):
            raise InputError(f"caption must be a string, got {self.caption!r}")
        if isinstance(self.frames, bool) or not isinstance(self.frames, int) or self.frames < 1:
            raise InputError(f"frames must be an integer >= 1, got {self.frames!r}")
        if not _is_number(self.fps) or not self.fps > 0:
            raise InputError(f"fps must be a positive number, got {self.fps!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"{name} must be an integer >= 1, got {value!r}")
        self.fps = float(self.fps)

    @property
    def seconds(self) -> float:
        """Length in seconds: the stored duration, else frames / fps."""
        return self.duration if self.duration is not None else self.frames / self.fps

    def resolve(self, root: str | Path) -> Path:
        """The clip's file, with a relative ``path`` taken relative to ``root``."""
        p = Path(self.path)
        return p if p.is_absolute() else Path(root) / p

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if f.name in REQUIRED_KEYS or value not in (None, {}):
                out[f.name] = value
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ClipRecord":
        if not isinstance(data, Mapping):
            raise InputError(f"a manifest record must be a JSON object, got {type(data).__name__}")
        absent = [k for k in REQUIRED_KEYS if k not in data]
        if absent:
            raise InputError(f"manifest record lacks required keys {absent}: {dict(data)!r:.200}")
        known = {f.name for f in fields(cls)} - {"extra"}
        kwargs = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        for name in ("scores", "missing"):
            if name in kwargs and kwargs[name] is None:
                kwargs[name] = {}
        return cls(**kwargs, extra=extra)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _as_dict(record: ClipRecord | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(record, ClipRecord):
        return record.to_dict()
    return ClipRecord.from_dict(record).to_dict()  # validates


def _dumps(record: ClipRecord | Mapping[str, Any]) -> str:
    # allow_nan=False: NaN is not JSON; a score that could not be computed is null.
    try:
        return json.dumps(_as_dict(record), ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise InputError(f"manifest record holds a non-finite number: {e}") from e


def read_manifest(path: str | Path) -> list[ClipRecord]:
    """Read every record of a JSONL manifest.

    Blank lines are skipped. A last line without its newline that does not parse is
    the remains of an interrupted append: it is ignored with a warning. Any other bad
    line is an InputError naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"manifest {path} does not exist")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    records: list[ClipRecord] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        is_unterminated_tail = number == len(lines)
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            if is_unterminated_tail:
                logger.warning("%s: ignoring an incomplete last line (interrupted write)", path)
                continue
            raise InputError(f"{path}:{number} is not valid JSON: {e}") from e
        try:
            records.append(ClipRecord.from_dict(data))
        except InputError as e:
            raise InputError(f"{path}:{number}: {e}") from e
    return records


def rebase_path(path: str, from_root: str | Path, to_root: str | Path) -> str:
    """A clip path relative to ``from_root``, re-expressed relative to ``to_root``.

    Absolute paths are returned unchanged. Used when a stage writes its manifest in
    another folder than the one it read.
    """
    if Path(path).is_absolute():
        return path
    from_root, to_root = Path(from_root).resolve(), Path(to_root).resolve()
    if from_root == to_root:
        return path
    return Path(os.path.relpath(from_root / path, to_root)).as_posix()


def manifest_paths(path: str | Path) -> set[str]:
    """The ``path`` of every record already in a manifest (empty if it does not exist)."""
    path = Path(path)
    return {r.path for r in read_manifest(path)} if path.is_file() else set()


def _cut_partial_tail(f) -> None:
    """Drop a trailing half line left by a killed writer, so the next record starts clean."""
    f.seek(0, os.SEEK_END)
    size = f.tell()
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    # Walk back to the last newline; everything after it is an unfinished record.
    pos, chunk = size, 4096
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        block = f.read(pos - start)
        idx = block.rfind(b"\n")
        if idx >= 0:
            f.truncate(start + idx + 1)
            return
        pos = start
    f.truncate(0)


def append_jsonl(path: str | Path, objects: Iterable[Mapping[str, Any]]) -> int:
    """Append JSON objects as lines, flushing and fsyncing after each (crash-safe log)."""
    lines = [json.dumps(dict(o), ensure_ascii=False, allow_nan=False) for o in objects]
    return _append_lines(Path(path), lines)


def _append_lines(path: Path, lines: list[str]) -> int:
    if not lines:
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        _cut_partial_tail(f)
        f.seek(0, os.SEEK_END)
        for line in lines:
            f.write(line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
    return len(lines)


def append_records(path: str | Path, records: Iterable[ClipRecord | Mapping[str, Any]]) -> int:
    """Append records to a manifest, flushing and fsyncing after each line.

    Creates the file (and its folder) if needed. Returns how many records were written.
    """
    lines = [_dumps(r) for r in records]  # validate all before writing any
    return _append_lines(Path(path), lines)


def write_manifest(path: str | Path, records: Iterable[ClipRecord | Mapping[str, Any]]) -> None:
    """Write a whole manifest atomically (temporary file, then rename)."""
    lines = [_dumps(r) for r in records]
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
            f.flush()
            os.fsync(f.fileno())
