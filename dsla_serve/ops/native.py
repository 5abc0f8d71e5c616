"""The fused C++ kernels (``csrc/dsla.cpp``), built on first use and cached per machine.

Decode step. Batch-1 decode is bound by per-op dispatch: the Python DSLA step (``DSLAAttention.step``
over ``step_dsla``) issues about 120 more small tensor ops per layer than attention does, so a DSLA
layer decoded slower than the attention it replaced at every context measured. The fused step does
the layer's token mixing after the q/k/v projection in one call, in place on the state pool.

Attention decode (``attention_decode``). The same overhead on the attention side: RoPE, the KV
append and one SDPA per sequence were ~20 ops per layer; one call does them for the whole batch.

int4 GEMV (``int4_gemv``). ATen's CPU int4 kernel de-quantises every weight to float and measured
compute-bound; this one quantises the few activation rows to int8 per group of 32 and multiplies
integers with AVX512-VNNI.

RMS norm and silu(gate)·up (``rms_norm``, ``silu_mul``): one pass each instead of four and two ATen
ops, rounded where those ops round; at batch 1 they were ~10 dispatches per layer. With int4 weights a
decode layer's norms, linears and residual adds are three calls around the token mixing (``norm_int4``,
``int4_residual``, ``int4_mlp``). RoPE (``rope``): one pass instead of five ATen ops over q and k
before attention's prefill (0.7 of its 3.0 ms a layer at 1024 tokens).

Prefill scan (``scan_dsla``, same contract as ``chunk_dsla``). The chunked form's ~30 float32 ops
per chunk lost to bfloat16 flash attention up to 8k tokens; the recurrence over D x D states kept in
L1 does a DSLA layer's prefill in one call and no intermediate tensors but the reads. It also makes
the gates' decays from their pre-activations and rotates the states' q/k (in Python these were ~1.3
ms of a layer's 5.3 at 1024 tokens). Inference only: training keeps the chunked form (autograd).

The Python paths stay the references the kernels are tested against (and the paths on machines
without a C++ compiler: the build failing logs one warning). ``DSLA_SERVE_NATIVE=0`` turns them off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import Tensor

from dsla_serve.ops.chunk import chunk_dsla, compute_dtype
from dsla_serve.ops.naive import GateLogits, StatePair, log_decays, mixing_weights, rotate

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "dsla.cpp"
_lock = threading.Lock()
_module: object | None = None
_failed: str | None = None


def _cpu_flags() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    return next((line for line in text.splitlines() if line.startswith("flags")), "")


def build_dir() -> Path:
    """Per source, torch version and CPU (the build uses -march=native): a cache dir shared across
    machines never loads code built for another CPU."""
    from dsla_serve.model.loader import cache_dir

    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_flags().encode()).hexdigest()[:16]
    return cache_dir() / "native" / key


def load() -> object | None:
    """The compiled extension, or None where it cannot be built (logged once) or is turned off."""
    global _module, _failed
    if os.environ.get("DSLA_SERVE_NATIVE", "1") == "0":
        return None
    if _module is not None or _failed is not None:
        return _module
    with _lock:
        if _module is None and _failed is None:
            try:
                from torch.utils.cpp_extension import load as build

                out = build_dir()
                out.mkdir(parents=True, exist_ok=True)
                flags = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp"]
                _module = build("dsla_native", [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                                build_directory=str(out), verbose=False)  # fmt: skip
            except Exception as e:  # no compiler, no headers: the Python step still works
                _failed = f"{type(e).__name__}: {e}"
                log.warning("fused DSLA kernels unavailable, using the Python paths (%s)", _failed.splitlines()[0])
    return _module


def available() -> bool:
    return load() is not None


def _ext() -> object:
    """The extension, for the wrappers below: their callers decided by ``available()`` (or ``load()``)
    that the kernels run. NOTE(decisions): the ``DSLA_SERVE_NATIVE`` lookup in ``load`` takes ~0.7 us,
    and a batch-1 decode step made ~126 wrapper calls (~90 us of ~6.5 ms); decisions still read it."""
    module = _module if _module is not None else load()
    if module is None:
        raise RuntimeError(
            f"the C++ kernels are not loaded ({_failed or 'DSLA_SERVE_NATIVE=0'}): check available() first"
        )
    return module


@dataclass(frozen=True)
class StepParams:
    """A DSLA layer's parameters as the fused step reads them (contiguous, in the state dtype but the
    gates and bfloat16 adapters, which keep the layer's dtype); empty tensors stand for a missing adapter
    or output gate.
    Adapters are (A (r, in), B transposed (r, out)); the output gate's weight is transposed."""

    gate_w: Tensor  # (nG·Hkv·D, 2·Hkv·D), columns [k of every head | v of every head]
    gate_b: Tensor  # (nG·Hkv·D,)
    ak: Tensor
    bk: Tensor
    av: Tensor
    bv: Tensor
    aq: Tensor
    bq: Tensor
    ao: Tensor
    bo: Tensor
    mix: Tensor  # (Hq, 2|3)
    gain: Tensor  # (Hq, D)
    og_w: Tensor  # (D, D)
    og_b: Tensor  # (Hq, D)
    heads: tuple[int, int, int]  # Hq, Hkv, D
    gate_normalizer: float
    gate_min: float
    eps: float
    normalize: bool
    rope: bool
    int8_gates: bool  # a quantised model's: the gates as int8 codes where the CPU has AVX512-VNNI

    def __getstate__(self) -> dict:  # the C++ object neither copies nor pickles: made again on first use
        return {k: v for k, v in self.__dict__.items() if k != "_bound"}

    def bound(self) -> object:
        """The parameters and options as one C++ object (made on first use, kept): converting ~25 arguments
        per decode step cost ~5 µs of a ~90 µs layer step at batch 1."""
        if "_bound" not in self.__dict__:
            names = [f.name for f in fields(self)]
            tensors = [getattr(self, n) for n in names[: names.index("heads")]]
            D = self.heads[2]
            options = (
                self.gate_normalizer,
                self.gate_min,
                self.eps,
                self.normalize,
                self.rope,
                D**-0.5,
                D**-0.5,
                self.int8_gates,
            )
            object.__setattr__(self, "_bound", _ext().StepLayer(tensors, *self.heads, *options))
        return self.__dict__["_bound"]


