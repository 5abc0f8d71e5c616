"""The fused C++ decode steps against the Python paths (themselves tested against the float64
reference): the DSLA step — same logits, pooled states and windows for every layer option — and the
attention decode — same logits and KV caches — in float64 and bfloat16."""

from __future__ import annotations

import copy
import dataclasses
import shutil

import pytest
import torch
import torch.nn.functional as F

from dsla_serve.config import DSLAConfig
from dsla_serve.layers import DSLAAttention
from dsla_serve.model import HybridCache, HybridModel, convert
from dsla_serve.model.quant import quantize_model
from dsla_serve.ops import native
from tests.conftest import randomize_gates, tiny_llama, use_native


@pytest.fixture(scope="module", autouse=True)
def built():
    """Built once; a machine without a C++ compiler skips (it runs the Python step), but where a compiler
    exists a failed build fails the tests."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the engine uses the Python decode step")
    assert native.load() is not None, native._failed


def hybrid_model(config: DSLAConfig, dtype: torch.dtype, **shape) -> HybridModel:
    model = tiny_llama(**shape).to(dtype)
    randomize_gates(convert(model, range(4), config=config).values())
    return HybridModel(model)


@torch.no_grad()
def decode(hybrid: HybridModel, caches: list, tokens: torch.Tensor, fused: bool, monkeypatch) -> torch.Tensor:
    use_native(monkeypatch, fused)
    cache = HybridCache(copy.deepcopy(caches))
    logits = [hybrid(tokens[:, t : t + 1], cache=cache, logits_for="last")[0] for t in range(tokens.shape[1])]
    states = [[layer.state for layer in s.layers if hasattr(layer, "pool")] for s in cache.sequences]
    windows = [[(layer.keys, layer.values) for layer in s.layers if hasattr(layer, "pool")] for s in cache.sequences]
    return torch.cat(logits, 1), states, windows


def prefilled(hybrid: HybridModel, caches: list, lengths) -> list:
    for c, n in zip(caches, lengths, strict=True):
        hybrid(torch.randint(0, 99, (1, n)), cache=HybridCache([c]))
    return caches


def count_calls(monkeypatch, name: str) -> list:
    """Calls of ``native.<name>`` from now on (one entry each), the kernel still running."""
    calls, real = [], getattr(native, name)
    monkeypatch.setattr(native, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


CONFIGS = {
    "paper-w0": DSLAConfig(window=0, output_gate=False),
    "window-adapters-gate": DSLAConfig(window=4, adapter_rank=2, adapters="qkvo"),
    "gla-window": DSLAConfig(variant="gla", window=4, adapter_rank=2, adapters="kv"),
    "rope-window": DSLAConfig(window=3, rope=True, adapter_rank=2, adapters="qo", normalize=False),
    "w0-adapters-rope": DSLAConfig(window=0, rope=True, adapter_rank=2),
}


@pytest.mark.parametrize("name", CONFIGS)
@torch.no_grad()
def test_fused_step_equals_python_step_float64(name, monkeypatch):
    """A batch mixing plans (rows running attention at some layers) and lengths below, at and past the
    window; every step's logits and the final states and windows agree to float64 rounding."""
    check_fused_equals_python(hybrid_model(CONFIGS[name], torch.float64), monkeypatch)


