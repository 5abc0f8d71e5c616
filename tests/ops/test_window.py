"""The exact local window inside DSLA: chunked and step kernels against the float64 reference."""

from __future__ import annotations

import pytest
import torch

from dsla_serve.ops import chunk_dsla, gate_floor, naive_dsla, step_dsla
from tests.ops.test_kernels import assert_close


def window_inputs(B, Hq, Hkv, L, T, K, *, seed=0, requires_grad=False):
    """Raw and rotated q/k (independent, as RoPE makes them differ), v, gates, mixing logits, gain."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    q, q_rot, k, k_rot, v = r(B, Hq, T, K), r(B, Hq, T, K), r(B, Hkv, L, K), r(B, Hkv, L, K), r(B, Hkv, L, K)
    u = torch.rand(2, B, Hkv, L, K, generator=gen, dtype=torch.float64)
    g_far, g_close = -0.02 * u[0], -u[1]
    alpha, beta, gain = r(Hq, 2), r(Hq), torch.rand(Hq, K, generator=gen, dtype=torch.float64) + 0.5
    tensors = [q, k, v, g_far, g_close, alpha]
    extra = {"q_rot": q_rot, "k_rot": k_rot, "beta": beta, "gain": gain}
    for t in [*tensors, *extra.values()]:
        t.requires_grad_(requires_grad)
    return tensors, extra


CASES = [  # B, Hq, Hkv, T, K, W, P (window tokens already cached), with an initial state
    (2, 6, 3, 37, 8, 16, 0, False),  # odd length
    (1, 9, 3, 130, 16, 64, 0, False),  # crosses chunk boundaries, G = 3
    (2, 6, 3, 5, 8, 16, 0, False),  # T < W: exact attention, empty states
    (2, 6, 3, 20, 8, 16, 16, True),  # continuing: full window + states
    (2, 6, 3, 20, 8, 16, 7, False),  # continuing a sequence shorter than W
    (1, 4, 2, 70, 8, 32, 32, True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Hq{}-Hkv{}-T{}-K{}-W{}-P{}-init{}".format(*c))
@pytest.mark.parametrize("chunk", [16, 64])
def test_window_chunk_matches_naive(case, chunk):
    B, Hq, Hkv, T, K, W, P, init = case
    (q, k, v, gf, gc, alpha), extra = window_inputs(B, Hq, Hkv, P + T, T, K)
    gen = torch.Generator().manual_seed(3)
    state = tuple(torch.randn(B, Hkv, K, K, generator=gen, dtype=torch.float64) for _ in range(2)) if init else None
    o_ref, s_ref = naive_dsla(q, k, v, gf, gc, alpha, initial_state=state, window=W, **extra)
    o, s = chunk_dsla(q, k, v, gf, gc, alpha, initial_state=state, window=W, chunk_size=chunk, **extra)
    assert_close("o", o_ref, o, 1e-10)
    assert_close("S_far", s_ref[0], s[0], 1e-10)
    assert_close("S_close", s_ref[1], s[1], 1e-10)


def test_window_shorter_sequence_is_exact_softmax():
    """T <= W: no token has left the window, so the output is causal softmax attention over rotated q/k."""
    (q, k, v, gf, gc, alpha), extra = window_inputs(1, 4, 2, 12, 12, 8)
    o, s = chunk_dsla(q, k, v, gf, gc, alpha, window=16, **extra)
    ref = torch.nn.functional.scaled_dot_product_attention(
        extra["q_rot"], extra["k_rot"], v, is_causal=True, enable_gqa=True
    )
    assert_close("o", ref, o, 1e-12)
    assert s[0].abs().max() == 0 and s[1].abs().max() == 0


def test_window_prefill_in_pieces_equals_prefill_at_once():
    """A piece continues from the states and the last W tokens of the one before."""
    W, T, cut = 16, 90, 41
    (q, k, v, gf, gc, alpha), extra = window_inputs(2, 6, 3, T, T, 8)
    qr, kr = extra.pop("q_rot"), extra.pop("k_rot")
    o_all, s_all = chunk_dsla(q, k, v, gf, gc, alpha, window=W, q_rot=qr, k_rot=kr, **extra)
    o1, s1 = chunk_dsla(q[:, :, :cut], *(x[:, :, :cut] for x in (k, v, gf, gc)), alpha, window=W,
                        q_rot=qr[:, :, :cut], k_rot=kr[:, :, :cut], **extra)  # fmt: skip
    lo = cut - W  # the second piece's keys: the window (W tokens) + its own
    o2, s2 = chunk_dsla(q[:, :, cut:], *(x[:, :, lo:] for x in (k, v, gf, gc)), alpha, window=W, initial_state=s1,
                        q_rot=qr[:, :, cut:], k_rot=kr[:, :, lo:], **extra)  # fmt: skip
    assert_close("o", o_all, torch.cat([o1, o2], 2), 1e-12)
    assert_close("S_far", s_all[0], s2[0], 1e-12)


@pytest.mark.parametrize("W", [1, 4, 16])
def test_window_step_chain_matches_naive(W):
    """Decode token by token with a ring buffer of the last W rotated keys/values."""
    B, Hq, Hkv, T, K = 2, 6, 3, 29, 8
    (q, k, v, gf, gc, alpha), extra = window_inputs(B, Hq, Hkv, T, T, K)
    qr, kr = extra.pop("q_rot"), extra.pop("k_rot")
    o_ref, s_ref = naive_dsla(q, k, v, gf, gc, alpha, window=W, q_rot=qr, k_rot=kr, **extra)
    ring_k, ring_v = torch.zeros(B, Hkv, W, K, dtype=torch.float64), torch.zeros(B, Hkv, W, K, dtype=torch.float64)
    valid = torch.zeros(B, W, dtype=torch.bool)
    state = torch.zeros(B, 2, Hkv, K, K, dtype=torch.float64)  # updated in place, like the engine's pool
    outs = []
    for t in range(T):
        j, slot = t - W, t % W  # the leaving token, and its slot (the new token's too)
        src = max(j, 0)
        leave = [x[:, :, src : src + 1] for x in (k, v, gf, gc)]
        ring_k[:, :, slot], ring_v[:, :, slot], valid[:, slot] = kr[:, :, t], v[:, :, t], True
        o, _ = step_dsla(q[:, :, t : t + 1], *leave, alpha, state_buffer=state, q_rot=qr[:, :, t : t + 1],
                         window_keys=ring_k, window_values=ring_v, window_valid=valid,
                         enters=torch.full((B,), j >= 0), **extra)  # fmt: skip
        outs.append(o)
    assert_close("o", o_ref, torch.cat(outs, 2), 1e-12)
    assert_close("S_far", s_ref[0], state[:, 0], 1e-12)
    assert_close("S_close", s_ref[1], state[:, 1], 1e-12)


def test_window_gradients_match_naive():
    B, Hq, Hkv, T, K, W, P = 2, 4, 2, 45, 8, 16, 16
    (q, k, v, gf, gc, alpha), extra = window_inputs(B, Hq, Hkv, P + T, T, K, requires_grad=True)
    gen = torch.Generator().manual_seed(1)
    init = tuple(torch.randn(B, Hkv, K, K, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(2))
    w_o = torch.randn(B, Hq, T, K, generator=gen, dtype=torch.float64)
    w_s = torch.randn(2, B, Hkv, K, K, generator=gen, dtype=torch.float64)
    leaves = [q, k, v, gf, gc, alpha, *extra.values(), *init]

    def loss(fn, **kw):
        o, (sf, sc) = fn(q, k, v, gf, gc, alpha, initial_state=init, window=W, **extra, **kw)
        return (o * w_o).sum() + (sf * w_s[0]).sum() + (sc * w_s[1]).sum()

    ref = torch.autograd.grad(loss(naive_dsla), leaves)
    got = torch.autograd.grad(loss(chunk_dsla, chunk_size=16), leaves)
    names = ["q", "k", "v", "g_far", "g_close", "alpha", *extra, "S0_far", "S0_close"]
    for name, r, g in zip(names, ref, got, strict=True):
        assert_close(f"d{name}", r, g, 1e-9)


def test_window_prefix_longer_than_window_is_refused():
    (q, k, v, gf, gc, alpha), extra = window_inputs(1, 2, 1, 30, 10, 4)
    with pytest.raises(ValueError, match="prefix"):
        chunk_dsla(q, k, v, gf, gc, alpha, window=8, **extra)


@pytest.mark.parametrize("chunk", [16, 64])
def test_gates_below_the_floor_are_refused(chunk):
    """The chunked form is finite only for gates >= -64 / chunk; below it the call says so."""
    (q, k, v, gf, gc, alpha), _ = window_inputs(1, 2, 1, 40, 40, 4)
    gc = torch.full_like(gc, gate_floor(chunk))
    o, _ = chunk_dsla(q, k, v, gf, gc, alpha, chunk_size=chunk)  # at the floor: fine
    assert torch.isfinite(o).all()
    with pytest.raises(ValueError, match="overflow"):
        chunk_dsla(q, k, v, gf, gc - 0.01, alpha, chunk_size=chunk)