def decode_step(
    qkv: Tensor, hidden: Tensor, cos: Tensor, sin: Tensor, lcos: Tensor, lsin: Tensor, pos: Tensor, slots: Tensor,
    states: Tensor, ring_k: Tensor, ring_v: Tensor, p: StepParams,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """One decode token for B pooled sequences of a DSLA layer; states and rings updated in place.

    qkv (B, (Hq + 2·Hkv)·D) un-rotated and hidden (B, hidden) the layer input (read by a q adapter), each
    also as a decode step's (B, 1, n); cos/sin (B, D) of the new token, lcos/lsin (B, D) of the token
    leaving the window; pos (B,) the new token's position; slots (B,) pool slots of ``states``
    (S, 2, Hkv, D, D) and the rings (S, Hkv, W, D). Returns the mixed read-out (B, Hq·D) before o_proj
    and the o adapter's output (B, hidden), or None without one.
    """
    o, extra = _ext().dsla_decode_layer(
        qkv, hidden, cos, sin, lcos, lsin, pos, slots, states, ring_k, ring_v, p.bound()
    )
    return o, (extra if extra.numel() else None)


def attention_decode(
    qkv: Tensor, cos: Tensor, sin: Tensor, keys: list[Tensor], values: list[Tensor], lengths: list[int],
    heads: tuple[int, int, int],
) -> Tensor:  # fmt: skip
    """One attention decode token for B sequences: qkv (B, (Hq + 2·Hkv)·D) un-rotated, cos/sin (B, D) (or
    each (B, 1, n)). Each row's rotated key and value are written at ``lengths[b]`` of its (Hkv, capacity, D) buffers
    (in place; the caller makes room and advances the length); returns the output (B, Hq·D) before
    o_proj, softmax over the row's lengths[b] + 1 keys."""
    Hq, Hkv, D = heads
    return _ext().attention_decode(qkv, cos, sin, keys, values, lengths, Hq, Hkv, D, D**-0.5)


def watch(tensors: list[Tensor]) -> object:
    """A watch over tensors whose ``changed()`` says whether any was written in place (its version
    counter moved) or moved (its data pointer) since the last call."""
    return _ext().Watch(tensors)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """A Llama RMSNorm of x (..., hidden) in one pass: float32 statistics and normalisation (for a
    float64 x too, as Llama's norm casts), rounded to x's dtype, times weight (hidden,) of that dtype.
    No autograd."""
    return _ext().rms_norm(x, weight, eps)


def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``naive.rotate`` (Llama's RoPE) of x (B, H, T, D) with cos/sin (B, T, D) in one pass: a contiguous
    (B, H, T, D) tensor, computed in float (float64 for float64) and rounded once. No autograd."""
    return _ext().rope(x, cos.to(x.dtype), sin.to(x.dtype))


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up for a fused projection's output (..., 2 I) = [gate | up]: (..., I). No autograd."""
    return _ext().silu_mul(gate_up)


def has_int4_gemv() -> bool:
    """Whether the kernels are built with the AVX512-VNNI int4 GEMV (the CPU has the instructions)."""
    return available() and _ext().has_int4_gemv()


def int8_gemv(x: Tensor, packed: Tensor, scale: Tensor, residual: bool = False) -> Tensor:
    """x (M, in) times int8 weights packed by ``quant.pack_int8_vnni`` with bf16 scales per row: (M, out)
    in x's dtype (activations quantised to int8 per group of 32, as ``int4_gemv``)."""
    return _ext().int8_gemv(x, packed, scale, residual)


def int8_dequant(packed: Tensor, scale: Tensor) -> Tensor:
    """``int8_gemv``'s weights de-quantised: (out, in) bf16, code times scale rounded once."""
    return _ext().int8_dequant(packed, scale)


def int4_gemv(x: Tensor, packed: Tensor, scale: Tensor, offset: Tensor, residual: bool = False) -> Tensor:
    """x (M, in) times int4 weights packed by ``quant.pack_int4_vnni``: (M, out) in x's dtype. The
    activations are quantised to int8 per group of 32; ``residual``: and what that misses, in a second
    int8 pass (twice the integer products, ~1/254 of the rounding error)."""
    return _ext().int4_gemv(x, packed, scale, offset, residual)


Int4Args = tuple[Tensor, Tensor, Tensor]  # an int4 linear's (packed, scale, offset), as ``int4_gemv`` reads them


def norm_int4(x: Tensor, norm_w: Tensor, eps: float, w: Int4Args, residual: bool = False) -> tuple[Tensor, Tensor]:
    """h = ``rms_norm``(x) and h W^T (x (B, T, hidden); W int4): what ``rms_norm`` then ``int4_gemv`` return."""
    return _ext().norm_int4(x, norm_w, eps, *w, residual)


def int4_residual(x: Tensor, o: Tensor, w: Int4Args, extra: Tensor | None = None, residual: bool = False) -> Tensor:
    """x + (o W^T + extra), rounded as those three ops round (``extra``: e.g. an o adapter's output)."""
    return _ext().int4_residual(x, o, *w, residual, extra)


def int4_mlp(
    x: Tensor, norm_w: Tensor, eps: float, gate_up: Int4Args, down: Int4Args, residual: bool = False
) -> Tensor:
    """x + down(silu(gate) · up) of rms_norm(x), gate and up one fused int4 linear; rounded as the
    separate calls (``rms_norm``, ``int4_gemv``, ``silu_mul``, ``int4_gemv``, add) round."""
    return _ext().int4_mlp(x, norm_w, eps, *gate_up, *down, residual)


def check_gates(g_far: Tensor | None, g_close: Tensor | None, gate_logits: GateLogits | None) -> None:
    """The gates come either as both log-decays or as ``gate_logits``, never both or a mix."""
    if (g_far is not None, g_close is not None) != ((False, False) if gate_logits is not None else (True, True)):
        raise ValueError("give either both log-decays (g_far, g_close) or gate_logits")


def scan_dsla(
    q: Tensor, k: Tensor, v: Tensor, g_far: Tensor | None, g_close: Tensor | None, alpha: Tensor, *,
    scale: float | None = None, normalize: bool = True, eps: float = 1e-6, initial_state: StatePair | None = None,
    gain: Tensor | None = None, window: int = 0, q_rot: Tensor | None = None, k_rot: Tensor | None = None,
    beta: Tensor | None = None, window_scale: float | None = None, window_values: Tensor | None = None,
    rotary: tuple[Tensor, Tensor, Tensor, Tensor] | None = None, out_gate: tuple[Tensor, Tensor] | None = None,
    gate_logits: GateLogits | None = None, rope_states: bool = False,
) -> tuple[Tensor, StatePair]:  # fmt: skip
    """``chunk_dsla``'s contract by the C++ recurrent scan (no autograd). o is returned as a
    (B, Hq, T, V) view of a (B, T, Hq, V) tensor: the layer's ``transpose(1, 2).reshape`` is free.

    More inputs the layer would otherwise apply with ~25 tensor ops around the call:
    ``rotary`` = (q, k, cos, sin), the window's un-rotated q (B, Hq, T, D) and k (B, Hkv, L, D) and
    the rotary tables (B, L, D) of the L key positions, in place of q_rot/k_rot; ``rope_states``: q
    and k are un-rotated too, and the kernel rotates them with ``rotary``'s tables; ``gate_logits``
    in place of g_far/g_close: the gates' pre-activations, from which the kernel makes the decays;
    ``out_gate`` = (pre-activation (B, Hq, T, V), bias (Hq, V)): o is multiplied by 2 sigmoid(pre + bias)."""
    B, Hq, T, K = q.shape
    Hkv, L, V = k.shape[1], k.shape[2], v.shape[-1]
    if not 0 <= L - T <= window:
        raise ValueError(f"keys hold {L} tokens for {T} queries: the prefix must be 0..{window} window tokens")
    if rope_states and rotary is None:
        raise ValueError("rope_states needs the rotary tables (rotary=(q, k, cos, sin))")
    check_gates(g_far, g_close, gate_logits)
    f = compute_dtype(q.dtype)
    dtype = q.dtype if q.dtype in (torch.float32, torch.bfloat16, torch.float64) else f
    cast = lambda t: t if t.dtype == dtype else t.to(dtype)  # noqa: E731
    state = q.new_zeros(2, B, Hkv, K, V, dtype=f) if initial_state is None else torch.stack(initial_state).to(f)
    weights = mixing_weights(alpha, Hq, beta if window else None).to(f).contiguous()
    none = q.new_empty(0, dtype=dtype)
    cos = sin = none
    if rotary is not None:
        q_rot, k_rot, cos, sin = (cast(t) for t in rotary)
    og, og_b = (cast(out_gate[0]), out_gate[1].to(f).contiguous()) if out_gate is not None else (none, none.to(f))
    logits, normalizer, gate_min = (none, 1.0, 0.0) if gate_logits is None else gate_logits
    o, state = _ext().dsla_scan(
        cast(q), cast(k), cast(v), none.to(f) if g_far is None else g_far.to(f),
        none.to(f) if g_close is None else g_close.to(f), cast(logits), normalizer, gate_min, state.contiguous(),
        weights, gain.to(f).contiguous() if gain is not None else none.to(f),
        cast(q if q_rot is None else q_rot) if window else none, cast(k if k_rot is None else k_rot) if window else none,
        cast(v if window_values is None else window_values) if window else none, cos, sin, rope_states, og, og_b,
        window, K**-0.5 if scale is None else scale, K**-0.5 if window_scale is None else window_scale, normalize, eps,
    )  # fmt: skip
    return o.transpose(1, 2).to(q.dtype), (state[0], state[1])


def prefill_dsla(
    q: Tensor, k: Tensor, v: Tensor, g_far: Tensor | None, g_close: Tensor | None, alpha: Tensor, **kwargs
) -> tuple[Tensor, StatePair]:
    """``scan_dsla`` where it runs (CPU inference, K == V), else ``chunk_dsla`` (training, CUDA, no compiler),
    with ``scan_dsla``'s ``rotary``, ``rope_states``, ``gate_logits`` and ``out_gate`` applied around it.

    q with zero heads asks for the final states alone (folding a KV cache): the scan then only
    updates them; the chunked form, which needs queries, reads with zero ones and drops the read-out."""
    check_gates(g_far, g_close, kwargs.get("gate_logits"))
    tensors = [q, k, v, alpha, *(t for t in (g_far, g_close) if t is not None)]
    tensors += [t for t in kwargs.values() if isinstance(t, Tensor)]
    for name in ("initial_state", "rotary", "out_gate", "gate_logits"):
        tensors += [t for t in kwargs.get(name) or () if isinstance(t, Tensor)]
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if q.device.type == "cpu" and q.shape[-1] == k.shape[-1] == v.shape[-1] and not grad and available():
        kwargs.pop("chunk_size", None)
        return scan_dsla(q, k, v, g_far, g_close, alpha, **kwargs)
    rotary, out_gate = kwargs.pop("rotary", None), kwargs.pop("out_gate", None)
    gate_logits, rope_states = kwargs.pop("gate_logits", None), kwargs.pop("rope_states", False)
    if gate_logits is not None:
        g_far, g_close = log_decays(*gate_logits)
    if rotary is not None and (kwargs.get("window") or rope_states):
        q_win, k_win, cos, sin = rotary
        q_cos, q_sin = cos[:, -q.shape[2] :], sin[:, -q.shape[2] :]
        if kwargs.get("window"):
            kwargs["q_rot"], kwargs["k_rot"] = rotate(q_win, q_cos, q_sin), rotate(k_win, cos, sin)
        if rope_states:
            q, k = rotate(q, q_cos, q_sin), rotate(k, cos, sin)
    elif rope_states:
        raise ValueError("rope_states needs the rotary tables (rotary=(q, k, cos, sin))")
    if q.shape[1] == 0:
        B, _, T, K = q.shape
        o, state = chunk_dsla(q.new_zeros(B, k.shape[1], T, K), k, v, g_far, g_close, alpha, **kwargs)
        return o[:, :0], state
    o, state = chunk_dsla(q, k, v, g_far, g_close, alpha, **kwargs)
    if out_gate is not None:
        o = o * (2 * torch.sigmoid(out_gate[0] + out_gate[1][:, None, :]))
    return o, state