@torch.no_grad()
def test_fused_step_head_dim_64_float64(monkeypatch):
    """Heads of 64 with 3 query heads a KV head, as the default model's: the step's state update then
    runs the register-blocked token function (the tiny models' heads of 16, the generic loop)."""
    shape = {"hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1}
    check_fused_equals_python(hybrid_model(CONFIGS["window-adapters-gate"], torch.float64, **shape), monkeypatch)


def check_fused_equals_python(hybrid: HybridModel, monkeypatch) -> None:
    """Seven tokens decoded by the Python and the fused step from the same prefilled caches."""
    plans = [range(4), [0, 2], [1, 3]]
    caches = prefilled(hybrid, [hybrid.new_cache(plan) for plan in plans], (2, 4, 9))
    tokens = torch.randint(0, 99, (3, 7))
    calls = count_calls(monkeypatch, "decode_step")
    ref, ref_states, ref_windows = decode(hybrid, caches, tokens, fused=False, monkeypatch=monkeypatch)
    assert not calls
    out, states, windows = decode(hybrid, caches, tokens, fused=True, monkeypatch=monkeypatch)
    assert len(calls) == 4 * 7  # every DSLA layer of every step ran fused
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    pairs = [*zip(states, ref_states, strict=True), *zip(windows, ref_windows, strict=True)]
    for ours, theirs in pairs:  # per sequence, per DSLA layer
        for a, b in zip(ours, theirs, strict=True):
            torch.testing.assert_close(torch.stack(a), torch.stack(b), rtol=1e-10, atol=1e-10)


@torch.no_grad()
def test_fused_step_bfloat16_close_to_python_step(monkeypatch):
    """bfloat16 activations and windows, float32 states: the fused step rounds less often than the
    Python step (which rotates and projects gates in bfloat16), so they agree to bfloat16 tolerance.
    (Unquantised: bfloat16 gate weights, as the Python step's.)"""
    hybrid = hybrid_model(CONFIGS["window-adapters-gate"], torch.bfloat16)
    caches = prefilled(hybrid, [hybrid.new_cache(range(4)) for _ in range(2)], (3, 11))
    tokens = torch.randint(0, 99, (2, 6))
    ref = decode(hybrid, caches, tokens, fused=False, monkeypatch=monkeypatch)[0].float()
    out = decode(hybrid, caches, tokens, fused=True, monkeypatch=monkeypatch)[0].float()
    # the two paths' bf16 roundings drift apart over six steps of this random tiny model: 1-5 % of the
    # largest logit across prefill draws (float64 above: equal to 1e-10)
    assert (out - ref).abs().max() <= 0.06 * ref.abs().max()


@torch.no_grad()
def test_fused_step_follows_parameter_updates(monkeypatch):
    """The fused step reads copies of each layer's parameters, checked once per decode step: a parameter
    written in place (an optimiser step) or moved (``.data`` replaced) between steps is read at the next."""
    hybrid = hybrid_model(CONFIGS["window-adapters-gate"], torch.float64)
    caches = prefilled(hybrid, [hybrid.new_cache(range(4))], (9,))
    tokens = torch.randint(0, 99, (1, 2))
    decode(hybrid, caches, tokens[:, :1], fused=True, monkeypatch=monkeypatch)  # copies made and cached
    hybrid.dsla(1).gain.mul_(1.5)
    hybrid.dsla(2).adapters["o"].B.add_(0.1)
    hybrid.dsla(3).gate_far.weight.data = hybrid.dsla(3).gate_far.weight.data + 0.1
    ref = decode(hybrid, caches, tokens, fused=False, monkeypatch=monkeypatch)[0]
    torch.testing.assert_close(decode(hybrid, caches, tokens, fused=True, monkeypatch=monkeypatch)[0], ref)
    # another model over the same layers, after a change the first one has not seen
    hybrid.dsla(1).gain.mul_(0.5)
    other = HybridModel(hybrid.base)
    ref = decode(other, caches, tokens, fused=False, monkeypatch=monkeypatch)[0]
    torch.testing.assert_close(decode(other, caches, tokens, fused=True, monkeypatch=monkeypatch)[0], ref)


GATE_CASES = {  # (rows, n_out, n_in, a quantised model's): the packing expected
    (1, 384, 384, True): "int8",
    (8, 64, 64, True): "int8",
    (8, 64, 64, False): "bfloat16",
    (1, 384, 384, False): "bfloat16",
    (8, 48, 22, True): "bfloat16",
    (2, 40, 30, True): "none",
}


@pytest.mark.parametrize("case", GATE_CASES)
def test_gate_projection_against_float64(case):
    """The decode step's gate projection, with the weights as its layer packs them: in a quantised model
    int8 codes for AVX512-VNNI where the build has it and the shape allows (the default model's (384, 384),
    the tiny test models' (64, 64)), else (and in an unquantised model) bfloat16 pairs for AVX512-BF16 (8
    rows: two groups of four; 11 input pairs: the partial sums' remainder), else float FMAs (n_out not a
    multiple of 16). int8: x Wqᵀ + b in float64 with Wq the codes times their scale (Int8Linear's
    quantiser), up to the rows' two-pass int8 coding; bfloat16 and float: bf16(x) Wᵀ + b (they round x as
    the Python step's bfloat16 projection does), up to float32 sums."""
    B, n_out, n_in, int8 = case
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(n_out, n_in, generator=gen).bfloat16(), torch.randn(n_out, generator=gen).bfloat16()
    x = torch.randn(B, n_in, generator=gen)
    g, kind = native.load().gate_projection(w, b, x, int8)
    fallback = ("bfloat16", "none")  # a CPU without AVX512-VNNI or AVX512-BF16
    allowed = {"int8": ("int8",) if native.has_int4_gemv() else fallback, "bfloat16": fallback, "none": ("none",)}
    assert kind in allowed[GATE_CASES[case]]
    exact = x.double() @ w.double().T + b.double()
    if kind == "int8":
        wq_scale = (w.float().abs().amax(1) / 127).clamp(min=1e-10).bfloat16().double()
        codes = (w.float() / wq_scale.float()[:, None]).round().clamp(-127, 127).double()
        ref = x.double() @ (codes * wq_scale[:, None]).T + b.double()
        torch.testing.assert_close(g.double(), ref, rtol=1e-4, atol=1e-3)
    else:
        torch.testing.assert_close(g.double(), x.bfloat16().double() @ w.double().T + b.double(), rtol=1e-5, atol=1e-4)
    assert (g.double() - exact).abs().max() > 1e-3  # the weights' or the rows' rounding shows


def test_watch_sees_writes_and_moves():
    t, other = torch.zeros(3), torch.ones(2)
    watch = native.watch([t, other])
    assert not watch.changed()
    other.add_(1)  # written in place
    assert watch.changed() and not watch.changed()
    t.data = torch.zeros(3)  # same tensor object, new storage
    assert watch.changed() and not watch.changed()


def test_grad_mode_uses_the_python_step(monkeypatch):
    """The fused step has no backward: with autograd on it must not run, and gradients reach the
    DSLA parameters through a cached decode."""
    model = tiny_llama()
    convert(model, range(4), config=CONFIGS["window-adapters-gate"])
    hybrid = HybridModel(model)
    monkeypatch.setattr(native, "decode_step", lambda *a, **k: pytest.fail("fused step under autograd"))
    cache = HybridCache([hybrid.new_cache(range(4))])
    hybrid(torch.randint(0, 99, (1, 6)), cache=cache)
    logits, _ = hybrid(torch.randint(0, 99, (1, 1)), cache=cache)
    logits.sum().backward()
    assert model.model.layers[2].self_attn.gate_far.weight.grad is not None


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_attention_decode_equals_sdpa(dtype, monkeypatch):
    """The C++ attention decode (RoPE, KV append in place, softmax over chunks of 256 keys merged)
    against ATen's SDPA path: rows of 1, 300 and 700 cached tokens (one, two and three chunks) whose
    KV buffers grow while decoding, every step's logits and the final caches."""
    hybrid = HybridModel(tiny_llama().to(dtype))
    lengths = (1, 300, 700)  # capacity = length: the first decode step grows every buffer
    caches = prefilled(hybrid, [hybrid.new_cache([], capacity=n) for n in lengths], lengths)
    tokens = torch.randint(0, 99, (3, 5))
    calls = count_calls(monkeypatch, "attention_decode")

    def run(fused: bool):
        use_native(monkeypatch, fused)
        cache = HybridCache(copy.deepcopy(caches))
        logits = [hybrid(tokens[:, t : t + 1], cache=cache, logits_for="last")[0] for t in range(5)]
        return torch.cat(logits, 1).double(), [layer.view() for s in cache.sequences for layer in s.layers]

    ref, ref_kv = run(fused=False)
    assert not calls
    out, kv = run(fused=True)
    assert len(calls) == 4 * 5
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=0.0, atol=0.03 * ref.abs().max().item())
    torch.testing.assert_close(out, ref, **tol)
    cache_tol = tol if dtype == torch.float64 else dict(rtol=0.02, atol=0.02)  # later layers see rounded inputs
    for (k, v), (rk, rv) in zip(kv, ref_kv, strict=True):
        assert k.shape == rk.shape == v.shape
        torch.testing.assert_close(k.double(), rk.double(), **cache_tol)
        torch.testing.assert_close(v.double(), rv.double(), **cache_tol)


