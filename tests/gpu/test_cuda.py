"""The same kernels and engine on a GPU (skipped without CUDA): against the float64 CPU reference."""

from __future__ import annotations

import pytest
import torch

from dsla_serve.config import DSLAConfig
from dsla_serve.model import HybridCache, HybridModel, convert
from dsla_serve.ops import chunk_dsla, naive_dsla
from tests.conftest import randomize_gates, tiny_llama
from tests.ops.test_kernels import assert_close
from tests.ops.test_window import window_inputs

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("window", [0, 32])
def test_chunk_on_cuda_matches_float64_reference(window):
    (q, k, v, gf, gc, alpha), extra = window_inputs(2, 9, 3, 300, 300, 64)
    if not window:
        extra = {"gain": extra["gain"]}
    o_ref, s_ref = naive_dsla(q, k, v, gf, gc, alpha, window=window, **extra)
    cuda = [t.float().cuda() for t in (q, k, v, gf, gc, alpha)]
    o, s = chunk_dsla(*cuda, window=window, **{n: t.float().cuda() for n, t in extra.items()})
    assert o.is_cuda
    assert_close("o", o_ref, o.cpu(), 1e-4)
    assert_close("S_far", s_ref[0], s[0].cpu(), 1e-4)


@pytest.mark.parametrize("window", [0, 8])
def test_engine_on_cuda_prefill_and_decode_equal_full_forward(window):
    model = tiny_llama()
    randomize_gates(convert(model, range(4), config=DSLAConfig(window=window)).values())
    hybrid = HybridModel(model.cuda())
    ids = torch.randint(0, 99, (2, 40), device="cuda")
    plans = [[], [1, 3]]
    with torch.no_grad():
        full = [hybrid(ids[b : b + 1], dsla_layers=p)[0] for b, p in enumerate(plans)]
        cache = HybridCache([hybrid.new_cache(p) for p in plans])
        for b in range(2):
            hybrid(ids[b : b + 1, :30], cache=HybridCache([cache[b]]))
        steps = [hybrid(ids[:, t : t + 1], cache=cache)[0] for t in range(30, 40)]
    got = torch.cat(steps, 1)
    for b in range(2):
        torch.testing.assert_close(got[b], full[b][0, 30:], atol=1e-4, rtol=1e-4)
