"""The C++ prefill scan (``native.scan_dsla``) against the float64 reference, and the layer and model
prefill through it against the chunked form (``DSLA_SERVE_NATIVE=0``)."""

from __future__ import annotations

import shutil

import pytest
import torch

from dsla_serve.config import DSLAConfig
from dsla_serve.model import HybridCache, HybridModel, convert
from dsla_serve.ops import chunk_dsla, naive_dsla, native
from tests.conftest import randomize_gates, tiny_llama, use_native


@pytest.fixture(scope="module", autouse=True)
def built():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: prefill uses the chunked form")
    assert native.load() is not None, native._failed


def inputs(B, Hq, Hkv, T, P, W, D, dtype=torch.float64, seed=0, spread=1.0, initial=True, gain=True):
    gen = torch.Generator().manual_seed(seed)
    L = P + T
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, Hq, T, D) * spread, r(B, Hkv, L, D) * 0.3, r(B, Hkv, L, D)
    g_far = -torch.rand(B, Hkv, L, D, generator=gen, dtype=torch.float64) * 0.1
    g_close = -torch.rand(B, Hkv, L, D, generator=gen, dtype=torch.float64)
    kw = {"normalize": True, "window": W}
    if initial:
        kw["initial_state"] = (r(B, Hkv, D, D), r(B, Hkv, D, D))
    if gain:
        kw["gain"] = r(Hq, D)
    if W:
        kw |= {"q_rot": r(B, Hq, T, D) * spread, "k_rot": r(B, Hkv, L, D) * spread, "beta": r(Hq)}
        kw["window_values"] = r(B, Hkv, L, D)
    args = [q, k, v, g_far, g_close, r(Hq, 2)]
    cast = lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.dtype == torch.float64 else x  # noqa: E731
    return [cast(a) for a in args], {
        n: (tuple(map(cast, x)) if isinstance(x, tuple) else cast(x)) for n, x in kw.items()
    }