def test_attention_decode_refuses_a_full_cache():
    qkv = torch.zeros(1, (4 + 2 * 2) * 8)
    keys = torch.zeros(2, 3, 8)
    with pytest.raises(RuntimeError, match="no room"):
        native.attention_decode(qkv, torch.ones(1, 8), torch.zeros(1, 8), [keys], [keys.clone()], [3], (4, 2, 8))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm_and_silu_mul_against_float64(dtype):
    """The one-pass norm and gated activation against float64 formulas; in bfloat16 (rounded where
    the ATen ops they replace round) equal to those ops but for a last-bit rounding on a few elements."""
    g = torch.Generator().manual_seed(0)
    x, w = (
        torch.randn(37, 576, generator=g, dtype=torch.float64) * 3,
        torch.randn(576, generator=g, dtype=torch.float64),
    )
    norm = native.rms_norm(x.to(dtype), w.to(dtype), 1e-5)
    ref = w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    # the norm computes in float32 for every dtype, as Llama's RMSNorm does
    torch.testing.assert_close(norm.double(), ref, rtol=max(tol, 1e-5), atol=max(tol, 1e-5))
    inter = 1541  # not a multiple of the 16 vector lanes
    gate_up = torch.randn(5, 3, 2 * inter, generator=g, dtype=torch.float64) * 4
    gate_up[0, 0, :4] = torch.tensor([-100.0, 100.0, -30.0, 0.0], dtype=torch.float64)  # saturated sigmoids
    act = native.silu_mul(gate_up.to(dtype))
    assert act.shape == (5, 3, inter) and act.dtype == dtype
    gate, up = gate_up.chunk(2, -1)
    torch.testing.assert_close(act.double(), F.silu(gate) * up, rtol=tol, atol=tol)
    if dtype == torch.bfloat16:
        aten_norm = w.to(dtype) * F.rms_norm(x.to(dtype).float(), (576,), eps=1e-5).to(dtype)
        aten_act = F.silu(gate.to(dtype)) * up.to(dtype)
        for ours, aten in ((norm, aten_norm), (act, aten_act)):
            differ = ours != aten
            assert differ.float().mean().item() < 0.01  # rounding ties at most, one bfloat16 ulp apart:
            ulp = aten.float().abs()[differ] * 2.0**-7
            assert ((ours.float() - aten.float()).abs()[differ] <= ulp).all()


