"""Prompts cut from the shipped real text hit the requested token counts, differ per request, and are seeded."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dsla_serve.bench.prompts import PromptBuilder, default_text_dir, load_text
from dsla_serve.model.loader import resolve


@pytest.fixture(scope="module")
def builder() -> PromptBuilder:
    return PromptBuilder(AutoTokenizer.from_pretrained(resolve(None)[0]), load_text(), seed=0)


def test_shipped_text_is_real_prose_with_its_licence():
    text = load_text()
    assert 200_000 < len(text) < 300_000
    words = text.split()
    assert len(set(words)) > 5000  # real vocabulary, not one repeated word
    readme = (default_text_dir() / "README.md").read_text()
    assert "PSF" in readme and "python3.11-doc" in readme
    assert (default_text_dir() / "LICENSE-PSF.txt").is_file()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE" not in text  # the licence file is not prompt material


@pytest.mark.parametrize("n", [1, 7, 64, 500, 3000, 70_000])
def test_prompt_has_the_requested_token_count(builder, n):
    text, count = builder.build(n, index=n)
    assert count == builder.count(text)
    assert abs(count - n) <= max(1, n // 1000)  # longer than the text (66k tokens) still works: it wraps


def test_prompts_differ_per_request_and_repeat_per_seed(builder):
    a = [builder.build(200, i)[0] for i in range(5)]
    assert len(set(a)) == 5
    again = PromptBuilder(builder.tok, load_text(), seed=0)
    other = PromptBuilder(builder.tok, load_text(), seed=1)
    assert [again.build(200, i)[0] for i in range(5)] == a
    assert [other.build(200, i)[0] for i in range(5)] != a


def test_text_sources_and_errors(tmp_path, builder):
    (tmp_path / "a.txt").write_text("The harbour was calm. " * 40)
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert load_text(tmp_path).startswith("The harbour")
    with pytest.raises(FileNotFoundError, match="neither a file nor a directory"):
        load_text(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no \.txt"):
        load_text(tmp_path / "empty")
    with pytest.raises(ValueError, match="only"):
        PromptBuilder(builder.tok, "too short")
    with pytest.raises(ValueError, match=">= 1"):
        builder.build(0, 0)
