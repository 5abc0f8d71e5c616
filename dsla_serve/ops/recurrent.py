"""Single-token dual-state step for decode: O(1) in the context length (two (K, V) states per KV head).

With a window the step takes the window's rotated keys and values as a ring buffer (any order:
softmax does not care) and the token leaving it, which enters the states now.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsla_serve.ops.chunk import compute_dtype
from dsla_serve.ops.naive import StatePair, combine


def step_dsla(
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
    enters: Tensor | None = None,
    q_rot: Tensor | None = None,
    window_keys: Tensor | None = None,
    window_values: Tensor | None = None,
    window_valid: Tensor | None = None,
    beta: Tensor | None = None,
    window_scale: float | None = None,
    state_buffer: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, StatePair]:
    """One decode step for a batch of sequences.

    q: (B, Hq, 1, K); k/g_far/g_close: (B, Hkv, 1, K) and v: (B, Hkv, 1, V) are the token entering the
    states: the new token itself without a window, the one leaving the window with one.
    enters: (B,) bool, which sequences have a token entering (default: all); the others keep their states
    and, with a window, read the window alone. Window: q_rot (B, Hq, 1, K), window_keys (B, Hkv, W, K)
    rotated and window_values (B, Hkv, W, V), the new token already written; window_valid (B, W) bool.
    ``state_buffer`` (B, 2, Hkv, K, V), float32/float64, replaces ``initial_state`` and is updated in
    place (the engine's pooled states: no copy per step). States are returned in float32 (float64 for
    float64 inputs), like ``chunk_dsla``. ``weights``: the mixing weights precomputed (see ``combine``).
    """
    B, Hq, T, K = q.shape
    if T != 1:
        raise ValueError(f"step_dsla takes one token, got T={T}; use chunk_dsla for longer inputs")
    Hkv, V = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    f = compute_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale
    decay = torch.exp(as_dtype(torch.stack((g_far, g_close), 1), f)).transpose(-1, -2)  # (B, 2, Hkv, K, 1)
    kv = (as_dtype(k, f).transpose(-1, -2) @ as_dtype(v, f)).unsqueeze(1)  # (B, 1, Hkv, K, V)
    if enters is not None:  # no token: decay 1, update 0 (where, not a product: the slot may hold anything)
        on = enters.view(B, 1, 1, 1, 1)
        decay = torch.where(on, decay, 1.0)
        kv = torch.where(on, kv, 0.0)
    if state_buffer is not None:
        state = state_buffer.mul_(decay).add_(kv)
    elif initial_state is None:
        state = kv.expand(B, 2, Hkv, K, V).clone()
    else:
        state = decay * torch.stack(initial_state, 1).to(f) + kv  # (B, 2, Hkv, K, V)
    read = (as_dtype(q, f) * scale).view(B, 1, Hkv, G, K) @ state  # (B, 2, Hkv, G, V)
    reads = read.transpose(0, 1).reshape(2, B, Hq, 1, V)
    final = (state[:, 0], state[:, 1])
    if window_keys is None:
        o = combine(reads, alpha, normalize=normalize, eps=eps, gain=gain, weights=weights)
        return as_dtype(o, q.dtype), final
    window_scale = K**-0.5 if window_scale is None else window_scale
    qr = as_dtype(q if q_rot is None else q_rot, f).view(B, Hkv, G, K) * window_scale
    scores = qr @ as_dtype(window_keys, f).transpose(-1, -2)  # (B, Hkv, G, W)
    if window_valid is not None:
        scores = scores.masked_fill(~window_valid[:, None, None, :], float("-inf"))
    win = (torch.softmax(scores, -1) @ as_dtype(window_values, f)).reshape(B, Hq, 1, V)
    has_state = torch.ones(B, 1, dtype=torch.bool, device=q.device) if enters is None else enters[:, None]
    o = combine(reads, alpha, normalize=normalize, eps=eps, gain=gain, window_read=win, beta=beta,
                has_state=has_state, weights=weights)  # fmt: skip
    return as_dtype(o, q.dtype), final


def as_dtype(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x in dtype, without a dispatch when it already is (the decode step is bound by per-op overhead)."""
    return x if x.dtype == dtype else x.to(dtype)