@pytest.mark.parametrize("D", [64, 6])  # 64: the vector path; 6: half not a multiple of 16 lanes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rope_against_float64(dtype, D):
    """The one-pass RoPE of a strided (B, H, T, D) view (as attention's q/k come out of the fused
    projection) against the float64 formula; a contiguous result; bfloat16 rounded once."""
    from dsla_serve.ops.naive import rotate

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 5, D, generator=g, dtype=torch.float64).transpose(1, 2)  # (B, H, T, D), strided
    angle = torch.rand(2, 13, D // 2, generator=g, dtype=torch.float64) * 50
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    out = native.rope(x.to(dtype), cos.to(dtype), sin.to(dtype))
    assert out.shape == x.shape and out.is_contiguous() and out.dtype == dtype
    ref = rotate(x.to(dtype).double(), cos.to(dtype).double(), sin.to(dtype).double())
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2**-8}[dtype]
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)
    if dtype == torch.bfloat16:  # rounded once: the nearest bfloat16 of the float result
        assert (out == ref.float().to(dtype)).float().mean().item() > 0.99


@torch.no_grad()
def test_single_sequence_step_and_native_norm_mlp(monkeypatch):
    """Batch 1 (the slot tensor each state layer keeps) steps as the Python path does in float64, and a
    float32 model's norms and MLPs run the C++ passes, matching the ATen ops to float32 rounding."""
    hybrid = hybrid_model(CONFIGS["window-adapters-gate"], torch.float64)
    caches = prefilled(hybrid, [hybrid.new_cache(range(4))], (6,))
    tokens = torch.randint(0, 99, (1, 5))
    ref = decode(hybrid, caches, tokens, fused=False, monkeypatch=monkeypatch)[0]
    out = decode(hybrid, caches, tokens, fused=True, monkeypatch=monkeypatch)[0]
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    hybrid = hybrid_model(CONFIGS["window-adapters-gate"], torch.float32)
    caches = prefilled(hybrid, [hybrid.new_cache([0, 2])], (9,))
    ref = decode(hybrid, caches, tokens, fused=False, monkeypatch=monkeypatch)[0]
    norms, mlps = count_calls(monkeypatch, "rms_norm"), count_calls(monkeypatch, "silu_mul")
    out = decode(hybrid, caches, tokens, fused=True, monkeypatch=monkeypatch)[0]
    layers = len(hybrid.base.model.layers)
    assert len(norms) == 5 * (2 * layers + 1) and len(mlps) == 5 * layers
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_int4_decode_layer_equals_the_general_path(monkeypatch):
    """With int4 weights a decode layer's norms, linears and residual adds run as three C++ calls
    (``HybridModel.decode_layer``). Batches whose layers are all-DSLA, all-attention or split between
    plans, and one sequence alone, give the very logits, states and windows of the module-by-module path;
    a copy of the model made after such steps decodes the same."""
    if not native.has_int4_gemv():
        pytest.skip("no AVX512-VNNI: int4 linears run on ATen's kernel, outside the fused layer calls")
    model = tiny_llama()
    randomize_gates(convert(model, range(4), config=CONFIGS["window-adapters-gate"]).values())
    model = model.to(torch.bfloat16)
    quantize_model(model, "int4", lm_head=False)
    hybrid = HybridModel(model)
    tokens = torch.randint(0, 99, (4, 6))
    # layer 0 all-DSLA and layer 3 all-attention in the second batch; every layer split in the first
    for plans, lengths in (([range(4), [0, 2], [1, 3], [0, 1]], (2, 5, 9, 3)), ([[0, 1], [0, 2], [0]], (4, 8, 6)),
                           ([[0, 2]], (7,))):  # fmt: skip
        caches = prefilled(hybrid, [hybrid.new_cache(plan) for plan in plans], lengths)
        rows = tokens[: len(plans)]
        mlps = count_calls(monkeypatch, "int4_mlp")
        out, states, windows = decode(hybrid, caches, rows, fused=True, monkeypatch=monkeypatch)
        assert len(mlps) == 4 * rows.shape[1]  # every layer of every step ran the fused calls
        with monkeypatch.context() as m:
            m.setattr(HybridModel, "int4_layer", lambda self, i, block: None)
            ref, ref_states, ref_windows = decode(hybrid, caches, rows, fused=True, monkeypatch=monkeypatch)
        assert len(mlps) == 4 * rows.shape[1]
        assert torch.equal(out, ref)
        for got, want in ((states, ref_states), (windows, ref_windows)):
            pairs = [
                (x, y)
                for a, b in zip(got, want, strict=True)
                for p, q in zip(a, b, strict=True)
                for x, y in zip(p, q, strict=True)
            ]
            assert pairs and all(torch.equal(x, y) for x, y in pairs)
    clone = HybridModel(copy.deepcopy(model))  # the bound C++ step parameters are made again, not copied
    assert torch.equal(decode(clone, caches, rows, fused=True, monkeypatch=monkeypatch)[0], out)
    block = model.model.layers[0]
    assert hybrid.int4_layer(0, block) is not None
    linear = torch.nn.Linear(block.mlp.down_proj.in_features, block.mlp.down_proj.out_features, bias=False)
    assert hybrid.int4_layer(0, block) is not None
    block.mlp.down_proj = linear
    assert hybrid.int4_layer(0, block) is None  # a replaced projection is seen (the memo is not stale)


