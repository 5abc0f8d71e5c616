"""Bench fixtures: a tiny random Llama saved as a local checkpoint, with the embedded model's tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dsla_serve.model.loader import resolve
from tests.conftest import tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder `--model` accepts: loads in well under a second, so servers and suites start fast."""
    folder = tmp_path_factory.mktemp("tiny-model")
    tok = AutoTokenizer.from_pretrained(resolve(None)[0])
    tiny_llama(0, vocab_size=len(tok), max_position_embeddings=256).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
