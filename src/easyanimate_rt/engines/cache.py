"""The engine cache (DESIGN.md 4): built networks keyed by everything that changes them.

``EngineCache(root)`` (default: ``$XDG_CACHE_HOME/easyanimate-rt/engines``) holds one
folder per key, ``<root>/<key>/``, each a complete engine directory of one network with
its manifest. The key is a hash of the ONNX content hash, spec hash, precision, backend,
build flags, profiles, library version and GPU/target. An entry appears only after its
build and parity gate succeed (staged folder, then rename), so a killed build leaves
nothing a later lookup accepts. Two processes building one key take a file lock: the
second waits and reuses the first's result.

The cache marks its root when it creates it (``CACHEDIR.TAG``, the Cache Directory
Tagging convention backup tools honour) and :meth:`EngineCache.clean` removes only what
that marked root holds in the cache's own layout: entry folders named by a key,
staging folders and lock files of builds, the runtime's ``models/`` folder and TensorRT
timing caches. A folder without the marker is refused; anything else in it is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..errors import EngineError, InputError
from ..fileio import atomic_write_text
from .manifest import MANIFEST_NAME, Manifest, digest

log = logging.getLogger(__name__)


# The runtime's engine directories (one per model fingerprint, precision and guidance),
# hard links into the entries beside them; not entries themselves.
MODELS_DIR = "models"
#: The cache's mark on its root (https://bford.info/cachedir/): the first line is the
#: convention's signature.
TAG_NAME = "CACHEDIR.TAG"
TAG_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
TAG_TEXT = (f"{TAG_SIGNATURE}\n# This folder is an easyanimate-rt engine cache: built engines, rebuilt on demand.\n"
            f"# `easyanimate-rt engines clean` removes the cache's own entries here and nothing else.\n")
_KEY = re.compile(r"[0-9a-f]{24}")
_STAGING = re.compile(r"\.[0-9a-f]{24}\.partial-\d+")
_LOCK = re.compile(r"\.[0-9a-f]{24}\.lock")
_TIMING = re.compile(r"timing-.+\.cache")      # TensorRT timing caches (build.py)
_MODEL_DIR = re.compile(r".+-[0-9a-f]{16}")     # models/<model name>-<fingerprint>


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "easyanimate-rt" / "engines"


def cache_key(fields: Mapping[str, Any]) -> str:
    """The key of a build: 24 hex digits of the hash of its fields."""
    return digest(dict(fields))[:24]


def _owned(path: Path) -> bool:
    """Whether ``path`` (an item of the root) is in the cache's own layout."""
    name = path.name
    if path.is_symlink():
        return False
    if path.is_dir():
        if _KEY.fullmatch(name):
            return (path / MANIFEST_NAME).is_file()  # entries are renamed into place after their manifest
        if name == MODELS_DIR:
            return all(p.is_dir() and _MODEL_DIR.fullmatch(p.name) for p in path.iterdir())
        return bool(_STAGING.fullmatch(name))
    return bool(_LOCK.fullmatch(name) or _TIMING.fullmatch(name))


@dataclass
class CleanPlan:
    """What :meth:`EngineCache.clean` removes (``remove``: the cache's own items, with
    their total size) and leaves (``foreign``: anything else in the root)."""

    root: Path
    remove: list[Path]
    foreign: list[Path]
    bytes: int


class EngineCache:
    """Built networks under ``root``, keyed by :func:`cache_key`."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

    # --- the root's mark -------------------------------------------------------------------

    def is_marked(self) -> bool:
        try:
            return (self.root / TAG_NAME).read_text().startswith(TAG_SIGNATURE)
        except (OSError, UnicodeDecodeError):
            return False

    def _make_root(self) -> None:
        """Create the root and mark it; an existing unmarked root is marked only when it
        holds nothing but the cache's own layout (a cache of an older version)."""
        if self.root.exists() and not self.root.is_dir():
            raise InputError(f"engine cache {self.root} is a file, not a folder; give --cache-dir a folder")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.is_marked() and all(_owned(p) for p in self.root.iterdir()):
            atomic_write_text(self.root / TAG_NAME, TAG_TEXT)

    def path(self, key: str) -> Path:
        return self.root / key

    def lookup(self, key: str) -> Path | None:
        """The entry of ``key`` when it is complete and its artefact intact, else None
        (a damaged entry is logged and ignored, then replaced by the next build)."""
        path = self.path(key)
        if not (path / MANIFEST_NAME).is_file():
            return None
        try:
            manifest = Manifest.load(path)
            manifest.check_artifact(path)
        except EngineError as exc:
            log.warning("engine cache entry %s is damaged (%s); it will be rebuilt", path, exc)
            return None
        return path

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        self._make_root()
        with open(self.root / f".{key}.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes (or the process dies)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get_or_build(self, key: str, build: Callable[[Path], None]) -> tuple[Path, bool]:
        """(entry path, built now?). ``build(staging_dir)`` writes a complete entry (its
        manifest last); it runs at most once per key across processes."""
        found = self.lookup(key)
        if found is not None:
            return found, False
        with self._lock(key):
            found = self.lookup(key)  # another process may have built it while we waited
            if found is not None:
                return found, False
            final = self.path(key)
            staging = self.root / f".{key}.partial-{os.getpid()}"
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            try:
                build(staging)
                if not (staging / MANIFEST_NAME).is_file():
                    raise EngineError(f"build of {key} wrote no {MANIFEST_NAME}")
                if final.exists():
                    shutil.rmtree(final)  # a damaged entry lookup() refused
                staging.rename(final)
            finally:
                if staging.exists():
                    shutil.rmtree(staging)
            return final, True

    def entries(self) -> list[tuple[Path, Manifest | None]]:
        """Every entry with its manifest (None where unreadable)."""
        out = []
        if not self.root.is_dir():
            return out
        for path in sorted(p for p in self.root.iterdir() if p.is_dir() and _KEY.fullmatch(p.name)):
            try:
                out.append((path, Manifest.load(path)))
            except EngineError:
                out.append((path, None))
        return out

    def plan_clean(self) -> CleanPlan:
        """What :meth:`clean` would remove; an InputError (nothing removed) when the root
        is not a marked engine cache."""
        if not self.root.exists():
            return CleanPlan(self.root, [], [], 0)
        if not self.root.is_dir():
            raise InputError(f"{self.root} is a file, not an engine cache; nothing removed")
        if not self.is_marked():
            raise InputError(f"{self.root} is not an easyanimate-rt engine cache (no {TAG_NAME} with the cache's "
                             f"signature, which the cache writes when it creates its root); nothing removed. A "
                             f"cache made by an older version is marked the next time it builds an engine")
        remove, foreign, size = [], [], 0
        for path in sorted(self.root.iterdir()):
            if path.name == TAG_NAME:
                continue
            if _owned(path):
                remove.append(path)
                size += _size(path)
            else:
                foreign.append(path)
        return CleanPlan(self.root, remove, foreign, size)

    def clean(self, plan: CleanPlan | None = None) -> CleanPlan:
        """Remove the cache's own items (``plan``, default :meth:`plan_clean`); the root
        and its mark stay, and so does anything that is not the cache's."""
        plan = plan or self.plan_clean()
        for path in plan.remove:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        return plan


def _size(path: Path) -> int:
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
