"""Chunked and step kernels against the naive float64 reference: outputs, final states, gradients."""

from __future__ import annotations

import pytest
import torch

from dsla_serve.ops import GATE_MIN, chunk_dsla, naive_dsla, step_dsla


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float) -> None:
    """Relative RMS error of out against ref below ratio."""
    ref, out = ref.double(), out.double()
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = (ref - out).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp(min=1e-12)
    assert err < ratio, f"{name}: relative RMS error {err:.3g} >= {ratio}"


def inputs(B, Hq, Hkv, T, K, V, *, gate="mixed", dtype=torch.float64, seed=0, alpha_per_head=True, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, K, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Hkv, T, K, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Hkv, T, V, generator=gen, dtype=torch.float64)
    u = torch.rand(2, B, Hkv, T, K, generator=gen, dtype=torch.float64)
    if gate == "mixed":  # slow far state, fast close state
        g_far, g_close = -0.02 * u[0], GATE_MIN * u[1]
    elif gate == "min":  # every gate at the layer's clamp
        g_far = g_close = torch.full((B, Hkv, T, K), GATE_MIN, dtype=torch.float64)
    elif gate == "zero":  # no decay at all: pure accumulation
        g_far = g_close = torch.zeros(B, Hkv, T, K, dtype=torch.float64)
    else:
        raise ValueError(gate)
    alpha = (
        torch.randn(Hq, 2, generator=gen, dtype=torch.float64)
        if alpha_per_head
        else torch.randn(2, generator=gen, dtype=torch.float64)
    )
    init = tuple(torch.randn(B, Hkv, K, V, generator=gen, dtype=torch.float64) for _ in range(2))
    tensors = [q, k, v, g_far.clone(), g_close.clone(), alpha]
    tensors = [t.to(dtype).requires_grad_(requires_grad) for t in tensors]
    init = tuple(s.to(dtype).requires_grad_(requires_grad) for s in init)
    return tensors, init


