"""Shared fixtures: a tiny random Llama (fast) and the embedded default model (loaded once per session)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsla_serve.runtime import tune_allocator

tune_allocator()


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
