"""The runtime's transformers-free tokenizer against the reference's (transformers)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from easyanimate_rt.cli import default_model
from easyanimate_rt.reference.config import from_preset
from easyanimate_rt.reference.text import load_tokenizer, train_tokenizer
from easyanimate_rt.runtime.tokenizer import Tokenizer

PROMPTS = ["a red circle moving left on a white background", "", "A BLUE square, moving up!", "  two  spaces ",
           "ünïcode ✓ shapes", "</s> inside", "green triangle " * 12]


def reference_ids(directory, max_length, prompts):
    tok = load_tokenizer(directory)
    out = tok(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return out["input_ids"].astype(np.int64), out["attention_mask"].astype(np.int64)


def test_tokenizer_json_matches_transformers():
    directory = f"{default_model()}/tokenizer"
    n = from_preset("shapes").text_encoder.max_length
    ids, mask = Tokenizer(directory, n)(PROMPTS)
    want_ids, want_mask = reference_ids(directory, n, PROMPTS)
    assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)


def test_spiece_model_matches_transformers(tmp_path):
    corpus = ["a red circle moving left", "a blue square moving up", "a green triangle moving right"] * 20
    directory = train_tokenizer(corpus, tmp_path / "tok", vocab_size=40)
    ids, mask = Tokenizer(directory, 16)(PROMPTS[:5] + [PROMPTS[-1]])
    want_ids, want_mask = reference_ids(directory, 16, PROMPTS[:5] + [PROMPTS[-1]])
    assert np.array_equal(ids, want_ids) and np.array_equal(mask, want_mask)


def test_an_over_long_prompt_is_cut_with_a_warning(caplog):
    directory = f"{default_model()}/tokenizer"
    with caplog.at_level(logging.WARNING):
        ids, mask = Tokenizer(directory, 8)(["green triangle " * 12])
    assert mask.sum() == 8 and ids[0, -1] == 1  # 7 pieces + </s>
    assert "the model reads 8, so the first 7 were kept" in caplog.text


def test_a_directory_without_a_tokenizer_is_named(tmp_path):
    from easyanimate_rt.errors import CheckpointError

    with pytest.raises(CheckpointError, match="holds neither tokenizer.json nor spiece.model"):
        Tokenizer(tmp_path, 8)
