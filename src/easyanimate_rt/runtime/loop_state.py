"""A denoising loop's state between two steps, so a generation stopped after step k
continues from there and ends where an uninterrupted run ends (the job server's
checkpoints, runtime/serve/).

The state is what the next step reads: the latents, the multistep sampler's history
(DPM++: the previous step's x0) and the noise stream's generator state (ancestral
samplers draw from it every step). With them, steps k+1.. are the same arithmetic on
the same inputs as in one run, so the result is bit-equal on the same engines.

Serialised as an ``.npz`` (no pickle): arrays plus one JSON record that names the
request it belongs to; a state is refused for any other request.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import CheckpointError, InputError
from ..reference.request import GenerationRequest

FORMAT = 1


def request_key(req: GenerationRequest) -> str:
    """sha256 of every field that shapes the trajectory (the image's bytes included)."""
    fields = {k: v for k, v in asdict(req).items() if k != "image"}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    if req.image is not None:
        h.update(np.ascontiguousarray(req.image).tobytes())
    return h.hexdigest()


@dataclass
class LoopState:
    """After ``step`` of the request's steps: ``latents`` (1, C, F, h, w) float32, the
    sampler's ``history`` (None for single-step samplers) and the noise generator's
    state (numpy's PCG64 ``bit_generator.state``)."""

    request: str  # request_key of the request it belongs to
    step: int
    latents: np.ndarray
    history: np.ndarray | None
    noise: dict[str, Any]

    def check(self, req: GenerationRequest) -> None:
        if self.request != request_key(req):
            raise InputError("resume: this loop state belongs to another request (prompt, size, steps, "
                             "sampler or seed differ)")
        if not 0 <= self.step <= req.calls:
            raise InputError(f"resume: the state's step must be in [0, {req.calls}], got {self.step}")

    def to_bytes(self) -> bytes:
        meta = {"format": FORMAT, "request": self.request, "step": self.step, "noise": self.noise}
        arrays = {"latents": np.ascontiguousarray(self.latents, np.float32)}
        if self.history is not None:
            arrays["history"] = np.ascontiguousarray(self.history, np.float32)
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "LoopState":
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                latents = z["latents"]
                history = z["history"] if "history" in z.files else None
        except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as exc:
            raise CheckpointError(f"a denoising checkpoint is unreadable ({type(exc).__name__}: {exc})") from exc
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"denoising checkpoint format {meta.get('format')!r}; this version reads {FORMAT}")
        return cls(meta["request"], int(meta["step"]), latents, history, meta["noise"])
