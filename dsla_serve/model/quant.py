"""Weight-only int4 and int8 linear layers for CPU inference (the engine's ``int4``/``int8`` modes).

Decode multiplies one token's activations by every weight matrix: it is bound by how many weight
bytes are read. PyTorch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``, groups of 32 input
channels, bf16 scale and zero per group) reads 1/8 of float32's bytes; measured here on the
SmolLM2-135M layer shapes it is ~10x faster than float32 for one token. Where the CPU has
AVX512-VNNI the C++ GEMV (``native.int4_gemv``) replaces it: it multiplies integers (activations
quantised to int8 per group of 32) instead of de-quantising every weight, 1.8x faster per call on
these shapes. For many tokens (prefill) bf16 GEMM is faster, so each layer keeps the dequantised bf16
weight too and picks by row count. int8 weights (the int4 mode's lm_head, the int8 mode's linears) run
on the same scheme (``native.int8_gemv``) where the CPU has VNNI, else on ATen's int8 kernel.

NOTE(decisions): the embedded model's GGUF stores every linear weight as Q4_1 (blocks of 32,
w = d * q + m), so re-quantising its de-quantised weights per group of 32 with min/max recovers the
same 4-bit codes: the int4 mode runs the weights the GGUF shipped (up to bf16 rounding of d and m).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsla_serve.ops import native
from dsla_serve.ops.recurrent import as_dtype

GROUP = 32
# NOTE(decisions): up to this many rows the int4 kernel beats the bf16 GEMM. Alone (weights in cache) the
# two tie at 8 rows; inside a model, whose weights stream from memory, a decode step of 8 sequences at
# 1024 tokens took 70 ms with the int4 kernel and 82 ms with bf16 GEMM (16 sequences: 125 vs 130 ms).
INT4_MAX_ROWS = 16
# NOTE(decisions): ATen's int8 kernel's time grows with the rows, the de-quantise + bf16 GEMM path's barely
# (1536 x 576, per call: 1 row 26 vs 271 us, 16 rows 175 vs 276, 32 rows 346 vs 289, 256 rows 2865 vs 523)
INT8_MAX_ROWS = 24
# NOTE(decisions): the VNNI int8 GEMV (csrc) reads the weights once for all rows; against de-quantise +
# bf16 GEMM it wins to ~64 rows on 576 x 1536 (64 rows: 0.45 vs 0.45 ms), ~96 on 1536 x 576, ~300 on the
# lm_head (64 rows: 5.1 vs 30 ms); ATen's int8 kernel it beats at every row count (lm_head, 1 row: 0.69 vs
# 1.19 ms, 8 rows: 1.16 vs 3.14).
INT8_VNNI_MAX_ROWS = 48
# NOTE(decisions): the VNNI GEMVs' int8 activations cost decode perplexity (int4 mode against float32,
# teacher-forced decode at 512 tokens: +0.64 % all-attention, +1.87 % 100 % DSLA). A second int8 pass
# on what the first missed (``residual``) removes most of it: in the int8 lm_head alone it brings
# all-attention to +0.37 % (100 % DSLA +1.76 %) at no measurable speed cost, so int8 linears take it up
# to this many rows; in every int4 linear too it reached +0.38 % / +0.78 % but cost 6.5 % of decode time
# (13.35 vs 12.53 ms a token), so int4 linears do not.
RESIDUAL_MAX_ROWS = 16
INT4_RESIDUAL = False


def quantize_int4(weight: Tensor, group: int = GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric 4-bit codes per group of ``group`` input channels.

    weight: (out, in). Returns codes (out, in) int32 in [0, 15], and bf16 scale and zero (out, in/group)
    such that w ≈ (code - 8) * scale + zero (the CPU kernel's convention).
    """
    out_f, in_f = weight.shape
    w = weight.detach().float().view(out_f, in_f // group, group)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    codes = ((w - lo) / scale).round().clamp(0, 15)
    scale_b = scale.squeeze(-1).to(torch.bfloat16)
    zero_b = (lo + 8 * scale).squeeze(-1).to(torch.bfloat16)
    return codes.view(out_f, in_f).to(torch.int32), scale_b, zero_b


def pack_int4_vnni(codes: Tensor, scale: Tensor, zero: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``quantize_int4``'s codes, scale and zero in the layout of the C++ VNNI GEMV (csrc/dsla.cpp):
    codes (out/16, in/32, 4, 64) uint8, two per byte (16 rows x 4 inputs per 64 bytes); scale
    (out/16, in/32, 16) bf16 and offset = zero - 8 scale float32, so that w = code * scale + offset."""
    out_f, in_f = codes.shape
    c = codes.to(torch.uint8).view(out_f // 16, 16, in_f // GROUP, 4, 2, 4)  # (rb, r, g, pair, half, k)
    c = c.permute(0, 2, 3, 1, 5, 4)  # (rb, g, pair, r, k, half)
    packed = (c[..., 0] | (c[..., 1] << 4)).reshape(out_f // 16, in_f // GROUP, 4, 64).contiguous()

    def by_block(t: Tensor) -> Tensor:  # (out, in/32) -> (out/16, in/32, 16)
        return t.view(out_f // 16, 16, -1).transpose(1, 2).contiguous()

    offset = zero.float() - 8 * scale.float()
    return packed, by_block(scale), by_block(offset)


def supports(linear: nn.Linear, group: int = GROUP) -> bool:
    """The CPU kernel packs 16 output channels and ``group`` input channels at a time."""
    out_f, in_f = linear.weight.shape
    return in_f % group == 0 and out_f % 16 == 0


class Int4Linear(nn.Module):
    """A frozen ``nn.Linear`` with int4 weights for decode and their bf16 dequantisation for prefill."""

    def __init__(self, linear: nn.Linear, group: int = GROUP):
        super().__init__()
        out_f, in_f = linear.weight.shape
        if not supports(linear, group):
            raise ValueError(f"int4 needs in_features % {group} == 0 and out_features % 16 == 0, got {in_f}, {out_f}")
        self.in_features, self.out_features, self.group = in_f, out_f, group
        codes, scale, zero = quantize_int4(linear.weight, group)
        self.vnni = group == GROUP and native.has_int4_gemv()
        if self.vnni:
            for name, t in zip(("packed", "scale", "offset"), pack_int4_vnni(codes, scale, zero), strict=True):
                self.register_buffer(name, t)
        else:
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
            self.register_buffer("scales_zeros", torch.stack([scale, zero], -1).transpose(0, 1).contiguous())
        deq = (codes.view(out_f, -1, group).float() - 8) * scale.float()[..., None] + zero.float()[..., None]
        self.register_buffer("weight_bf16", deq.view(out_f, in_f).to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    @property
    def weight(self) -> Tensor:
        """The dequantised weight (what the layer computes with), for code that reads ``.weight``."""
        return self.weight_bf16

    def gemv_args(self) -> native.Int4Args | None:
        """What the C++ GEMV reads (packed codes, scales, offsets) where the fused decode-layer calls can run
        this linear (a VNNI build, no bias), else None."""
        return (self.packed, self.scale, self.offset) if self.vnni and self.bias is None else None

    def forward(self, x: Tensor) -> Tensor:
        rows = as_dtype(x.reshape(-1, self.in_features), torch.bfloat16)
        if rows.shape[0] <= INT4_MAX_ROWS:
            if self.vnni:
                y = native.int4_gemv(rows, self.packed, self.scale, self.offset, INT4_RESIDUAL)
            else:
                y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, self.group, self.scales_zeros)
            if self.bias is not None:
                y = y + self.bias
        else:
            y = F.linear(rows, self.weight_bf16, self.bias)
        return as_dtype(y.view(*x.shape[:-1], self.out_features), x.dtype)


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` with int8 weights (symmetric, one scale per output channel).

    Few rows run on the C++ VNNI GEMV where the CPU has it and the shape suits (``native.int8_gemv``:
    the codes packed for it), else on ``torch._weight_int8pack_mm``; both read a quarter of float32's
    weight bytes, so unlike int4 no second copy of the weight is kept for prefill.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        scale = (w.abs().amax(1) / 127).clamp(min=1e-10).to(torch.bfloat16).float()  # (out,), as stored
        codes = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
        self.vnni = supports(linear) and native.has_int4_gemv()
        if self.vnni:
            self.register_buffer("packed", pack_int8_vnni(codes))
        else:
            self.register_buffer("int8_codes", codes)
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))

    @property
    def codes(self) -> Tensor:
        """The int8 codes (out, in)."""
        return unpack_int8_vnni(self.packed) if self.vnni else self.int8_codes

    @property
    def native(self) -> bool:
        """Whether the VNNI kernels run (packed codes, and the C++ kernels not turned off since)."""
        return self.vnni and native.available()

    @property
    def weight(self) -> Tensor:
        """The dequantised weight (bf16), for code that reads ``.weight`` (and for fusing projections).
        Codes are integers below 256 in magnitude, exact in bf16, so one rounding, of the product."""
        if self.native:
            return native.int8_dequant(self.packed, self.scale)
        return (self.codes.float() * self.scale.float()[:, None]).to(torch.bfloat16)

    def forward(self, x: Tensor) -> Tensor:
        rows = as_dtype(x.reshape(-1, self.in_features), torch.bfloat16)
        if rows.shape[0] <= (INT8_VNNI_MAX_ROWS if self.native else INT8_MAX_ROWS):
            if self.native:
                y = native.int8_gemv(rows, self.packed, self.scale, len(rows) <= RESIDUAL_MAX_ROWS)
            else:
                y = torch._weight_int8pack_mm(rows, self.codes, self.scale)
            if self.bias is not None:
                y = y + self.bias
        else:  # prefill: de-quantise once per call and use the bf16 GEMM (AMX where the CPU has it)
            y = F.linear(rows, self.weight, self.bias)
        return as_dtype(y.view(*x.shape[:-1], self.out_features), x.dtype)


def pack_int8_vnni(codes: Tensor) -> Tensor:
    """int8 codes (out, in) in the layout of the C++ VNNI GEMV (csrc/dsla.cpp): (out/16, in/4, 64) uint8,
    byte r·4 + k of input quad j holding code[16·rb + r, 4j + k] + 128."""
    out_f, in_f = codes.shape
    u = (codes.to(torch.int16) + 128).to(torch.uint8).view(out_f // 16, 16, in_f // 4, 4)  # (rb, r, j, k)
    return u.permute(0, 2, 1, 3).reshape(out_f // 16, in_f // 4, 64).contiguous()


def unpack_int8_vnni(packed: Tensor) -> Tensor:
    """``pack_int8_vnni``'s inverse: the int8 codes (out, in)."""
    n_blocks, quads, _ = packed.shape
    u = packed.view(n_blocks, quads, 16, 4).permute(0, 2, 1, 3).reshape(n_blocks * 16, quads * 4)
    return (u.to(torch.int16) - 128).to(torch.int8)


QUANTIZERS = {"int4": (Int4Linear, supports), "int8": (Int8Linear, lambda linear: True)}


def quantize_model(model: nn.Module, mode: str, lm_head: bool = True) -> int:
    """Replace every decoder-layer ``nn.Linear`` (q/k/v/o, MLP) by ``mode``'s weight-only linear and
    the lm_head by the int8 one, in place. Converted layers keep sharing q/k/v/o with the attention
    they replaced. Shapes the kernel cannot pack stay as they are. Returns the count replaced.

    NOTE(decisions): the lm_head (49152 x 576 for SmolLM2-135M) is a fifth of the model's weight
    bytes; left in bf16 it was the single largest op of an int4 decode step (7.5 of ~38 ms). It is
    int8 in the int4 mode too: the embedded GGUF stores it as Q8_0, and 4 bits cost +5.5 % decode
    perplexity where 8 bits cost -0.5 % (teacher-forced decode of 724 held-out tokens, four domains).
    """
    from dsla_serve.layers import DSLAAttention
    from dsla_serve.model.convert import decoder_layers, original_attention

    cls, ok = QUANTIZERS[mode]
    count = 0
    for i, layer in enumerate(decoder_layers(model)):
        attn = original_attention(model, i)
        for parent in (attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear) and ok(child):
                    setattr(parent, name, cls(child))
                    count += 1
        if isinstance(layer.self_attn, DSLAAttention):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                setattr(layer.self_attn, name, getattr(attn, name))
    if lm_head and isinstance(model.lm_head, nn.Linear):
        model.lm_head = Int8Linear(model.lm_head)  # the tied embedding keeps its own weight
        count += 1
    return count
