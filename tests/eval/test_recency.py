"""Recency profile of a window layer: the window part is the attention's softmax over the last W tokens."""

from __future__ import annotations

import math

import torch

from dsla_serve.config import DSLAConfig
from dsla_serve.eval.recency import MIN_QUERY, attention_weights, layer_input, linear_weights
from dsla_serve.model import HybridModel, convert
from tests.conftest import randomize_gates, tiny_llama


def test_window_layer_weights():
    model = tiny_llama()
    layer = convert(model, [1], config=DSLAConfig(window=16, adapter_rank=4))[1]
    randomize_gates([layer])
    hybrid = HybridModel(model)
    h = layer_input(hybrid, torch.randint(0, 99, (1, MIN_QUERY + 40)), 1)
    w = linear_weights(hybrid, layer, h)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-9, rtol=0)
    with torch.no_grad():  # all weight on the window: exactly the attention renormalised to its last 16 keys
        layer.beta.fill_(50.0)
    w = linear_weights(hybrid, layer, h)
    attn = attention_weights(hybrid, h, 1).double()
    T = h.shape[1]
    dist = torch.arange(MIN_QUERY, T)[:, None] - torch.arange(T)[None, :]
    local = attn.masked_fill((dist < 0) | (dist >= 16), 0)
    torch.testing.assert_close(w, local / local.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    assert not math.isnan(w.sum().item())
