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
from .spec import INPUTS_NAME, MODEL_NAME, ExportSpec

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

    def check(self, key: str) -> ExportSpec:
        """:func:`check_graph` of ``key``."""
        return check_graph(self.root, key)


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


#: The fields of export.json and their types, checked on every read.
_FIELDS = {"model": str, "precision": str, "graphs": list, "config": dict}


def read_index(root: Path) -> dict[str, Any]:
    """``export.json`` of ``root``, its structure checked; an ExportError naming the file."""
    path = Path(root) / INDEX_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExportError(f"{root} is not an export directory (no {INDEX_NAME})") from None
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path} is not readable JSON ({exc}); it is corrupt, export again") from None
    if not isinstance(data, dict):
        raise ExportError(f"{path} holds a JSON {type(data).__name__}, not an export index; export again")
    if data.get("format") != INDEX_FORMAT:
        raise ExportError(f"{path}: unsupported format {data.get('format')!r}")
    for name, kind in _FIELDS.items():
        if not isinstance(data.get(name), kind):
            raise ExportError(f"{path}: field {name!r} must be a {kind.__name__}, got {data.get(name)!r:.60}; "
                              f"export again")
    if not all(isinstance(g, str) and g and ".." not in g.split("/") for g in data["graphs"]):
        raise ExportError(f"{path}: field 'graphs' must list graph names, got {data['graphs']!r:.80}")
    return data


def load_export(root: str | Path) -> ExportIndex:
    """Read ``export.json`` and the spec of every graph it lists."""
    root = Path(root)
    data = read_index(root)
    specs = {key: ExportSpec.load(root / key) for key in data["graphs"]}
    try:
        seed = int(data.get("seed", 0))
    except (TypeError, ValueError):
        raise ExportError(f"{root / INDEX_NAME}: field 'seed' must be an integer, got {data.get('seed')!r}") from None
    return ExportIndex(root, data["model"], data.get("source"), seed, data["precision"], specs, data["config"])


def check_graph(root: Path, key: str) -> ExportSpec:
    """The graph ``key`` of the export at ``root``, checked whole before use: its spec
    reads, its model.onnx (and external data) have the size and sha256 recorded when it
    was written, and its saved inputs read. An ExportError naming the file otherwise
    (flipped bytes, truncation, a file replaced by hand)."""
    import zipfile

    from ..fileio import sha256_files

    directory = Path(root) / key
    spec = ExportSpec.load(directory)
    graph = spec.graph
    if not graph.get("sha256"):
        raise ExportError(f"{directory / 'spec.json'} records no graph hash; export again")
    files = [directory / graph.get("file", MODEL_NAME)] + (
        [directory / graph["external_data"]] if graph.get("external_data") else [])
    for f in files:
        if not f.is_file():
            raise ExportError(f"{f} is missing; export again")
    size = sum(f.stat().st_size for f in files)
    if size != graph.get("bytes"):
        raise ExportError(f"{files[0]} is {size} bytes, its spec recorded {graph.get('bytes')} (truncated or "
                          f"replaced); export again")
    if sha256_files(files) != graph["sha256"]:
        raise ExportError(f"{files[0]} does not match the sha256 its spec recorded (corrupt or altered); "
                          f"export again")
    inputs = directory / INPUTS_NAME
    if inputs.exists():
        try:
            with zipfile.ZipFile(inputs) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile) as exc:
            raise ExportError(f"{inputs} is not readable ({exc}); export again") from None
        if bad is not None:
            raise ExportError(f"{inputs}: {bad} is corrupt; export again")
    return spec