SHAPES = [  # B, Hq, Hkv, T, K, V
    (1, 1, 1, 1, 4, 4),
    (2, 4, 4, 37, 8, 8),  # odd length, not a multiple of the chunk
    (2, 6, 3, 100, 16, 8),  # grouped-query (G=2), K != V, crosses chunk boundaries
    (1, 9, 3, 130, 64, 64),  # the default model's geometry
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-Hq{}-Hkv{}-T{}-K{}-V{}".format(*s))
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunk_matches_naive_float64(shape, normalize, with_init, chunk):
    (q, k, v, gf, gc, alpha), init = inputs(*shape)
    init = init if with_init else None
    o_ref, s_ref = naive_dsla(q, k, v, gf, gc, alpha, normalize=normalize, initial_state=init)
    o, s = chunk_dsla(q, k, v, gf, gc, alpha, normalize=normalize, initial_state=init, chunk_size=chunk)
    assert o.shape == o_ref.shape and o.dtype == torch.float64
    assert_close("o", o_ref, o, 1e-10)
    assert_close("S_far", s_ref[0], s[0], 1e-10)
    assert_close("S_close", s_ref[1], s[1], 1e-10)


@pytest.mark.parametrize("shape", SHAPES[1:3])
def test_float32_chunk_matches_float64_reference(shape):
    (q, k, v, gf, gc, alpha), init = inputs(*shape)
    o_ref, s_ref = naive_dsla(q, k, v, gf, gc, alpha, initial_state=init)
    f32 = [t.float() for t in (q, k, v, gf, gc, alpha)]
    o, s = chunk_dsla(*f32, initial_state=tuple(x.float() for x in init))
    assert o.dtype == torch.float32 and s[0].dtype == torch.float32
    assert_close("o", o_ref, o, 1e-5)
    assert_close("S_close", s_ref[1], s[1], 1e-5)


@pytest.mark.parametrize("gate", ["min", "zero", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_gates_stay_finite_and_exact(gate, dtype):
    """Every gate at the clamp (fastest decay the layer can produce) or at 0, long sequence, low precision."""
    (q, k, v, gf, gc, alpha), init = inputs(1, 4, 2, 300, 32, 32, gate=gate)
    o_ref, s_ref = naive_dsla(q, k, v, gf, gc, alpha, initial_state=init)
    low = [t.to(dtype) for t in (q, k, v, gf, gc)]
    o, s = chunk_dsla(*low, alpha.float(), initial_state=tuple(x.float() for x in init))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert_close("o", o_ref, o, tol)
    assert_close("S_far", s_ref[0], s[0], tol)
    step_o, _ = step_dsla(*[t[:, :, :1] for t in low], alpha.float(), initial_state=tuple(x.float() for x in init))
    assert torch.isfinite(step_o).all()


@pytest.mark.parametrize("shape", [(2, 6, 3, 23, 8, 8), (1, 4, 4, 1, 8, 4)])
def test_step_chain_matches_naive(shape):
    (q, k, v, gf, gc, alpha), init = inputs(*shape, alpha_per_head=False)
    o_ref, s_ref = naive_dsla(q, k, v, gf, gc, alpha, initial_state=init)
    state, outs = init, []
    for t in range(shape[3]):
        o, state = step_dsla(*(x[:, :, t : t + 1] for x in (q, k, v, gf, gc)), alpha, initial_state=state)
        outs.append(o)
    assert_close("o", o_ref, torch.cat(outs, 2), 1e-12)
    assert_close("S_far", s_ref[0], state[0], 1e-12)
    assert_close("S_close", s_ref[1], state[1], 1e-12)


def test_step_rejects_more_than_one_token():
    (q, k, v, gf, gc, alpha), _ = inputs(1, 2, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="one token"):
        step_dsla(q, k, v, gf, gc, alpha)


def test_chunk_continues_from_its_own_final_state():
    """Prefill in two pieces == prefill at once: the final state is a complete summary."""
    (q, k, v, gf, gc, alpha), _ = inputs(2, 6, 3, 150, 16, 16)
    o_all, s_all = chunk_dsla(q, k, v, gf, gc, alpha)
    cut = 71
    o1, s1 = chunk_dsla(*(x[:, :, :cut] for x in (q, k, v, gf, gc)), alpha)
    o2, s2 = chunk_dsla(*(x[:, :, cut:] for x in (q, k, v, gf, gc)), alpha, initial_state=s1)
    assert_close("o", o_all, torch.cat([o1, o2], 2), 1e-12)
    assert_close("S", s_all[1], s2[1], 1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_chunk_gradients_match_naive(normalize):
    shape = (2, 4, 2, 45, 8, 8)
    (q, k, v, gf, gc, alpha), init = inputs(*shape, requires_grad=True)
    leaves = [q, k, v, gf, gc, alpha, *init]
    gen = torch.Generator().manual_seed(1)
    w_o = torch.randn(2, 4, 45, 8, generator=gen, dtype=torch.float64)
    w_s = torch.randn(2, 2, 8, 8, generator=gen, dtype=torch.float64)

    def loss(fn, **kw):
        o, (sf, sc) = fn(q, k, v, gf, gc, alpha, normalize=normalize, initial_state=init, **kw)
        return (o * w_o).sum() + (sf * w_s[0]).sum() + (sc * w_s[1]).sum()

    ref = torch.autograd.grad(loss(naive_dsla), leaves)
    got = torch.autograd.grad(loss(chunk_dsla, chunk_size=16), leaves)
    names = ["q", "k", "v", "g_far", "g_close", "alpha", "S0_far", "S0_close"]
    for name, r, g in zip(names, ref, got, strict=True):
        assert_close(f"d{name}", r, g, 1e-9)


def test_gradients_finite_at_extreme_gates():
    (q, k, v, gf, gc, alpha), _ = inputs(1, 2, 2, 200, 16, 16, gate="min", dtype=torch.float32, requires_grad=True)
    o, _ = chunk_dsla(q, k, v, gf, gc, alpha)
    grads = torch.autograd.grad(o.square().sum(), [q, k, v, gf, gc, alpha])
    assert all(torch.isfinite(g).all() for g in grads)
