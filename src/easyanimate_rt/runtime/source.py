"""What a pipeline runs, decided once at the boundary: a model directory or a preset
(random weights from a seed), its LoRA adapters (reference/lora.py: file hash and weight
each), its fingerprint (the files and the adapters: it names its engines in the cache, so
a LoRA never reuses the base model's engines, nor the other way round) and its
configuration, read without torch where the files allow (a source with adapters imports
torch to read them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..reference.config import (ModelConfig, adapters_fingerprint, from_preset, model_fingerprint, preset_name,
                                read_model_config)

log = logging.getLogger(__name__)


def read_config(source: str | Path) -> ModelConfig | None:
    """The model's config without torch: ``easyanimate_rt.json`` or a preset; None for a
    directory that needs the loader (an upstream release directory)."""
    if Path(source).is_dir():
        return read_model_config(source)
    return from_preset(preset_name(source))


@dataclass(frozen=True)
class ModelSource:
    """A model directory (``path``) or preset (``preset``), with the ``seed`` of a preset's
    random weights, its LoRA ``adapters`` (merged in order, each at its weight), the
    ``fingerprint`` of its files and adapters, and its torch-free ``config`` (None: an
    upstream release directory, whose config needs the loader)."""

    path: Path | None
    preset: str | None
    seed: int
    fingerprint: str
    config: ModelConfig | None
    adapters: tuple = ()          # reference.lora.Adapter values
    base_fingerprint: str = ""    # the files alone (the fingerprint without adapters)

    @classmethod
    def of(cls, source: "str | Path | ModelSource", seed: int = 0, loras: Sequence[Any] = ()) -> "ModelSource":
        """``source`` checked and read once: a missing folder or unknown preset is an error
        here, before any work; so is each LoRA (``loras``: Adapters, ``PATH[:WEIGHT]``
        strings or (path, weight) pairs): a missing, broken or repeated file, a bad weight."""
        if isinstance(source, ModelSource):
            return source.with_loras(loras) if loras else source
        config = read_config(source)
        is_dir = Path(source).is_dir()
        fingerprint = model_fingerprint(source, seed)
        base = cls(Path(source) if is_dir else None, None if is_dir else str(source), seed, fingerprint, config,
                   (), fingerprint)
        return base.with_loras(loras) if loras else base

    def with_loras(self, loras: Sequence[Any]) -> "ModelSource":
        """The same model with ``loras`` instead of its adapters (none: the base model)."""
        adapters = adapters_of(loras)
        return replace(self, adapters=adapters, fingerprint=adapters_fingerprint(self.base_fingerprint, adapters))

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
        """The reference model (torch): the folder's weights or the preset's random ones,
        with the adapters merged (from a kept copy of the base weights: reference/lora.py)."""
        from ..reference.weights import load_model_or_preset

        model = load_model_or_preset(self.name, seed=self.seed)
        if self.adapters:
            merge_into(model, self.adapters)
        return model

    def __str__(self) -> str:
        return self.name + "".join(f" + LoRA {a}" for a in self.adapters)


def adapters_of(loras: Sequence[Any]) -> tuple:
    """LoRA adapters (reference/lora.py ``adapters_of``), torch imported only when given."""
    if not loras:
        return ()
    from ..reference.lora import adapters_of as read

    return read(loras)


def merge_into(model, adapters: Sequence[Any]) -> list:
    from ..reference.lora import merge_logged

    return merge_logged(model, adapters)
