"""int4 weight-only mode: quantisation error bounds, both kernels agree, DSLA keeps sharing projections."""

from __future__ import annotations

import copy

import pytest
import torch

from dsla_serve.model import HybridCache, HybridModel, convert
from dsla_serve.model.convert import original_attention
from dsla_serve.model.quant import (
    INT4_MAX_ROWS,
    INT8_VNNI_MAX_ROWS,
    Int4Linear,
    Int8Linear,
    pack_int8_vnni,
    quantize_int4,
    quantize_model,
    unpack_int8_vnni,
)
from dsla_serve.ops import native
from tests.conftest import randomize_gates, tiny_llama

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")


def test_codes_and_error_bound():
    w = torch.randn(48, 96)
    codes, scale, zero = quantize_int4(w)
    assert codes.min() >= 0 and codes.max() <= 15 and scale.shape == (48, 3)
    deq = (codes.view(48, 3, 32).float() - 8) * scale.float()[..., None] + zero.float()[..., None]
    step = scale.float().repeat_interleave(32, 1)
    # half a quantisation step, plus bf16 rounding of scale and zero
    assert ((deq.view(48, 96) - w).abs() <= 0.5 * step + 0.02 * w.abs().amax(1, keepdim=True)).all()


def test_exact_grid_round_trips():
    """Weights already on a 4-bit grid (like a de-quantised Q4_1 GGUF) come back to the same codes."""
    codes = torch.randint(0, 16, (8, 64))
    codes[:, ::32] = 0
    codes[:, 1::32] = 15  # every group spans the full range, as Q4_1 blocks do
    w = codes.float() * 0.125 - 1.0
    got, _, _ = quantize_int4(w)
    assert torch.equal(got, codes.int())


def test_int4_and_bf16_paths_agree():
    lin = torch.nn.Linear(64, 48, bias=True)
    q = Int4Linear(lin)
    x = torch.randn(INT4_MAX_ROWS + 3, 64)
    ref = x @ q.weight_bf16.float().T + q.bias.float()
    small = q(x[:INT4_MAX_ROWS])  # int4 kernel
    large = q(x)  # bf16 GEMM
    assert small.dtype == x.dtype == large.dtype
    torch.testing.assert_close(small, ref[:INT4_MAX_ROWS], atol=0.05, rtol=0.02)
    torch.testing.assert_close(large, ref, atol=0.05, rtol=0.02)


