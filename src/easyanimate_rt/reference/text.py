"""T5 text encoder wrapper (DESIGN.md 1.1).

Prompts are tokenised to a fixed length (120 for the release models), padded and
truncated; the attention mask goes both to T5 and to the DiT's cross-attention.
Everything loads from local directories: nothing is downloaded.

Symbols: B prompts, S tokens (config.max_length), E = d_model.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from .config import TextEncoderConfig

log = logging.getLogger(__name__)


def train_tokenizer(corpus: Iterable[str], out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a T5-convention sentencepiece model (pad 0, eos 1, unk 2) on ``corpus``.

    Used for the small models trained here (the shipped ``shapes`` model and the
    ``tiny`` test preset), whose vocabulary is the caption vocabulary. Writes
    ``out_dir/spiece.model`` and returns ``out_dir``.
    """
    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences = [s for s in corpus if s]
    if not sentences:
        raise InputError("train_tokenizer needs at least one non-empty sentence")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(out_dir / "spiece"),
        vocab_size=vocab_size, model_type="unigram", character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2,
    )
    return out_dir


def load_tokenizer(path: str | Path):
    """A T5 tokenizer from a local directory (``spiece.model`` or ``tokenizer.json``)."""
    from transformers import AutoTokenizer, T5Tokenizer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer directory not found: {path}")
    for name in ("tokenizer_config.json", "tokenizer.json"):
        if (path / name).exists():
            _read_json_object(path / name, "tokenizer file")
    try:
        if (path / "tokenizer_config.json").exists() or (path / "tokenizer.json").exists():
            return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        if (path / "spiece.model").exists():
            return T5Tokenizer.from_pretrained(str(path), extra_ids=0, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # transformers' and sentencepiece's
        raise CheckpointError(f"tokenizer {path} cannot be loaded: {_first_line(exc)}") from None
    raise CheckpointError(f"{path} holds neither spiece.model nor tokenizer.json")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no detail'}"


def _read_json_object(path: Path, what: str) -> dict:
    """``path`` as a JSON object; a CheckpointError naming the file otherwise."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON ({exc}); it is corrupt or truncated") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} holds a JSON {type(data).__name__}, not an object")
    return data


class TextEncoder(nn.Module):
    """Tokenizer + ``transformers.T5EncoderModel``; ``encode(prompts) -> (embeddings, mask)``."""

    def __init__(self, config: TextEncoderConfig, tokenizer, model: nn.Module | None = None):
        super().__init__()
        from transformers import T5EncoderModel

        self.config = config
        self.tokenizer = tokenizer
        self.model = model if model is not None else T5EncoderModel(config.t5_config())
        self.model.eval()

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, tokenizer_dir: str | Path,
                        config: TextEncoderConfig | None = None,
                        dtype: torch.dtype = torch.float32) -> "TextEncoder":
        """Load a T5 encoder saved in the transformers layout and its tokenizer."""
        from transformers import T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # the CLI shows its own progress
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").exists():
            raise CheckpointError(f"text encoder directory {model_dir} has no config.json")
        _read_json_object(model_dir / "config.json", "text encoder config")
        try:
            model = T5EncoderModel.from_pretrained(str(model_dir), local_files_only=True).to(dtype)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:  # transformers' load errors
            raise CheckpointError(f"text encoder {model_dir} cannot be loaded: {_first_line(exc)}") from None
        if config is None:
            t5 = model.config
            config = TextEncoderConfig(
                vocab_size=t5.vocab_size, d_model=t5.d_model, d_kv=t5.d_kv, d_ff=t5.d_ff,
                num_layers=t5.num_layers, num_heads=t5.num_heads,
                relative_attention_num_buckets=t5.relative_attention_num_buckets,
                relative_attention_max_distance=t5.relative_attention_max_distance,
                feed_forward_proj=t5.feed_forward_proj)
        return cls(config, load_tokenizer(tokenizer_dir), model)

    def save_pretrained(self, model_dir: str | Path, tokenizer_dir: str | Path) -> None:
        self.model.save_pretrained(str(model_dir), safe_serialization=True)
        self.tokenizer.save_pretrained(str(tokenizer_dir))

    def tokenize(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        n = self.config.max_length
        for prompt, length in zip(prompts, (len(ids) for ids in self.tokenizer(list(prompts)).input_ids)):
            if length > n:
                log.warning("prompt %r is %d tokens long; the model reads %d, so the first %d were kept "
                            "(and the end-of-text token)", prompt if len(prompt) <= 60 else prompt[:57] + "...",
                            length, n, n - 1)
        out = self.tokenizer(list(prompts), padding="max_length", max_length=n, truncation=True, return_tensors="pt")
        return out.input_ids, out.attention_mask                       # (B, S), (B, S)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        return out.last_hidden_state                                   # (B, S, E)

    @torch.no_grad()
    def encode(self, prompts: Sequence[str], device: torch.device | str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        device = device or next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        return self.forward(ids, mask), mask