CASES = {  # B, Hq, Hkv, T, P, W, D
    "paper-w0-odd": (2, 6, 2, 37, 0, 0, 8),
    "window-fast-path": (1, 9, 3, 70, 0, 5, 64),  # D = 64 and G = 3: the specialised loops
    "continue-prefix": (2, 4, 2, 23, 3, 5, 6),  # a cached sequence's window ahead of the new tokens
    "shorter-than-window": (1, 3, 3, 3, 0, 8, 16),  # no token leaves the window: states untouched
    "prefix-full-window": (2, 6, 2, 40, 4, 4, 128),
    "one-token": (1, 2, 1, 1, 2, 2, 4),
    "several-chunks": (2, 6, 2, 531, 3, 5, 64),  # the scan's phases run by chunks of 256 tokens
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("initial", [True, False])
def test_scan_equals_reference_float64(case, initial):
    args, kw = inputs(*CASES[case], initial=initial, gain=case != "paper-w0-odd")
    o_ref, s_ref = naive_dsla(*args, **kw)
    o, s = native.scan_dsla(*args, **kw)
    torch.testing.assert_close(o, o_ref, rtol=1e-11, atol=1e-11)
    for ours, theirs in zip(s, s_ref, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-11)


def test_scan_unnormalised_without_gain():
    args, kw = inputs(2, 4, 2, 19, 0, 3, 8, gain=False)
    kw["normalize"] = False
    o_ref, s_ref = naive_dsla(*args, **kw)
    o, s = native.scan_dsla(*args, **kw)
    torch.testing.assert_close(o, o_ref, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(s[1], s_ref[1], rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("spread", [1.0, 30.0])
@pytest.mark.parametrize("case", ["window-fast-path", "several-chunks"])
def test_scan_float32_close_to_reference(spread, case):
    """float32 takes the vectorised exp, the grouped window and flushes denormals: with window scores
    spread over hundreds (most softmax weights underflow) the result still matches the float64 reference."""
    case = CASES[case]
    ref_args, ref_kw = inputs(*case, spread=spread)
    args, kw = inputs(*case, dtype=torch.float32, spread=spread)
    o_ref, s_ref = naive_dsla(*ref_args, **ref_kw)
    o, s = native.scan_dsla(*args, **kw)
    assert o.dtype == torch.float32 and s[0].dtype == torch.float32
    tol = 2e-5 if spread == 1.0 else 2e-4
    torch.testing.assert_close(o.double(), o_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(s[0].double(), s_ref[0], rtol=2e-5, atol=2e-5)


def test_scan_bfloat16_matches_chunked_form():
    args, kw = inputs(*CASES["window-fast-path"], dtype=torch.bfloat16)
    args[3:5] = [g.float() for g in args[3:5]]  # gates come in the compute dtype, as the layer makes them
    kw["initial_state"] = tuple(s.float() for s in kw["initial_state"])
    o, s = native.scan_dsla(*args, **kw)
    o_ref, s_ref = chunk_dsla(*args, **kw)
    assert o.dtype == torch.bfloat16 and s[0].dtype == torch.float32
    assert (o.float() - o_ref.float()).abs().max() <= 0.02 * o_ref.float().abs().max()
    torch.testing.assert_close(s[0], s_ref[0], rtol=1e-4, atol=1e-4)


def test_scan_rejects_a_prefix_longer_than_the_window():
    args, kw = inputs(1, 2, 1, 5, 3, 2, 4)
    with pytest.raises(ValueError, match=r"prefix must be 0\.\.2"):
        native.scan_dsla(*args, **kw)


def test_prefill_dispatch_keeps_autograd_on_the_chunked_form(monkeypatch):
    """Inference takes the scan; with autograd through the inputs the chunked form runs and gradients flow."""
    calls = []
    real = native.scan_dsla
    monkeypatch.setattr(native, "scan_dsla", lambda *a, **k: calls.append(1) or real(*a, **k))
    args, kw = inputs(1, 4, 2, 9, 0, 3, 8)
    native.prefill_dsla(*args, **kw)
    assert calls == [1]
    args[0].requires_grad_(True)
    o, _ = native.prefill_dsla(*args, **kw)
    o.sum().backward()
    assert calls == [1] and args[0].grad is not None


CONFIGS = {
    "paper-w0": DSLAConfig(window=0, output_gate=False),
    "window-adapters-gate": DSLAConfig(window=4, adapter_rank=2, adapters="qkvo"),
    "gla-rope-window": DSLAConfig(variant="gla", window=3, rope=True, adapter_rank=2, adapters="kv"),
}


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_model_prefill_scan_equals_chunked_form(name, monkeypatch):
    """A hybrid prefill in two pieces (the second continues the cached window and states), then a
    fold of an all-attention sequence: logits, states and windows with the scan equal the chunked
    form's in float64."""
    model = tiny_llama().double()
    randomize_gates(convert(model, range(4), config=CONFIGS[name]).values())
    hybrid = HybridModel(model)
    ids = torch.randint(0, 99, (1, 29))

    def run(native_on: bool):
        use_native(monkeypatch, native_on)
        cache = HybridCache([hybrid.new_cache([0, 1, 3])])
        first = hybrid(ids[:, :17], cache=cache)[0]
        second = hybrid(ids[:, 17:], cache=cache)[0]
        attn = HybridCache([hybrid.new_cache([])])
        hybrid(ids, cache=attn)
        hybrid.fold_to_dsla(attn.sequences[0], [0, 1, 2, 3])
        seqs = (cache.sequences[0], attn.sequences[0])
        layers = [layer for s in seqs for layer in s.layers if hasattr(layer, "pool")]
        return torch.cat((first, second), 1), [torch.stack(layer.state) for layer in layers], layers

    ref_logits, ref_states, ref_layers = run(False)
    ref_windows = [(layer.keys.clone(), layer.values.clone()) for layer in ref_layers]
    logits, states, layers = run(True)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
    for a, b in zip(states, ref_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    for layer, (k, v) in zip(layers, ref_windows, strict=True):
        torch.testing.assert_close(layer.keys, k)
        torch.testing.assert_close(layer.values, v)


@pytest.mark.parametrize("fused", [True, False], ids=["scan", "chunked"])
def test_states_only_prefill_equals_the_full_one(fused, monkeypatch):
    """Folding a KV cache asks for the final states alone (q with zero heads): both paths return
    the states a full prefill builds, and an empty read-out."""
    use_native(monkeypatch, fused)
    args, kw = inputs(2, 6, 2, 29, 0, 0, 64)
    _, s_full = native.prefill_dsla(*args, **kw)
    q, *rest, _ = args
    kw.pop("gain")  # the read-out's mixing and gain play no part in the states
    o, s_only = native.prefill_dsla(q[:, :0], *rest, torch.zeros(2, dtype=q.dtype), **kw)
    assert o.shape == (2, 0, 29, 64)
    for a, b in zip(s_only, s_full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("prefix", [0, 3])
def test_scan_rotates_the_window_and_gates_the_output(prefix):
    """``rotary`` and ``out_gate`` inside the kernel == RoPE on the window's q/k and 2 sigmoid(pre + b)
    on the output applied around the float64 reference."""
    from dsla_serve.ops.naive import rotate

    B, Hq, Hkv, T, W, D = 2, 6, 2, 41, 5, 64
    args, kw = inputs(B, Hq, Hkv, T, prefix, W, D)
    gen = torch.Generator().manual_seed(1)
    cos, sin = torch.randn(2, B, prefix + T, D, generator=gen, dtype=torch.float64)
    pre, bias = torch.randn(B, Hq, T, D, generator=gen, dtype=torch.float64), torch.randn(Hq, D, dtype=torch.float64)
    q_win, k_win = kw.pop("q_rot"), kw.pop("k_rot")
    o_ref, s_ref = naive_dsla(
        *args, **kw, q_rot=rotate(q_win, cos[:, prefix:], sin[:, prefix:]), k_rot=rotate(k_win, cos, sin)
    )
    o_ref = o_ref * 2 * torch.sigmoid(pre + bias[:, None])
    o, s = native.scan_dsla(*args, **kw, rotary=(q_win, k_win, cos, sin), out_gate=(pre, bias))
    torch.testing.assert_close(o, o_ref, rtol=1e-11, atol=1e-11)
    for a, b in zip(s, s_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


LOGIT_CASES = {  # B, Hq, Hkv, T, P, W, D, gates
    "dsla-prefix-G3": (2, 6, 2, 45, 3, 5, 64, 2),
    "gla-G3": (2, 6, 2, 45, 3, 5, 64, 1),
    "G1-no-window-chunks": (1, 4, 4, 300, 0, 0, 64, 2),  # several 256-token chunks, W = 0
    "G4-chunks": (1, 8, 2, 270, 2, 4, 64, 2),
    "G2-odd-head": (1, 4, 2, 40, 0, 6, 24, 2),  # head_dim 24: the generic window and token loops
}


@pytest.mark.parametrize("case", LOGIT_CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_scan_makes_decays_from_gate_logits_and_rotates_the_states(case, dtype):
    """``gate_logits`` and ``rope_states`` inside the kernel == log_decays and RoPE on the states' q/k
    around the float64 reference; logits out to +-40 reach the gate floor and saturation; float32 and
    bfloat16 take the vectorised logsigmoid and (head_dim 64) the grouped window for G = 1, 2, 3, 4."""
    from dsla_serve.ops.naive import log_decays, rotate

    B, Hq, Hkv, T, P, W, D, n_gates = LOGIT_CASES[case]
    args, kw = inputs(B, Hq, Hkv, T, P, W, D)
    gen = torch.Generator().manual_seed(2)
    cos, sin = torch.randn(2, B, P + T, D, generator=gen, dtype=torch.float64)
    logits = torch.randn(B, P + T, n_gates, Hkv, D, generator=gen, dtype=torch.float64) * 12
    logits[0, :4] = 40.0
    logits[-1, 4:8] = -40.0
    q, k, v, _, _, alpha = args
    q_win, k_win = (kw.pop("q_rot"), kw.pop("k_rot")) if W else (q, k)
    cast = lambda t: t.to(dtype).double()  # noqa: E731  # the reference reads what the kernel reads
    q, k, v, cos, sin, logits, q_win, k_win = map(cast, (q, k, v, cos, sin, logits, q_win, k_win))
    kw = {n: (tuple(map(cast, x)) if isinstance(x, tuple) else cast(x) if isinstance(x, torch.Tensor) else x)
          for n, x in kw.items()}  # fmt: skip
    g_far, g_close = log_decays(logits, 16.0, -1.0)
    win = {"q_rot": rotate(q_win, cos[:, P:], sin[:, P:]), "k_rot": rotate(k_win, cos, sin)} if W else {}
    o_ref, s_ref = naive_dsla(rotate(q, cos[:, P:], sin[:, P:]), rotate(k, cos, sin), v, g_far, g_close, alpha,
                              **kw, **win)  # fmt: skip
    low = lambda t: t.to(dtype)  # noqa: E731
    kw = {n: (tuple(map(low, x)) if isinstance(x, tuple) else low(x) if isinstance(x, torch.Tensor) else x)
          for n, x in kw.items()}  # fmt: skip
    o, s = native.scan_dsla(
        low(q), low(k), low(v), None, None, low(alpha), **kw, rotary=tuple(map(low, (q_win, k_win, cos, sin))),
        gate_logits=(low(logits), 16.0, -1.0), rope_states=True,
    )  # fmt: skip
    if dtype == torch.bfloat16:  # output rounded to bfloat16; states in float32
        assert (o.double() - o_ref).abs().max() <= 0.02 * o_ref.abs().max()
        tol = 1e-4
    else:
        tol = 1e-11 if dtype == torch.float64 else 3e-5
        torch.testing.assert_close(o.double(), o_ref, rtol=tol, atol=tol)
    for a, b in zip(s, s_ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_scan_gate_logits_keep_nan():
    """A NaN pre-activation gives a NaN decay, as the scalar path and the Python reference do, rather
    than a silently finite state."""
    args, kw = inputs(1, 3, 1, 4, 0, 0, 64, dtype=torch.float32, initial=False)
    q, k, v, _, _, alpha = args
    logits = torch.zeros(1, 4, 2, 1, 64)
    logits[0, 1, 0, 0, 5] = float("nan")
    _, (far, close) = native.scan_dsla(q, k, v, None, None, alpha, **kw, gate_logits=(logits, 16.0, -1.0))
    assert far[0, 0, 5].isnan().all() and not close.isnan().any()


def test_scan_needs_one_kind_of_gates():
    args, kw = inputs(1, 2, 1, 5, 0, 2, 4)
    with pytest.raises(ValueError, match="either both log-decays"):
        native.scan_dsla(*args[:3], None, None, args[5], **kw)
    with pytest.raises(ValueError, match="rope_states needs"):
        native.prefill_dsla(*args, **kw, rope_states=True)
