"""The DSLA layer: initialisation, drop-in use inside a Hugging Face model, KV-cache folding."""

from __future__ import annotations

import math

import pytest
import torch

from dsla_serve.config import DSLAConfig
from dsla_serve.layers import DSLAAttention, rotate
from dsla_serve.model import HybridCache, HybridModel, convert
from dsla_serve.ops import GATE_MIN, naive_dsla
from tests.conftest import randomize_gates, tiny_llama


def test_rotate_inverts_with_negative_sin():
    x = torch.randn(2, 3, 5, 8)
    angle = torch.rand(2, 5, 4) * 10
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    torch.testing.assert_close(rotate(rotate(x, cos, sin), cos, -sin), x, atol=1e-5, rtol=1e-5)


def test_fresh_gates_start_one_slow_one_fast_state(tiny):
    cfg = DSLAConfig(far_half_life=(256, 8192), close_half_life=(1, 32))
    layer = convert(tiny, [0], config=cfg)[0]
    kv = torch.randn(1, 2, 10, 16)
    g_far, g_close = layer.gates(kv, kv)
    life_far = -math.log(2) / g_far  # half-lives in tokens
    life_close = -math.log(2) / g_close
    assert life_far.min() > 200 and life_far.max() < 9000
    assert life_close.min() > 0.9 and life_close.max() < 40
    assert (g_close >= GATE_MIN).all()
    # weights start at zero: gates do not depend on the input yet, and the output gate is 2·sigmoid(0) = 1
    assert torch.equal(g_far, layer.gates(torch.randn_like(kv), kv)[0])
    assert not layer.out_gate.weight.any() and not layer.out_gate_bias.any()


def test_reuses_attention_weights_and_adds_only_gates(tiny):
    attn = tiny.model.layers[1].self_attn
    layer = convert(tiny, [1])[1]
    assert layer.q_proj is attn.q_proj and layer.o_proj is attn.o_proj
    assert set(layer.dsla_parameters()) == {
        "gate_far.weight", "gate_far.bias", "gate_close.weight", "gate_close.bias", "alpha", "gain",
        "out_gate.weight", "out_gate_bias",
    }  # fmt: skip
    assert layer.replaced is attn


