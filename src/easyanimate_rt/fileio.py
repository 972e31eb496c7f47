"""Atomic file writes: write to a temporary name beside the target, then rename.

An interrupted run therefore never leaves a half-written checkpoint, config or graph.
And no command writes into a folder it does not own: :func:`claim_dir` lets a command
use an output folder only when it is new, empty, or one this package wrote before
(recognised by the file the package writes there, its marker).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


@contextlib.contextmanager
def staged_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``final``; on success it replaces ``final``
    whole (:func:`replace_dir`), on any error it is removed. Readers therefore see the
    old directory or the complete new one, never a half-written one."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a fully written directory ``tmp`` to ``final``, replacing any old one; the
    old copy is kept aside until the new one is in place."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


#: Written into an output folder when a command creates it (:func:`mark_dir`), before
#: anything else: an interrupted command's folder is still recognised as ours.
OWNER_MARKER = ".easyanimate-rt"


def claim_dir(path: str | Path, markers: Sequence[str], what: str, option: str = "--out",
              is_ours: Callable[[Path], bool] | None = None) -> Path:
    """Check that ``path`` may be used as an output folder holding ``what``: it does not
    exist yet, is an empty folder, or is one of ours: ``is_ours(path)`` where given,
    else it holds one of ``markers`` or :data:`OWNER_MARKER` written for ``what`` (files
    this package writes there). Anything else is an InputError naming the path and what
    is in it, raised before any work starts: a command never writes into, replaces or
    deletes a folder of the user's. A file of the user's that merely has a marker's name
    does not pass where ``is_ours`` reads the marker."""
    from .errors import InputError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder; give a new or empty folder for the {what}")
    if not path.exists():
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise InputError(f"{option} {path}: {parent} is a file, not a folder")
        if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
            raise InputError(f"{option} {path}: cannot create it, {parent} is not writable")
        return path
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise InputError(f"{option} {path}: cannot read the folder ({exc.strerror})") from None
    if names:
        ours = is_ours(path) if is_ours is not None else (
            any((path / m).exists() for m in markers) or _marked_as(path, what))
        if not ours:
            lookalike = next((m for m in (*markers, OWNER_MARKER) if (path / m).exists()), None)
            article = "an" if what[:1] in "aeiou" else "a"
            if lookalike is not None:
                raise InputError(f"{option} {path} holds {lookalike}, but it is not {article} {what} written by "
                                 f"easyanimate-rt; give a new or empty folder, nothing was written")
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            raise InputError(f"{option} {path} already holds files that are not {article} {what} written by "
                             f"easyanimate-rt (no {' or '.join(markers)}; found {shown}); give a new or empty "
                             f"folder, nothing was written")
    if not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path} is not writable")
    return path


def _marked_as(path: Path, what: str) -> bool:
    """``path`` holds :data:`OWNER_MARKER` written by :func:`mark_dir` for ``what`` (an
    engine folder is not a model directory to be replaced)."""
    try:
        return (path / OWNER_MARKER).read_text().startswith(f"{what} written by easyanimate-rt")
    except (OSError, UnicodeDecodeError):
        return False


def mark_dir(path: str | Path, what: str) -> Path:
    """Create ``path`` (and its parents) and mark it as this package's ``what``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    marker = path / OWNER_MARKER
    if not marker.exists():
        atomic_write_text(marker, f"{what} written by easyanimate-rt; commands write into this folder and may "
                                  f"replace what they wrote here\n")
    return path


def check_writable_file(path: str | Path, option: str = "--out") -> Path:
    """An InputError, before any work, when ``path`` cannot be written (atomically: a
    temporary file beside it, then a rename): its folder is missing, a file, or read-only."""
    from .errors import InputError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a folder, not a file")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise InputError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{option} {path}: the folder {parent} is not writable (read-only?); give another path")
    return path


def sha256_files(paths: Iterable[Path]) -> str:
    """One sha256 over the bytes of ``paths`` in order (a graph and its external data)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()
