"""What a pipeline runs, decided once at the boundary: a model directory or a preset
(random weights from a seed), its fingerprint (which names its engines in the cache) and
its configuration, read without torch where the files allow. Later: adapters (LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..reference.config import ModelConfig, from_preset, model_fingerprint, preset_name, read_model_config


def read_config(source: str | Path) -> ModelConfig | None:
    """The model's config without torch: ``easyanimate_rt.json`` or a preset; None for a
    directory that needs the loader (an upstream release directory)."""
    if Path(source).is_dir():
        return read_model_config(source)
    return from_preset(preset_name(source))


@dataclass(frozen=True)
class ModelSource:
    """A model directory (``path``) or preset (``preset``), with the ``seed`` of a preset's
    random weights, the ``fingerprint`` of its files and its torch-free ``config`` (None:
    an upstream release directory, whose config needs the loader)."""

    path: Path | None
    preset: str | None
    seed: int
    fingerprint: str
    config: ModelConfig | None

    @classmethod
    def of(cls, source: "str | Path | ModelSource", seed: int = 0) -> "ModelSource":
        """``source`` checked and read once: a missing folder or unknown preset is an error
        here, before any work."""
        if isinstance(source, ModelSource):
            return source
        config = read_config(source)
        is_dir = Path(source).is_dir()
        return cls(Path(source) if is_dir else None, None if is_dir else str(source), seed,
                   model_fingerprint(source, seed), config)

    @property
    def name(self) -> str:
        """What the source was given as: the folder or the preset name."""
        return str(self.path) if self.path is not None else str(self.preset)

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.path / "tokenizer" if self.path is not None else None

    def tokenizer(self, config: ModelConfig, model=None, engine_dir: Path | None = None):
        """The prompts -> (ids, mask) function: the folder's tokenizer files, a preset in
        memory's own tokenizer (``model``), or a preset's saved beside its engines."""
        if self.tokenizer_dir is None and model is not None:
            text = model.text_encoder
            return lambda prompts: tuple(t.numpy().astype(np.int64) for t in text.tokenize(prompts))
        from .tokenizer import Tokenizer

        return Tokenizer(self.tokenizer_dir or Path(engine_dir) / "tokenizer", config.text_encoder.max_length)

    def load(self):
        """The reference model (torch): the folder's weights or the preset's random ones."""
        from ..reference.weights import load_model_or_preset

        return load_model_or_preset(self.name, seed=self.seed)

    def __str__(self) -> str:
        return self.name