@pytest.mark.parametrize("rope", [False, True])
def test_layer_matches_kernel_reference(tiny, rope):
    """The layer's output is o_proj(gain * 2σ(W q + b) * naive_dsla(q, k, v, gates)), q/k rotated if ``rope``."""
    layer = convert(tiny, [2], config=DSLAConfig(rope=rope))[2]
    randomize_gates([layer])
    x = torch.randn(2, 11, 64)
    pos = torch.arange(11)[None].expand(2, -1)
    cos, sin = tiny.model.rotary_emb(x, pos)
    out, _ = layer(x, position_embeddings=(cos, sin))
    q, k, v = layer.project(x)
    g_far, g_close = layer.gates(k, v)
    out_gate = 2 * torch.sigmoid(layer.out_gate(q) + layer.out_gate_bias[:, None])  # from the un-rotated query
    if rope:
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    o, _ = naive_dsla(q.double(), k.double(), v.double(), g_far.double(), g_close.double(), layer.alpha.double())
    ref = layer.o_proj((o.float() * layer.gain[:, None] * out_gate).transpose(1, 2).reshape(2, 11, -1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


def test_gla_variant_is_single_state(tiny):
    layer = convert(tiny, [0], config=DSLAConfig(variant="gla"))[0]
    assert layer.gate_close is None and "alpha" not in layer.dsla_parameters()
    x = torch.randn(1, 9, 64)
    q, k, v = layer.project(x)
    g_far, g_close = layer.gates(k, v)
    assert torch.equal(g_far, g_close)
    cos, sin = tiny.model.rotary_emb(x, torch.arange(9)[None])
    o_layer = layer.attend(q, k, v, cos, sin)[0]
    # one state, weight 1 on it: equals the dual kernel run with both gates equal and w = (1, 0)
    o_ref, _ = naive_dsla(q, k, v, g_far, g_far, torch.tensor([30.0, -30.0]))  # default config: no RoPE
    out_gate = 2 * torch.sigmoid(layer.out_gate(q) + layer.out_gate_bias[:, None])
    torch.testing.assert_close(o_layer, (o_ref * layer.gain[:, None] * out_gate).transpose(1, 2).reshape(1, 9, -1))


def test_drop_in_inside_hugging_face_forward(tiny):
    """HF's own forward with converted layers == the engine's forward with the same plan."""
    ids = torch.randint(0, 99, (2, 33))
    ref_attn = tiny(ids, use_cache=False).logits
    layers = convert(tiny, [1, 3])
    randomize_gates(layers.values())
    hf = tiny(ids, use_cache=False).logits
    engine, _ = HybridModel(tiny)(ids, dsla_layers=[1, 3])
    torch.testing.assert_close(engine, hf, atol=1e-5, rtol=1e-5)
    assert (hf - ref_attn).abs().max() > 1e-3  # the converted layers did change the output


def test_hf_cache_is_refused(tiny):
    convert(tiny, [0])
    with pytest.raises(ValueError, match="use_cache=False"):
        tiny(torch.randint(0, 99, (1, 5)), use_cache=True)


@pytest.mark.parametrize("rope", [True, False])
def test_fold_kv_cache_equals_dsla_prefill_state(rope):
    model = tiny_llama()
    layers = convert(model, range(4), config=DSLAConfig(rope=rope))
    randomize_gates(layers.values())
    hybrid = HybridModel(model)
    ids = torch.randint(0, 99, (1, 90))
    attn_cache = HybridCache([hybrid.new_cache([])])
    hybrid(ids, cache=attn_cache)
    dsla_cache = HybridCache([hybrid.new_cache([2])])
    hybrid(ids, cache=dsla_cache)
    # layers 0-1 run attention in both, so layer 2 sees the same input: its folded state must match
    hybrid.fold_to_dsla(attn_cache[0], [2])
    for a, b in zip(attn_cache[0].layers[2].state, dsla_cache[0].layers[2].state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert attn_cache[0].conversions == [2]


def test_unsupported_module_is_rejected(tiny):
    with pytest.raises(TypeError, match="q_proj"):
        DSLAAttention(torch.nn.Linear(2, 2), tiny.config, 0)


@pytest.mark.parametrize("kind", ["float64", "bfloat16", "int8"])
def test_prefill_output_merges_the_o_adapter(tiny, kind):
    """Without autograd, over more than MERGED_O_MIN_ROWS tokens, o_proj and the o adapter run as one
    merged matrix (built once per parameter version, also under inference mode and for a quantised
    o_proj): the same output as o_proj(o) + B·A·o, following the adapter's updates."""
    from dsla_serve.layers.dsla_attention import MERGED_O_MIN_ROWS
    from dsla_serve.model.quant import Int8Linear

    dtype = torch.float64 if kind == "float64" else torch.bfloat16
    tiny = tiny.to(dtype)
    layer = convert(tiny, [1], config=DSLAConfig(adapter_rank=3, adapters="o"))[1]
    if kind == "int8":
        layer.o_proj = Int8Linear(layer.o_proj)
    ada = layer.adapters["o"]
    o = torch.randn(2, MERGED_O_MIN_ROWS + 5, layer.o_proj.in_features, dtype=dtype)
    for _ in range(2):
        with torch.no_grad():
            ada.B.normal_()  # zero at initialisation: give it weight (and change it between the calls)
        with torch.inference_mode():  # as the serving engine runs
            merged = layer.output(o)
        built = layer._merged_o[1]
        with torch.inference_mode():
            assert layer.output(o).equal(merged) and layer._merged_o[1] is built  # cached
        separate = layer.o_proj(o) + ada(o)  # with autograd: the unmerged path
        assert separate.requires_grad
        if kind == "float64":
            torch.testing.assert_close(merged, separate.detach(), rtol=1e-12, atol=1e-12)
        else:  # the merged weight is rounded to bfloat16 once
            err = (merged.float() - separate.detach().float()).abs().max()
            assert err <= 0.02 * separate.detach().float().abs().max()
    assert ada.B.any()


def test_merged_output_keeps_o_proj_trainable(tiny):
    """o_proj's own weight requiring grad keeps the unmerged path, so it gets its gradient."""
    layer = convert(tiny, [1], config=DSLAConfig(adapter_rank=3, adapters="o"))[1]
    layer.adapters["o"].requires_grad_(False)
    layer.o_proj.weight.requires_grad_(True)  # e.g. an ablation that tunes o_proj
    o = torch.randn(1, 40, layer.o_proj.in_features)
    layer.output(o).sum().backward()
    assert layer.o_proj.weight.grad is not None and not hasattr(layer, "_merged_o")


@pytest.mark.parametrize(("adapters", "variant"), [("qkvo", "dsla"), ("k", "dsla"), ("v", "gla"), ("qo", "dsla")])
def test_inference_state_inputs_equal_the_modules(tiny, adapters, variant):
    """Without autograd the k/v adapters and the gates run on one [k | v] matrix (block-diagonal adapter,
    gate columns reordered) and the q adapter by one addmm: in float64 the same states' keys, values, gate
    pre-activations and queries as the modules' own forwards, following updates of adapters and gates."""
    config = DSLAConfig(adapter_rank=3, adapters=adapters, variant=variant)
    layer = convert(tiny.double(), [1], config=config)[1]
    k, v = torch.randn(2, 2, layer.num_kv_heads, 7, layer.head_dim, dtype=torch.float64)
    q = torch.randn(2, layer.num_heads, 7, layer.head_dim, dtype=torch.float64)
    hidden = torch.randn(2, 7, tiny.config.hidden_size, dtype=torch.float64)
    for _ in range(2):
        with torch.no_grad():
            for ada in layer.adapters.values():
                ada.B.normal_()  # zero at initialisation: give it weight (and change it between the calls)
        randomize_gates([layer])  # and new gate weights
        k_ref, v_ref = layer.adapt("k", k), layer.adapt("v", v)
        pre_ref = layer.gate_logits(k_ref, v_ref)[0]
        q_ref = layer.state_query(q, hidden)
        assert pre_ref.requires_grad  # the modules' path, as training runs it
        with torch.inference_mode():
            k_s, v_s, (pre, *_) = layer.state_inputs(k, v)
            q_s = layer.state_query(q, hidden)
        for ours, ref in ((k_s, k_ref), (v_s, v_ref), (pre, pre_ref), (q_s, q_ref)):
            torch.testing.assert_close(ours, ref.detach(), rtol=1e-12, atol=1e-12)
