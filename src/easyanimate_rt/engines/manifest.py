"""Engine directories (DESIGN.md 4): one folder per network (and decoder variant) with the
built artefact and ``manifest.json``; ``engines.json`` at the top indexes them.

The manifest records everything that decides whether an artefact may be reused: the
source ONNX hash (model.onnx + external data) and spec hash, buckets and their profile
index, precision, backend, build flags, library versions, target (CPU, the local GPU's
name and compute capability, or an ahead-of-time target), I/O per profile, build time,
the artefact's own hash and size, and the parity gate's figures. A mismatch is an
error that says what differs and how to rebuild, never silent reuse. torch-free.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import EngineError
from ..fileio import atomic_write_text, sha256_files

MANIFEST_NAME = "manifest.json"
INDEX_NAME = "engines.json"
FORMAT = 1
BACKENDS = ("trt", "rtx", "ort-cpu", "ort-cuda", "ort-trt")


def onnx_files(onnx_path: Path) -> list[Path]:
    """model.onnx and its external-data file where there is one."""
    data = onnx_path.with_name(onnx_path.name + ".data")
    return [onnx_path] + ([data] if data.exists() else [])


def digest(obj: Any) -> str:
    """sha256 of a JSON-serialisable object (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cuda_visible() -> bool:
    """Whether a CUDA device is visible: no NVIDIA driver means no (without importing
    torch, so a CPU start-up stays torch-free); else torch's word."""
    if not Path("/dev/nvidiactl").exists():
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_NUMBER = (int, float)
#: The manifest's fields and their JSON types, checked on every read.
_TYPES: dict[str, Any] = {
    "key": str, "backend": str, "precision": str, "onnx_sha256": str, "spec_sha256": str, "buckets": dict,
    "profiles": list, "flags": dict, "versions": dict, "target": dict, "artifact": dict,
    "build_seconds": _NUMBER, "parity": dict, "device_memory": list, "cache_key": str, "io": list,
}
_REQUIRED = ("key", "backend", "precision", "onnx_sha256", "spec_sha256", "buckets", "profiles", "flags",
             "versions", "target", "artifact", "build_seconds")


@dataclass
class Manifest:
    """The record of one built network."""

    key: str                      # graph key: dit, vae_decoder/first ...
    backend: str
    precision: str
    onnx_sha256: str
    spec_sha256: str
    buckets: dict[str, int]       # bucket name -> profile index
    profiles: list[dict[str, Any]]  # name, dims (min/opt/max), shapes per input
    flags: dict[str, Any]
    versions: dict[str, str]
    target: dict[str, Any]        # kind cpu | gpu | aot, name, compute_capability
    artifact: dict[str, Any]      # file, bytes, sha256
    build_seconds: float
    parity: dict[str, Any] = field(default_factory=dict)
    device_memory: list[int] = field(default_factory=list)  # activation bytes per profile (TensorRT; [] unknown)
    cache_key: str = ""
    io: list[dict[str, str]] = field(default_factory=list)  # name, mode (input|output), dtype per I/O tensor

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Manifest":
        """The manifest ``d`` holds, its structure checked (an EngineError naming the
        field: a hand-edited or foreign file never reaches the loader)."""
        if not isinstance(d, Mapping):
            raise EngineError(f"an engine manifest is a JSON object, got a {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise EngineError(f"unsupported engine manifest format {d.get('format')!r} (this version reads {FORMAT})")
        for name, kind in _TYPES.items():
            if (name in d and not isinstance(d[name], kind)) or (name in _REQUIRED and name not in d):
                want = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
                raise EngineError(f"field {name!r} must be a {want}, got {d.get(name)!r:.60}")
        artifact = d["artifact"]
        if not (isinstance(artifact.get("file"), str) and Path(artifact["file"]).name == artifact["file"]
                and isinstance(artifact.get("bytes"), int) and isinstance(artifact.get("sha256"), str)):
            raise EngineError(f"field 'artifact' must hold a file name, bytes and sha256, got {artifact!r:.80}")
        if not all(isinstance(v, int) for v in d["buckets"].values()):
            raise EngineError(f"field 'buckets' must map bucket names to profile indices, got {d['buckets']!r:.80}")
        for entry in d.get("io", []):
            if not (isinstance(entry, dict) and all(isinstance(entry.get(k), str) for k in ("name", "mode", "dtype"))
                    and entry["mode"] in ("input", "output")):
                raise EngineError(f"field 'io' must list {{name, mode: input|output, dtype}} per tensor, got "
                                  f"{entry!r:.80}")
        if not all(isinstance(v, int) and v >= 0 for v in d.get("device_memory", [])):
            raise EngineError(f"field 'device_memory' must list bytes per profile, got {d['device_memory']!r:.80}")
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    def save(self, directory: Path) -> None:
        atomic_write_text(directory / MANIFEST_NAME, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise EngineError(f"{Path(directory)} is not an engine directory (no {MANIFEST_NAME})") from None
        except (OSError, ValueError) as exc:  # JSONDecodeError, UnicodeDecodeError, a folder in its place
            raise EngineError(f"{path} is corrupt: {exc}; rebuild with `easyanimate-rt build`") from None
        try:
            return cls.from_dict(data)
        except EngineError as exc:
            raise EngineError(f"{path}: {exc}; rebuild with `easyanimate-rt build`") from None
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineError(f"{path} is not a valid engine manifest ({type(exc).__name__}: {exc}); rebuild "
                              f"with `easyanimate-rt build`") from None

    # -- checks -------------------------------------------------------------------------

    def check_artifact(self, directory: Path) -> None:
        """The artefact is the one the manifest recorded (catches truncation and edits
        even where the library cannot load it on this machine)."""
        path = directory / self.artifact["file"]
        if not path.is_file():
            raise EngineError(f"{path} is missing; rebuild with `easyanimate-rt build`")
        size = path.stat().st_size
        if size != self.artifact["bytes"]:
            raise EngineError(f"{path} is {size} bytes, the manifest says {self.artifact['bytes']} (truncated or "
                              f"replaced); rebuild with `easyanimate-rt build`")
        if sha256_files([path]) != self.artifact["sha256"]:
            raise EngineError(f"{path} does not match its manifest hash (corrupt or altered); rebuild with "
                              f"`easyanimate-rt build`")

    def check_source(self, onnx_path: Path) -> None:
        """The ONNX graph is the one this engine was built from."""
        got = sha256_files(onnx_files(onnx_path))
        if got != self.onnx_sha256:
            raise EngineError(f"{self.key}: {onnx_path} changed since the engine was built (sha256 {got[:12]} vs "
                              f"{self.onnx_sha256[:12]}); rebuild with `easyanimate-rt build`")

    def check_environment(self, versions: Mapping[str, str], target: Mapping[str, Any]) -> None:
        """Library versions and target equal the build's; else what differs."""
        diffs = [f"{k} {self.versions.get(k)!r} -> {v!r}" for k, v in versions.items()
                 if self.versions.get(k) != v]
        for k in ("kind", "name", "compute_capability"):
            if k in target and self.target.get(k) != target[k]:
                diffs.append(f"target {k} {self.target.get(k)!r} -> {target[k]!r}")
        if diffs:
            raise EngineError(f"{self.key}: built for another environment ({'; '.join(diffs)}); rebuild with "
                              f"`easyanimate-rt build`")

    def profile_for(self, bucket: str) -> int:
        if bucket not in self.buckets:
            raise EngineError(f"{self.key} was not built for bucket {bucket}; it has {sorted(self.buckets)}")
        return self.buckets[bucket]


def write_index(root: Path, entries: Mapping[str, Mapping[str, Any]], **info: Any) -> None:
    """``engines.json``: the networks of an engine directory and how they were built."""
    body = {"format": FORMAT, **info, "networks": {k: dict(v) for k, v in sorted(entries.items())}}
    atomic_write_text(root / INDEX_NAME, json.dumps(body, indent=2, sort_keys=True) + "\n")


def read_index(root: str | Path) -> dict[str, Any]:
    """``engines.json`` of ``root``, its structure checked; an EngineError naming the file."""
    path = Path(root) / INDEX_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EngineError(f"{Path(root)} is not an engine directory (no {INDEX_NAME})") from None
    except (OSError, ValueError) as exc:
        raise EngineError(f"{path} is corrupt: {exc}") from None
    if not isinstance(data, dict):
        raise EngineError(f"{path} holds a JSON {type(data).__name__}, not an engine index; rebuild with "
                          f"`easyanimate-rt build`")
    if data.get("format") != FORMAT:
        raise EngineError(f"{path}: unsupported format {data.get('format')!r}")
    networks = data.get("networks")
    if not isinstance(networks, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("dir"), str) and v["dir"] and ".." not in Path(v["dir"]).parts
            and not Path(v["dir"]).is_absolute() for v in networks.values()):
        raise EngineError(f"{path}: field 'networks' must map each network to its folder, got {networks!r:.80}; "
                          f"rebuild with `easyanimate-rt build`")
    return data
