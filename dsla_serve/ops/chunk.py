"""Chunked parallel form of dual-state gated linear attention (prefill and training).

Both states share q, k and v and differ only in their gates, so they are stacked on a leading
axis of size 2 and computed in one pass. Within a chunk of C tokens the output is a small masked
"attention" matrix; across chunks a state of shape (K, V) is carried by a short loop. The exact
local window (``window > 0``) is a banded softmax attention computed block by block: each block of
C queries attends its C + W - 1 nearest keys, so its cost is linear in T too.

Numerical stability. With Λ the inclusive cumulative log-decay inside a chunk, the decay between
key j and query i is exp(Λ_i - Λ_j) <= 1 per key channel. The intra-chunk matrix factorises it as
exp(Λ_i - Λ_m) · exp(Λ_m - Λ_j) around the chunk's middle row m, so every kept exponent is bounded
by (C / 2) · |g_min| and the masked-out upper triangle by C · |g_min|. ``gate_floor(C)`` keeps the
latter at ``MAX_EXPONENT`` = 64, far from float32's overflow at 88: with the default C = 64 that is
g >= -1 = GATE_MIN, the layer's clamp. Gates below the floor are refused (``ValueError``). All
inter-chunk exponents are <= 0. Inputs in half precision are computed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dsla_serve.ops.naive import StatePair, combine

GATE_MIN = -1.0
"""Lowest log-decay per token the layer produces (exp(-1) ≈ 0.37 per token); ``gate_floor`` of the default chunk."""

DEFAULT_CHUNK = 64
MAX_EXPONENT = 64.0


def gate_floor(chunk_size: int) -> float:
    """Lowest gate the chunked form computes finitely with chunks of ``chunk_size`` tokens."""
    return -MAX_EXPONENT / chunk_size


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


def chunk_states(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, state: Tensor, scale: float, C: int
) -> tuple[Tensor, Tensor]:
    """Un-normalised read-outs of both states and the final states.

    q: (B, Hq, T, K); k: (B, Hkv, T, K); v: (B, Hkv, T, V); g: (2, B, Hkv, T, K); state: (2, B, Hkv, K, V),
    all in the compute dtype. Returns reads (2, B, Hq, T, V) and the final state (2, B, Hkv, K, V).
    """
    B, Hq, T, K = q.shape
    Hkv, V = k.shape[1], v.shape[-1]
    G, N = Hq // Hkv, -(-T // C)
    pad = N * C - T
    q = q * scale
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
    before_chunk = carry_state(state, decay, update)  # (N + 1, 2, B, Hkv, K, V)
    # clone: a view would keep the whole (N + 1)-state buffer alive as long as the final state is held
    final = before_chunk[-1].clone()
    before_chunk = before_chunk[:-1].movedim(0, 3)  # (2, B, Hkv, N, K, V): state entering each chunk
    # q_i · exp(Λ_i) · S  ==  q_in_i · (exp(Λ_m) ⊙ S): exponents stay bounded
    o = o + q_in @ (torch.exp(lam_mid).transpose(-1, -2) * before_chunk)
    o = o.view(2, B, Hkv, N, G, C, V).permute(0, 1, 2, 4, 3, 5, 6).reshape(2, B, Hq, N * C, V)[..., :T, :]
    return o, final


def window_attention(q_rot: Tensor, k_rot: Tensor, v: Tensor, window: int, scale: float, block: int) -> Tensor:
    """Softmax attention of each of the T queries over its last ``window`` keys (its own included).

    q_rot: (B, Hq, T, K) for the last T of the L keys; k_rot: (B, Hkv, L, K); v: (B, Hkv, L, V).
    Returns (B, Hq, T, V). Blocks of ``block`` queries attend ``block + window - 1`` keys each.
    """
    B, Hq, T, K = q_rot.shape
    Hkv, L, V = k_rot.shape[1], k_rot.shape[2], v.shape[-1]
    G, P, W = Hq // Hkv, L - T, window
    N = -(-T // block)
    span = block + W - 1
    # key padded index = index + W - 1; block n's keys start at padded index P + n·block
    k_pad = F.pad(k_rot, (0, 0, W - 1, N * block - T))[:, :, P:]
    v_pad = F.pad(v, (0, 0, W - 1, N * block - T))[:, :, P:]
    k_blocks = k_pad.unfold(2, span, block)  # (B, Hkv, N, K, span)
    v_blocks = v_pad.unfold(2, span, block).transpose(-1, -2)  # (B, Hkv, N, span, V)
    q_blocks = F.pad(q_rot, (0, 0, 0, N * block - T)).view(B, Hkv, G, N, block, K).transpose(2, 3)
    scores = (q_blocks * scale) @ k_blocks.unsqueeze(3)  # (B, Hkv, N, G, block, span)
    i = torch.arange(block, device=q_rot.device)[:, None]
    j = torch.arange(span, device=q_rot.device)[None, :]
    band = (j >= i) & (j <= i + W - 1)  # (block, span)
    first_key = P + torch.arange(N, device=q_rot.device)[:, None] * block + j - (W - 1)  # (N, span)
    allowed = band[None] & (first_key >= 0)[:, None, :]  # (N, block, span)
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    o = torch.softmax(scores, dim=-1) @ v_blocks.unsqueeze(3)  # (B, Hkv, N, G, block, V)
    return o.transpose(2, 3).reshape(B, Hq, N * block, V)[:, :, :T]


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
    gain: Tensor | None = None,
    window: int = 0,
    q_rot: Tensor | None = None,
    k_rot: Tensor | None = None,
    beta: Tensor | None = None,
    window_scale: float | None = None,
    window_values: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, StatePair]:
    """Same contract as ``naive_dsla``; any T (padded to a multiple of ``chunk_size`` internally).

    Returns o: (B, Hq, T, V) in q's dtype and the final (S_far, S_close), each (B, Hkv, K, V) in
    float32 (float64 for float64 inputs): states stay in full precision across decode steps.
    Differentiable with autograd. Gates must be >= ``gate_floor(chunk_size)``.
    """
    B, Hq, T, K = q.shape
    Hkv, L, V = k.shape[1], k.shape[2], v.shape[-1]
    P, W, C = L - T, window, chunk_size
    if P < 0 or P > W:
        raise ValueError(f"keys hold {L} tokens for {T} queries: the prefix must be 0..{W} window tokens")
    floor = gate_floor(C)
    if bool((torch.minimum(g_far.min(), g_close.min()) < floor).item()) if L else False:
        raise ValueError(f"gates below {floor} (= -{MAX_EXPONENT:g}/chunk_size) would overflow the chunked form")
    f = compute_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale
    state = q.new_zeros(2, B, Hkv, K, V, dtype=f) if initial_state is None else torch.stack(initial_state).to(f)
    n_in = L - W  # tokens entering the states now; new token i reads the state after token P + i - W
    if n_in > 0:
        g = torch.stack((g_far[:, :, :n_in], g_close[:, :, :n_in])).to(f)  # (2, B, Hkv, n_in, K)
        reads, state = chunk_states(
            q[:, :, W - P :].to(f), k[:, :, :n_in].to(f), v[:, :, :n_in].to(f), g, state, scale, C
        )
        reads = F.pad(reads, (0, 0, T - n_in, 0))  # (2, B, Hq, T, V): the first T - n_in read no state
    else:
        reads = q.new_zeros(2, B, Hq, T, V, dtype=f)
    if not W:
        o = combine(reads, alpha, normalize=normalize, eps=eps, gain=gain)
        return o.to(q.dtype), (state[0], state[1])
    q_rot = q if q_rot is None else q_rot
    k_rot = k if k_rot is None else k_rot
    window_scale = K**-0.5 if window_scale is None else window_scale
    v_win = v if window_values is None else window_values
    win = window_attention(q_rot.to(f), k_rot.to(f), v_win.to(f), W, window_scale, max(C, 16))
    has_state = (torch.arange(T, device=q.device) >= T - max(n_in, 0))[None]  # (1, T)
    o = combine(reads, alpha, normalize=normalize, eps=eps, gain=gain, window_read=win, beta=beta, has_state=has_state)
    return o.to(q.dtype), (state[0], state[1])
