"""Chunked parallel form of dual-state gated linear attention (prefill and training).

Both states share q, k and v and differ only in their gates, so they are stacked on a leading
axis of size 2 and computed in one pass. Within a chunk of C tokens the output is a small masked
"attention" matrix; across chunks a state of shape (K, V) is carried by a short loop.

Numerical stability. With Λ the inclusive cumulative log-decay inside a chunk, the decay between
key j and query i is exp(Λ_i - Λ_j) <= 1 per key channel. The intra-chunk matrix factorises it as
exp(Λ_i - Λ_m) · exp(Λ_m - Λ_j) around the chunk's middle row m, so every exponent is bounded by
(C / 2) · |g_min|: with C = 16 and the layer's clamp g >= GATE_MIN = -5 that is 40, far from
float32's overflow at 88 (the masked-out upper triangle reaches 80, still finite). All inter-chunk
exponents are <= 0. Inputs in half precision are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsla_serve.ops.naive import StatePair, mixing_weights, rms_normalize

GATE_MIN = -1.0
"""Lowest log-decay per token the layer produces (exp(-5) ≈ 0.007: a full reset); the stability bound."""

DEFAULT_CHUNK = 64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def mix_readouts(o: Tensor, alpha: Tensor, num_q_heads: int, normalize: bool, eps: float) -> Tensor:
    """Normalise and mix per-state read-outs.

    o: (2, B, Hkv, ..., G, X, V) with query head h = kv_head * G + g; returns (B, Hkv, ..., G, X, V).
    """
    if normalize:
        o = rms_normalize(o, eps)
    Hkv = o.shape[2]
    w = mixing_weights(alpha, num_q_heads).to(o.dtype).view(Hkv, -1, 2)  # (Hkv, G, 2)
    extra = o.dim() - 6  # axes between Hkv and G
    w = w.permute(2, 0, 1).reshape(2, 1, Hkv, *([1] * extra), w.shape[1], 1, 1)
    return (w * o).sum(0)


def carry_state(state: Tensor, decay: Tensor, update: Tensor) -> Tensor:
    """States entering each chunk plus the final one: (N + 1, ...). decay (N, ..., K, 1), update (N, ..., K, V).

    Without autograd the states are written into one preallocated buffer (one fused op per chunk).
    """
    N = update.shape[0]
    if torch.is_grad_enabled() and any(t.requires_grad for t in (state, decay, update)):
        states = [state]
        for n in range(N):
            states.append(torch.addcmul(update[n], decay[n], states[-1]))
        return torch.stack(states)
    out = update.new_empty(N + 1, *state.shape)
    out[0] = state
    for n in range(N):
        torch.addcmul(update[n], decay[n], out[n], out=out[n + 1])
    return out


def chunk_dsla(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_far: Tensor,
    g_close: Tensor,
    alpha: Tensor,
    *,
    scale: float | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: StatePair | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, StatePair]:
    """Same contract as ``naive_dsla``; any T (padded to a multiple of ``chunk_size`` internally).

    Returns o: (B, Hq, T, V) in q's dtype and the final (S_far, S_close), each (B, Hkv, K, V) in
    float32 (float64 for float64 inputs): states stay in full precision across decode steps.
    Differentiable with autograd.
    """
    B, Hq, T, K = q.shape
    Hkv, V = k.shape[1], v.shape[-1]
    G, C = Hq // Hkv, chunk_size
    out_dtype = q.dtype
    N = -(-T // C)
    pad = N * C - T
    f = compute_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale

    g = torch.stack((g_far, g_close)).to(f)  # (2, B, Hkv, T, K)
    q, k, v = q.to(f) * scale, k.to(f), v.to(f)
    if pad:  # zero keys with zero log-decay leave the state untouched
        q, k, v, g = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, g))
    k = k.view(B, Hkv, N, C, K)
    v = v.view(B, Hkv, N, C, V)
    lam = g.view(2, B, Hkv, N, C, K).cumsum(-2)  # Λ, inclusive, per chunk
    mid = max(C // 2 - 1, 0)
    lam_mid = lam[..., mid : mid + 1, :]  # (2, B, Hkv, N, 1, K)
    lam_last = lam[..., -1:, :]
    rel = torch.exp(lam - lam_mid)  # exp(Λ_i - Λ_m), bounded both ways

    # query rows of a chunk are ordered (group, position): (2, B, Hkv, N, G*C, K)
    q = q.view(B, Hkv, G, N, C, K).transpose(2, 3)
    q_in = (q * rel.unsqueeze(4)).reshape(2, B, Hkv, N, G * C, K)
    k_in = k / rel  # exp(Λ_m - Λ_j) · k_j
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril().repeat(G, 1)
    scores = (q_in @ k_in.transpose(-1, -2)).masked_fill_(~causal, 0.0)  # (2, B, Hkv, N, G*C, C)
    o = scores @ v  # intra-chunk part, (2, B, Hkv, N, G*C, V)

    # inter-chunk: each chunk's contribution to the state, then a loop carrying the state
    kv = k_in.transpose(-1, -2) @ v  # (2, B, Hkv, N, K, V)
    update = (torch.exp(lam_last - lam_mid).transpose(-1, -2) * kv).movedim(3, 0)  # (N, 2, B, Hkv, K, V)
    decay = torch.exp(lam_last).movedim(3, 0).transpose(-1, -2).contiguous()  # (N, 2, B, Hkv, K, 1)
    state = q.new_zeros(2, B, Hkv, K, V) if initial_state is None else torch.stack(initial_state).to(f)
    before_chunk = carry_state(state, decay, update)  # (N + 1, 2, B, Hkv, K, V)
    state = before_chunk[-1]
    before_chunk = before_chunk[:-1].movedim(0, 3)  # (2, B, Hkv, N, K, V): state entering each chunk
    # q_i · exp(Λ_i) · S  ==  q_in_i · (exp(Λ_m) ⊙ S): exponents stay bounded
    o = o + q_in @ (torch.exp(lam_mid).transpose(-1, -2) * before_chunk)

    o = mix_readouts(o.view(2, B, Hkv, N, G, C, V), alpha, Hq, normalize, eps)  # (B, Hkv, N, G, C, V)
    o = o.permute(0, 1, 3, 2, 4, 5).reshape(B, Hq, N * C, V)[:, :, :T]
    return o.to(out_dtype), (state[0], state[1])
