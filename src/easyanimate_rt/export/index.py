"""``export.json``: the index of an export directory (which model, source, precision and
graphs; the versions that wrote it). torch-free, so the engine builder and the runtime
read exports without importing torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ExportError
from ..fileio import atomic_write_text
from .spec import MODEL_NAME, ExportSpec

INDEX_NAME = "export.json"
INDEX_FORMAT = 1


@dataclass
class ExportIndex:
    """What an export directory holds: ``export.json`` plus every graph's spec."""

    root: Path
    model: str
    source: str | None
    seed: int
    precision: str
    specs: dict[str, ExportSpec]
    config: dict[str, Any]

    def spec(self, network: str, variant: str = "") -> ExportSpec:
        key = f"{network}/{variant}" if variant else network
        if key not in self.specs:
            raise ExportError(f"{self.root} has no graph {key!r}; it has {sorted(self.specs)}")
        return self.specs[key]

    def path(self, key: str) -> Path:
        return self.root / key / MODEL_NAME


def write_index(root: Path, *, model: str, source: str | None, seed: int, precision: str,
                graphs: Iterable[str], config: Mapping[str, Any], versions: Mapping[str, str],
                source_sha256: str | None = None) -> None:
    """Write ``export.json`` (last, atomically: an export is complete once it exists).
    Graphs of an earlier export of the same model (same fingerprint, when recorded) and
    precision in ``root`` are kept."""
    graphs = set(graphs)
    old = read_index(root) if (root / INDEX_NAME).exists() else None
    if (old and old.get("precision") == precision and old.get("model") == model
            and old.get("source_sha256") == source_sha256):
        graphs |= set(old.get("graphs", []))
    index = {"format": INDEX_FORMAT, "model": model, "source": source, "seed": seed, "precision": precision,
             "graphs": sorted(graphs), "config": dict(config), "versions": dict(versions)}
    if source_sha256 is not None:
        index["source_sha256"] = source_sha256
    atomic_write_text(root / INDEX_NAME, json.dumps(index, indent=2, sort_keys=True) + "\n")


def read_index(root: Path) -> dict[str, Any]:
    try:
        data = json.loads((root / INDEX_NAME).read_text())
    except FileNotFoundError:
        raise ExportError(f"{root} is not an export directory (no {INDEX_NAME})") from None
    if data.get("format") != INDEX_FORMAT:
        raise ExportError(f"{root / INDEX_NAME}: unsupported format {data.get('format')!r}")
    return data


def load_export(root: str | Path) -> ExportIndex:
    """Read ``export.json`` and the spec of every graph it lists."""
    root = Path(root)
    data = read_index(root)
    specs = {key: ExportSpec.load(root / key) for key in data["graphs"]}
    return ExportIndex(root, data["model"], data.get("source"), int(data.get("seed", 0)), data["precision"],
                       specs, data["config"])
