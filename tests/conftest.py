"""Shared fixtures: a tiny random Llama (fast) and the embedded default model (loaded once per session)."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsla_serve.ops import native
from dsla_serve.runtime import tune_allocator

tune_allocator()


@functools.cache
def kernels() -> object | None:
    """The C++ kernels as first loaded (``use_native`` hides them; loading them again would not work)."""
    return native.load()


def use_native(monkeypatch, on: bool) -> None:
    """The C++ kernels on or off for the rest of a test. Off also hides the loaded module, so a kernel
    wrapper reached on the Python paths fails instead of comparing the kernels with themselves."""
    module = kernels()
    monkeypatch.setenv("DSLA_SERVE_NATIVE", "1" if on else "0")
    monkeypatch.setattr(native, "_module", module if on else None)


def tiny_config(**overrides) -> LlamaConfig:
    cfg = {
        "vocab_size": 99,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval().requires_grad_(False)


def randomize_gates(modules, std: float = 0.2, seed: int = 0) -> None:
    """Give fresh DSLA layers data-dependent gates and mixing, so tests exercise every parameter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.dsla_parameters().values():
                p.add_(torch.randn(p.shape, generator=gen) * std)


@pytest.fixture
def tiny():
    return tiny_llama()


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct as a LoadedModel (all attention)."""
    from dsla_serve.model import load_base

    return load_base()


@pytest.fixture(scope="session")
def tokenizer():
    """The embedded model's tokenizer (converting the GGUF on first use)."""
    from transformers import AutoTokenizer

    from dsla_serve.model.loader import resolve

    return AutoTokenizer.from_pretrained(resolve(None)[0])


def write_corpus(folder, docs: int = 12, seed: int = 0) -> None:
    """A small text corpus (varied sentences) under folder, one document per file."""
    import random

    rng = random.Random(seed)
    words = ["the", "a", "lighthouse", "keeper", "wrote", "weather", "wind", "ship", "harbour", "storm", "calm",
             "boat", "letter", "flour", "oil", "sea", "day", "night"]  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        text = " ".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 12))) + "." for _ in range(120))
        (folder / f"doc{d:02d}.txt").write_text(text)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A tiny random Llama with the embedded tokenizer, saved as a checkpoint dir the CLI can load."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
