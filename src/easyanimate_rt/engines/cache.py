"""The engine cache (DESIGN.md 4): built networks keyed by everything that changes them.

``EngineCache(root)`` (default: ``$XDG_CACHE_HOME/easyanimate-rt/engines``) holds one
folder per key, ``<root>/<key>/``, each a complete engine directory of one network with
its manifest. The key is a hash of the ONNX content hash, spec hash, precision, backend,
build flags, profiles, library version and GPU/target. An entry appears only after its
build and parity gate succeed (staged folder, then rename), so a killed build leaves
nothing a later lookup accepts. Two processes building one key take a file lock: the
second waits and reuses the first's result.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from ..errors import EngineError
from .manifest import MANIFEST_NAME, Manifest, digest

log = logging.getLogger(__name__)


# The runtime's engine directories (one per model fingerprint, precision and guidance),
# hard links into the entries beside them; not entries themselves.
MODELS_DIR = "models"


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "easyanimate-rt" / "engines"


def cache_key(fields: Mapping[str, Any]) -> str:
    """The key of a build: 24 hex digits of the hash of its fields."""
    return digest(dict(fields))[:24]


class EngineCache:
    """Built networks under ``root``, keyed by :func:`cache_key`."""

    def __init__(self, root: str | Path | None = None):
        self.root = Path(root) if root is not None else default_cache_dir()

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
        self.root.mkdir(parents=True, exist_ok=True)
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
        for path in sorted(p for p in self.root.iterdir()
                           if p.is_dir() and not p.name.startswith(".") and p.name != MODELS_DIR):
            try:
                out.append((path, Manifest.load(path)))
            except EngineError:
                out.append((path, None))
        return out

    def clean(self) -> int:
        """Remove every entry and leftover staging folder; return how many went."""
        if not self.root.is_dir():
            return 0
        n = 0
        for path in self.root.iterdir():
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                n += not path.name.startswith(".") and path.name != MODELS_DIR
            elif path.name.endswith(".lock"):
                path.unlink(missing_ok=True)
        return n