@torch.no_grad()
def test_fused_step_sees_replaced_parameters(monkeypatch):
    """A DSLA parameter replaced by a new one is read at the next decode step, and so are later in-place
    writes to the new one (bfloat16: the step reads a float32 copy of the gain, which a write does not reach)."""
    hybrid = hybrid_model(CONFIGS["window-adapters-gate"], torch.bfloat16)
    caches = prefilled(hybrid, [hybrid.new_cache(range(4))], (9,))
    tokens = torch.randint(0, 99, (1, 1))
    decode(hybrid, caches, tokens, fused=True, monkeypatch=monkeypatch)  # copies made and cached
    dsla = hybrid.dsla(1)
    dsla.gain = torch.nn.Parameter(dsla.gain.detach() * 1.5, requires_grad=False)
    for _ in range(2):
        decode(hybrid, caches, tokens, fused=True, monkeypatch=monkeypatch)
        assert torch.equal(dsla._step_cache[1].gain, dsla.gain.float())
        dsla.gain.mul_(0.5)  # written in place after the replacement


def one_step(params, qkv_seed: int = 0) -> list[torch.Tensor]:
    """One fused decode step of two pooled rows (one past the window, one not) from fixed random inputs:
    o, the o adapter's output, the states and the rings."""
    Hq, Hkv, D = params.heads
    W, B = CONFIGS["window-adapters-gate"].window, 2
    gen = torch.Generator().manual_seed(qkv_seed)
    bf = lambda *s: torch.randn(*s, generator=gen).bfloat16()  # noqa: E731
    qkv, hidden, cos, sin, lcos, lsin = bf(B, (Hq + 2 * Hkv) * D), bf(B, 192), bf(B, D), bf(B, D), bf(B, D), bf(B, D)
    pos, slots = torch.tensor([W + 3, 1]), torch.tensor([1, 0])
    states, ring_k, ring_v = torch.randn(2, 2, Hkv, D, D, generator=gen), bf(2, Hkv, W, D), bf(2, Hkv, W, D)
    before = states.clone()
    o, extra = native.decode_step(qkv, hidden, cos, sin, lcos, lsin, pos, slots, states, ring_k, ring_v, params)
    assert not torch.equal(states, before)  # a token entered a state
    return [o.float(), extra.float(), states, ring_k.float(), ring_v.float()]


