"""Single-token dual-state step for decode: O(1) in the context length (two (K, V) states per KV head)."""

from __future__ import annotations

import torch
from torch import Tensor

from dsla_serve.ops.chunk import compute_dtype, mix_readouts
from dsla_serve.ops.naive import StatePair


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
) -> tuple[Tensor, StatePair]:
    """Same contract as ``naive_dsla`` with T == 1: q (B, Hq, 1, K), k/g (B, Hkv, 1, K), v (B, Hkv, 1, V).

    States are returned in float32 (float64 for float64 inputs), like ``chunk_dsla``.
    """
    B, Hq, T, K = q.shape
    if T != 1:
        raise ValueError(f"step_dsla takes one token, got T={T}; use chunk_dsla for longer inputs")
    Hkv, V = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    f = compute_dtype(q.dtype)
    scale = K**-0.5 if scale is None else scale
    state = q.new_zeros(2, B, Hkv, K, V, dtype=f) if initial_state is None else torch.stack(initial_state).to(f)
    decay = torch.exp(torch.stack((g_far, g_close)).to(f)).transpose(-1, -2)  # (2, B, Hkv, K, 1)
    state = decay * state + k.to(f).transpose(-1, -2) @ v.to(f)  # (2, B, Hkv, K, V)
    read = (q.to(f) * scale).view(B, Hkv, G, K) @ state  # (2, B, Hkv, G, V)
    o = mix_readouts(read.unsqueeze(-2), alpha, Hq, normalize, eps)  # (B, Hkv, G, 1, V)
    return o.reshape(B, Hq, 1, V).to(q.dtype), (state[0], state[1])
