"""The T5 tokenizer without transformers (the runtime's start-up path).

A model directory's ``tokenizer/`` holds ``tokenizer.json`` (read with the ``tokenizers``
library, as transformers' T5 tokenizer does) or only ``spiece.model`` (sentencepiece,
T5's conventions: pieces, then ``</s>``; pad 0). Prompts become fixed-length int64
ids and masks like the reference's ``TextEncoder.tokenize``; a prompt longer than the
model's ``max_length`` is cut with a warning that says how much was kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import CheckpointError, InputError

log = logging.getLogger(__name__)

PAD_ID, EOS_ID = 0, 1


class Tokenizer:
    def __init__(self, directory: str | Path, max_length: int):
        directory = Path(directory)
        self.max_length = max_length
        if (directory / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            try:
                self._tok = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            except Exception as exc:
                raise CheckpointError(f"{directory / 'tokenizer.json'} is not a readable tokenizer: {exc}") from None
            self._tok.no_truncation()
            self._tok.no_padding()
            self._encode = lambda text: self._tok.encode(text).ids  # pieces + </s> (its post-processor)
        elif (directory / "spiece.model").is_file():
            import sentencepiece as spm

            try:
                self._sp = spm.SentencePieceProcessor(model_file=str(directory / "spiece.model"))
            except Exception as exc:
                raise CheckpointError(f"{directory / 'spiece.model'} is not a sentencepiece model: {exc}") from None
            self._encode = lambda text: list(self._sp.encode(text)) + [EOS_ID]
        else:
            raise CheckpointError(f"{directory} holds neither tokenizer.json nor spiece.model")

    def __call__(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids, attention_mask), int64 (B, max_length)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not all(isinstance(p, str) for p in prompts):
            raise InputError(f"prompts must be strings, got {[type(p).__name__ for p in prompts]}")
        n = self.max_length
        ids = np.full((len(prompts), n), PAD_ID, np.int64)
        mask = np.zeros((len(prompts), n), np.int64)
        for row, prompt in enumerate(prompts):
            tokens = self._encode(prompt)
            if len(tokens) > n:
                log.warning("prompt %r is %d tokens long; the model reads %d, so the first %d were kept "
                            "(and the end-of-text token)", _short(prompt), len(tokens), n, n - 1)
                tokens = tokens[:n - 1] + [EOS_ID]
            ids[row, :len(tokens)] = tokens
            mask[row, :len(tokens)] = 1
        return ids, mask


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."
