"""In-flight conversion through the serving runner (chunked prefill, ``ModelRunner.fold``, batched decode).

A sequence prefilled with attention and then folded must hold the DSLA state a DSLA prefill of the
same tokens builds, and its next tokens' logits must equal a from-scratch forward with that plan.
Run in float64; the tolerance is 1e-6, not 1e-12, because the DSLA gates are computed in float32
(dsla_attention.py) and the fold reads keys that went through RoPE and back.
"""

from __future__ import annotations

import pytest
import torch

from dsla_serve.serving.request import Request, RequestParams
from dsla_serve.serving.runner import ModelRunner
from tests.serving.conftest import tiny_hybrid

TOL = {"atol": 1e-6, "rtol": 1e-6}


@pytest.fixture(scope="module")
def runner(tokenizer) -> ModelRunner:
    hybrid, info = tiny_hybrid(tokenizer)
    hybrid.base.to(torch.float64)
    return ModelRunner(hybrid, info.order)  # order [3, 2, 1, 0]: count 1 = layer 3, count 2 = layers 3 and 2


def prefilled(runner: ModelRunner, ids: list[int], dsla_count: int, chunk: int = 16) -> Request:
    """A running sequence whose prompt was read in chunks, as the scheduler feeds it between decode steps."""
    req = Request(f"seq-{dsla_count}", ids, RequestParams(max_tokens=8), lambda out: None)
    req.dsla_count = dsla_count
    runner.allocate(req)
    while not req.prefilled:
        runner.prefill(req, min(chunk, req.prompt_len - req.num_computed))
    return req


def prompt(n: int = 70, seed: int = 0) -> list[int]:
    return torch.randint(0, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_fold_equals_dsla_prefill_state_and_decode_matches_a_fresh_forward(runner):
    ids = prompt()
    folded, started = prefilled(runner, ids, 0), prefilled(runner, ids, 1)
    kv_before, reserved_before = folded.cache.kv_bytes(), folded.reserved
    assert runner.fold(folded, 1) == [3]
    for a, b in zip(folded.cache.layers[3].state, started.cache.layers[3].state, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, **TOL)
    # the folded layer's KV buffers are released, and the reservation follows
    per_layer_kv = kv_before // runner.model.num_layers
    assert folded.cache.kv_bytes() == kv_before - per_layer_kv
    assert folded.reserved == folded.cache.nbytes() < reserved_before
    # continue both in one decode batch; each step must equal a forward of the whole text with layer 3 as DSLA
    tokens = [11, 222, 3333, 44]
    for t, token in enumerate(tokens):
        folded.output_ids.append(token)
        started.output_ids.append(token)
        logits = runner.decode([folded, started])  # (2, V)
        with torch.no_grad():
            fresh, _ = runner.model(torch.tensor([ids + tokens[: t + 1]]), dsla_layers=[3])
        torch.testing.assert_close(logits[0], fresh[0, -1], **TOL)
        torch.testing.assert_close(logits[1], fresh[0, -1], **TOL)


def test_folding_two_layers_makes_the_lower_one_exact(runner):
    """Folding layers 3 and 2 at once: layer 2 sees the same input (layers 0-1 stayed attention) so its
    state equals a DSLA prefill's; layer 3's KV cache was built on layer 2's attention output, so its
    folded state is exact for that history (which a from-scratch DSLA run does not share)."""
    ids = prompt(50, seed=1)
    folded, started = prefilled(runner, ids, 0, chunk=7), prefilled(runner, ids, 2, chunk=7)
    assert runner.fold(folded, 2) == [3, 2] and folded.dsla_count == 2
    for a, b in zip(folded.cache.layers[2].state, started.cache.layers[2].state, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert folded.cache.kv_bytes() == started.cache.kv_bytes()  # same plan, same bytes
    assert runner.fold(folded, 2) == []  # already there: nothing to fold
    folded.output_ids.append(5)
    assert torch.isfinite(runner.decode([folded])).all()