@pytest.mark.skipif(not native.has_int4_gemv(), reason="the CPU has no AVX512-VNNI: ATen's int4 kernel runs")
@pytest.mark.parametrize("rows", [1, 3, INT4_MAX_ROWS])
def test_vnni_int4_gemv_equals_its_float64_emulation(rows):
    """The VNNI kernel computes exactly: activations quantised to int8 per group of 32 (scale
    max|x| / 127), integer dot products with the 4-bit codes, then the group's scale and offset —
    emulated here in float64 from the unpacked codes; float32 accumulation is the only difference."""
    out_f, in_f = 48, 96
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    q = Int4Linear(lin)
    assert q.vnni
    codes, scale, zero = quantize_int4(lin.weight)
    x = torch.randn(rows, in_f).to(torch.bfloat16).float()
    xg = x.view(rows, -1, 32)
    dx = xg.abs().amax(-1, keepdim=True) / 127  # float32, as the kernel: bf16 inputs hit exact ties
    xq = torch.round(xg * (1 / dx)).double()  # half to even, as lrintf
    dx, xg = dx.double(), xg.double()
    dots = torch.einsum("mgi,ogi->mog", xq, codes.double().view(out_f, -1, 32))  # (rows, out, groups)
    s, c = scale.double(), zero.double() - 8 * scale.double()
    ref = (dots * s * dx.squeeze(-1)[:, None]).sum(-1) + (c[None] * xg.sum(-1)[:, None]).sum(-1)
    y32 = native.int4_gemv(x, q.packed, q.scale, q.offset)  # float32 out (the layer rounds to bf16)
    torch.testing.assert_close(y32.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # and the layer's output (bf16) stays close to the de-quantised weights' product
    y = q(x)
    assert y.dtype == x.dtype
    exact = x.double() @ q.weight_bf16.double().T
    assert (y.double() - exact).abs().max() <= 0.02 * exact.abs().max()


@pytest.mark.skipif(not native.has_int4_gemv(), reason="the CPU has no AVX512-VNNI: ATen's kernels run")
def test_vnni_gemvs_read_float64_rows_as_float32():
    """float64 activations are quantised from their float32 values: the same codes, the same products."""
    lin = torch.nn.Linear(96, 48, bias=False)
    q4, q8 = Int4Linear(lin), Int8Linear(lin)
    x = torch.randn(3, 96)
    for residual in (False, True):
        got = native.int4_gemv(x.double(), q4.packed, q4.scale, q4.offset, residual)
        assert got.dtype == torch.float64
        assert torch.equal(got.float(), native.int4_gemv(x, q4.packed, q4.scale, q4.offset, residual))
        got = native.int8_gemv(x.double(), q8.packed, q8.scale, residual)
        assert torch.equal(got.float(), native.int8_gemv(x, q8.packed, q8.scale, residual))


def activation_codes(x: torch.Tensor, passes: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The VNNI GEMVs' activation codes, emulated in float32 as the kernel computes them: per group of
    32, (codes, scale) of each pass, the second coding what the first missed."""
    v, out = x.view(len(x), -1, 32).clone(), []
    for _ in range(passes):
        d = v.abs().amax(-1, keepdim=True) / 127
        q = torch.round(v * (1 / d))  # half to even, as lrintf
        out.append((q.double(), d.double()))
        v = v - d * q
    return out


@pytest.mark.skipif(not native.has_int4_gemv(), reason="the CPU has no AVX512-VNNI: ATen's kernels run")
@pytest.mark.parametrize("rows", [1, 5])
def test_residual_pass_codes_what_the_first_missed(rows):
    """With the residual pass both kernels equal their two-pass float64 emulation, and their error
    against the de-quantised weights' exact product falls from int8 rounding (~1e-2) to ~1e-4."""
    lin = torch.nn.Linear(96, 48, bias=False)
    q4, q8 = Int4Linear(lin), Int8Linear(lin)
    x = torch.randn(rows, 96).to(torch.bfloat16).float()
    codes4, scale, zero = quantize_int4(lin.weight)
    w4 = codes4.double().view(48, -1, 32)
    w8 = q8.codes.double().view(48, -1, 32)
    ref4 = (x.double().view(rows, -1, 32).sum(-1)[:, None] * (zero.double() - 8 * scale.double())[None]).sum(-1)
    ref8 = 0
    for q, d in activation_codes(x, 2):
        dots4 = torch.einsum("mgi,ogi->mog", q, w4)
        ref4 = ref4 + (dots4 * scale.double() * d.squeeze(-1)[:, None]).sum(-1)
        ref8 = ref8 + (torch.einsum("mgi,ogi->mog", q, w8) * d.squeeze(-1)[:, None]).sum(-1)
    ref8 = ref8 * q8.scale.double()
    y4 = native.int4_gemv(x, q4.packed, q4.scale, q4.offset, True).double()
    y8 = native.int8_gemv(x, q8.packed, q8.scale, True).double()
    # the kernel may fuse the residual's multiply-subtract (one rounding fewer): a residual code can differ
    for y, ref in ((y4, ref4), (y8, ref8)):
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    s4, c4 = scale.double().repeat_interleave(32, 1), (zero.double() - 8 * scale.double()).repeat_interleave(32, 1)
    exact_w = {"int4": codes4.double() * s4 + c4, "int8": q8.codes.double() * q8.scale.double()[:, None]}
    one_pass = {
        "int4": native.int4_gemv(x, q4.packed, q4.scale, q4.offset, False),
        "int8": native.int8_gemv(x, q8.packed, q8.scale, False),
    }
    for name, y in (("int4", y4), ("int8", y8)):
        exact = x.double() @ exact_w[name].T
        assert rel_err(y, exact) < 1e-3 < rel_err(one_pass[name], exact)


def rel_err(y: torch.Tensor, exact: torch.Tensor) -> float:
    return ((y.double() - exact).norm() / exact.norm()).item()


def test_quantised_hybrid_shares_projections_and_decodes_consistently():
    model = tiny_llama()
    randomize_gates(convert(model, [1, 3]).values())
    ids = torch.randint(0, 99, (1, 30))
    reference = copy.deepcopy(model)  # float32 with the very weights the int4 layers compute with
    with torch.no_grad():
        for i, layer in enumerate(reference.model.layers):
            attn = original_attention(reference, i)
            for lin in (*(getattr(attn, n) for n in PROJ), layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
                lin.weight.copy_(Int4Linear(lin).weight_bf16.float())
    ref, _ = HybridModel(reference)(ids, dsla_layers=[1])
    model = model.to(torch.bfloat16)
    assert quantize_model(model, "int4", lm_head=False) == 4 * 7
    dsla = model.model.layers[1].self_attn
    assert isinstance(dsla.q_proj, Int4Linear) and dsla.q_proj is dsla.replaced.q_proj
    hybrid = HybridModel(model)
    full, _ = hybrid(ids, dsla_layers=[1])
    torch.testing.assert_close(full.float(), ref, atol=0.1, rtol=0.05)  # bf16 activations, logits ~0.5
    cache = HybridCache([hybrid.new_cache([1])])
    steps = [hybrid(ids[:, :20], cache=cache)[0]] + [hybrid(ids[:, t : t + 1], cache=cache)[0] for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(steps, 1).float(), full.float(), atol=0.1, rtol=0.05)


def test_int8_codes_error_bound_and_kernel():
    lin = torch.nn.Linear(96, 48, bias=True)
    q = Int8Linear(lin)
    assert q.codes.dtype == torch.int8 and q.codes.abs().max() <= 127
    w = lin.weight.detach()
    # half a quantisation step per output channel, plus bf16 rounding of the scale
    assert (
        (q.weight.float() - w).abs() <= 0.5 * w.abs().amax(1, keepdim=True) / 127 + 0.01 * w.abs().amax(1, keepdim=True)
    ).all()
    x = torch.randn(5, 96)
    ref = x @ q.weight.float().T + q.bias.float()
    torch.testing.assert_close(q(x), ref, atol=0.05, rtol=0.02)
    assert q(x).dtype == x.dtype


@pytest.mark.skipif(not native.has_int4_gemv(), reason="the CPU has no AVX512-VNNI: ATen's int8 kernel runs")
@pytest.mark.parametrize("rows", [1, 3, INT8_VNNI_MAX_ROWS])
def test_vnni_int8_gemv_equals_its_float64_emulation(rows):
    """Activations quantised to int8 per group of 32 (scale max|x| / 127), integer dot products with the
    int8 codes, the groups' scales, then the row's: emulated in float64; float32 accumulation and the
    bf16 output are the only differences. The packed codes and their de-quantisation are exact."""
    out_f, in_f = 48, 96
    q = Int8Linear(torch.nn.Linear(in_f, out_f, bias=True))
    assert q.vnni
    codes = q.codes
    assert codes.dtype == torch.int8 and torch.equal(unpack_int8_vnni(pack_int8_vnni(codes)), codes)
    assert torch.equal(q.weight, (codes.float() * q.scale.float()[:, None]).to(torch.bfloat16))
    x = torch.randn(rows, in_f).to(torch.bfloat16).float()
    xg = x.view(rows, -1, 32)
    dx = xg.abs().amax(-1, keepdim=True) / 127  # float32, as the kernel
    xq = torch.round(xg * (1 / dx)).double()  # half to even, as lrintf
    dots = torch.einsum("mgi,ogi->mog", xq, codes.double().view(out_f, -1, 32))  # (rows, out, groups)
    ref = (dots * dx.double().squeeze(-1)[:, None]).sum(-1) * q.scale.double()
    y32 = native.int8_gemv(x, q.packed, q.scale)
    torch.testing.assert_close(y32.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    y = q(x.to(torch.bfloat16))  # the layer: bf16 out, plus the bias
    exact = x.double() @ q.weight.double().T + q.bias.double()
    assert (y.double() - exact).abs().max() <= 0.02 * exact.abs().max()


def test_int8_hybrid_matches_float32_within_tolerance_and_decodes_consistently():
    model = tiny_llama()
    randomize_gates(convert(model, [1, 3]).values())
    ids = torch.randint(0, 99, (1, 30))
    ref, _ = HybridModel(model)(ids, dsla_layers=[1])
    model = model.to(torch.bfloat16)
    assert quantize_model(model, "int8") == 4 * 7 + 1  # every projection and the lm_head
    assert isinstance(model.lm_head, Int8Linear)
    dsla = model.model.layers[1].self_attn
    assert dsla.o_proj is original_attention(model, 1).o_proj
    hybrid = HybridModel(model)
    full, _ = hybrid(ids, dsla_layers=[1])
    torch.testing.assert_close(full.float(), ref, atol=0.1, rtol=0.05)
    cache = HybridCache([hybrid.new_cache([1])])
    steps = [hybrid(ids[:, :20], cache=cache)[0]] + [hybrid(ids[:, t : t + 1], cache=cache)[0] for t in range(20, 30)]
    torch.testing.assert_close(torch.cat(steps, 1).float(), full.float(), atol=0.1, rtol=0.05)


def test_int8_prefill_path_equals_kernel_path():
    """Many rows go through the de-quantised bf16 GEMM, few through the int8 kernel: same numbers."""
    from dsla_serve.model.quant import INT8_MAX_ROWS, INT8_VNNI_MAX_ROWS

    q = Int8Linear(torch.nn.Linear(64, 48, bias=True))
    x = torch.randn((INT8_VNNI_MAX_ROWS if q.vnni else INT8_MAX_ROWS) + 8, 64)
    many = q(x)
    few = torch.cat([q(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(many, few, atol=0.03, rtol=0.02)


def test_int4_mode_keeps_the_lm_head_in_int8():
    """4-bit decoder matrices, 8-bit lm_head (the embedded GGUF's own split: Q4_1 and Q8_0)."""
    model = tiny_llama(vocab_size=96).to(torch.bfloat16)  # 96 rows: the int4 kernel could pack it too
    assert quantize_model(model, "int4") == 4 * 7 + 1
    assert isinstance(model.model.layers[0].mlp.up_proj, Int4Linear)
    assert isinstance(model.lm_head, Int8Linear)


def test_auto_dtype_runs_a_q4_1_gguf_in_int4():
    """The embedded GGUF stores every decoder matrix as Q4_1: "auto" runs them in int4 where the CPU
    has bfloat16 instructions; a model without a GGUF source gets int8 there."""
    from dsla_serve.model.loader import embedded_gguf, gguf_linear_types
    from dsla_serve.model.pretrained import AUTO_DTYPE, cpu_has_bf16, resolve_dtype

    assert gguf_linear_types(embedded_gguf()) == {"Q4_1"}
    assert resolve_dtype("auto") == ("int4" if cpu_has_bf16() else "float32")
    assert resolve_dtype("auto", "some-org/some-model") == (AUTO_DTYPE if cpu_has_bf16() else "float32")
    assert resolve_dtype("bfloat16") == "bfloat16"


def test_auto_dtype_of_an_unreadable_gguf_is_int8(tmp_path):
    """A corrupted .gguf does not fail the dtype choice: loading it reports the error."""
    from dsla_serve.model.pretrained import AUTO_DTYPE, cpu_has_bf16, resolve_dtype

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    assert resolve_dtype("auto", str(bad)) == (AUTO_DTYPE if cpu_has_bf16() else "float32")