def head64_layer() -> DSLAAttention:
    """A bfloat16 DSLA layer with heads of 64 (3 query heads a KV head) and trained-looking adapters."""
    shape = {"hidden_size": 192, "num_attention_heads": 3, "num_key_value_heads": 1}
    dsla = hybrid_model(CONFIGS["window-adapters-gate"], torch.bfloat16, **shape).dsla(1)
    with torch.no_grad():
        for ada in dsla.adapters.values():
            ada.B.normal_()
    return dsla


@torch.no_grad()
def test_fused_step_bfloat16_adapters_equal_float32_copies():
    """bfloat16 adapters are read as they are (half the bytes) and widened in the kernel: the same step as
    with float32 copies of them (the same sums in the same order: equal to float32 rounding); the states
    and windows too."""
    p = head64_layer().step_params(torch.float32)
    assert all(t.dtype == torch.bfloat16 for t in (p.ak, p.bk, p.av, p.bv, p.aq, p.bq, p.ao, p.bo))
    wide = dataclasses.replace(
        p, **{n: getattr(p, n).float() for n in ("ak", "bk", "av", "bv", "aq", "bq", "ao", "bo")}
    )
    for ours, ref in zip(one_step(p), one_step(wide), strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_fused_step_int8_gates_close_to_bfloat16_gates():
    """A quantised model's step reads its gates as int8 codes (AVX512-VNNI): the states it writes and its
    output stay within the codes' rounding of the bfloat16 gates' step, and differ from it (the int8
    kernel ran)."""
    if not native.has_int4_gemv():
        pytest.skip("this CPU has no AVX512-VNNI: int8 gate codes are not used")
    p = head64_layer().step_params(torch.float32)
    assert not p.int8_gates  # an unquantised model's layer
    ours, ref = one_step(dataclasses.replace(p, int8_gates=True)), one_step(p)
    assert not torch.equal(ours[2], ref[2])
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02 * b.abs().max().item())
