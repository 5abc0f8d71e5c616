"""Mistral and Qwen2 (the other supported model types) on tiny random configs, no network: the hybrid
forward equals Hugging Face's logits, cached decode equals a full forward, and a config whose sliding
window binds (set, enabled, shorter than the context) is refused by name instead of served wrongly."""

from __future__ import annotations

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dsla_serve.model import HybridCache, HybridModel, ModelLoadError, convert
from dsla_serve.model.loader import load_base, sliding_window
from tests.conftest import randomize_gates

TINY = {"vocab_size": 99, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}  # fmt: skip
ARCHS = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


def tiny(arch: str, seed: int = 0, **overrides):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    config = config_cls(**(TINY | {"sliding_window": None} | overrides))
    model = model_cls(config).eval().requires_grad_(False)
    if arch == "qwen2":  # q/k/v carry biases: make them count
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_hybrid_matches_hugging_face_and_cached_decode_matches_full_forward(arch):
    model = tiny(arch)
    ids = torch.randint(0, 99, (2, 40))
    ref = model(ids, use_cache=False).logits
    hybrid = HybridModel(model)
    full, _ = hybrid(ids, dsla_layers=[])
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    randomize_gates(convert(model, [1, 3]).values())
    for plan in ([], [1, 3]):
        full, _ = hybrid(ids, dsla_layers=plan)
        cache = HybridCache([hybrid.new_cache(plan, capacity=40) for _ in range(2)])
        steps = [hybrid(ids[:, :25], cache=cache)[0]] + [
            hybrid(ids[:, t : t + 1], cache=cache)[0] for t in range(25, 40)
        ]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
        assert torch.isfinite(full).all()


@pytest.mark.parametrize(
    ("arch", "overrides", "binds"),
    [
        ("mistral", {}, False),  # sliding_window null: full attention
        ("mistral", {"sliding_window": 512}, False),  # as long as the context: never binds
        ("mistral", {"sliding_window": 64}, True),
        ("qwen2", {}, False),
        ("qwen2", {"use_sliding_window": False, "sliding_window": 64}, False),  # set but disabled
        ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 2}, True),
    ],
    ids=["mistral-none", "mistral-context", "mistral-64", "qwen2-none", "qwen2-disabled", "qwen2-64"],
)
def test_loading_refuses_a_binding_sliding_window_by_name(tmp_path, tokenizer, arch, overrides, binds):
    model = tiny(arch, **overrides)
    assert (sliding_window(model.config) is not None) == binds
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    if not binds:
        loaded = load_base(str(tmp_path))
        assert loaded.model.config.model_type == arch
        ids = torch.randint(0, 99, (1, 12))
        torch.testing.assert_close(HybridModel(loaded.model)(ids)[0], model(ids, use_cache=False).logits)
        return
    with pytest.raises(ModelLoadError, match=r"sliding_window=64, shorter than max_position_embeddings=512"):
        load_base(str(tmp_path))
    with pytest.raises(ModelLoadError, match="sliding_window"):
        convert(model, [0])  # an in-memory model is checked too
