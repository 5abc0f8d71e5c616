"""Prompts of an exact token length cut from real text, for trace replay.

A trace gives only lengths. Repeating one word would make every prompt trivially compressible and
the model's attention patterns unlike real use, so each prompt is a window of real prose (the Python
documentation shipped under dsla_serve/data/python-docs by default, or any text you pass) starting
at a seeded random offset: the same trace and seed give the same prompts under every policy.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

TEXT_SUFFIXES = (".txt", ".md", ".rst")


def default_text_dir() -> Path:
    return Path(str(resources.files("dsla_serve") / "data" / "python-docs"))


def load_text(path: str | Path | None = None) -> str:
    """All text of a file, or of every .txt/.md/.rst file under a directory (sorted, so stable).

    None reads the shipped Python documentation sources (not their README or licence file).
    """
    if path is None:
        files = sorted(default_text_dir().glob("*.rst.txt"))
    else:
        p = Path(path)
        if p.is_file():
            files = [p]
        elif p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
        else:
            raise FileNotFoundError(f"prompt text {p} is neither a file nor a directory")
    if not files:
        raise FileNotFoundError(f"no {'/'.join(TEXT_SUFFIXES)} files under {path or default_text_dir()}")
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if not text.strip():
        raise ValueError(f"prompt text under {path} is empty")
    return text


class PromptBuilder:
    """Cuts prompts of n tokens (as the server's tokenizer counts them) out of a token stream of real text."""

    def __init__(self, tokenizer, text: str, seed: int = 0):
        self.tok = tokenizer
        self.ids: list[int] = tokenizer(text, add_special_tokens=False).input_ids
        if len(self.ids) < 16:
            raise ValueError(f"prompt text has only {len(self.ids)} tokens: pass a longer text")
        self.seed = seed

    def count(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False).input_ids)

    def build(self, n: int, index: int) -> tuple[str, int]:
        """Prompt text for request ``index`` with n tokens after re-tokenisation (or the nearest found)."""
        if n < 1:
            raise ValueError(f"prompt length must be >= 1, got {n}")
        rng = np.random.default_rng([self.seed, index])
        corpus = self.ids
        while len(corpus) < n + 1:  # longer than the text: read it again from the start
            corpus = corpus + self.ids
        start = int(rng.integers(0, len(corpus) - n))
        # Decoding a token window and encoding it again can merge or split tokens at the edges;
        # widen or narrow the window until the count matches.
        best: tuple[int, str] = (n + 10**9, "")
        size = n
        for _ in range(6):
            size = max(1, min(size, len(corpus) - start))
            text = self.tok.decode(corpus[start : start + size])
            m = self.count(text)
            if abs(m - n) < abs(best[0] - n):
                best = (m, text)
            if m == n:
                break
            size += n - m
        return best[1], best[0]
