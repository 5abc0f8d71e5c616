"""Per-token reference of dual-state gated linear attention: the spec the fast kernels are tested against.

Each of the two states (far = history, close = recency) follows

    S_t = diag(exp(g_t)) · S_{t-1} + k_t v_tᵀ          S: (K, V)
    o_t = scale · q_tᵀ S_t                              o: (V,)

and the layer output mixes the two read-outs with w = softmax(alpha) over the state axis.
With ``normalize=True`` each read-out is RMS-normalised over V before mixing (see
``dsla_serve/layers/dsla_attention.py`` for why). Grouped-query attention: k, v and the gates
have ``Hkv`` heads, q has ``Hq = G·Hkv`` heads and query head ``h`` reads the state of KV head
``h // G`` (the same grouping as Hugging Face's ``repeat_kv``).
"""

from __future__ import annotations

import torch
from torch import Tensor

StatePair = tuple[Tensor, Tensor]


def rms_normalize(o: Tensor, eps: float) -> Tensor:
    """RMS-normalise over the last (value) axis."""
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)


def mixing_weights(alpha: Tensor, num_q_heads: int) -> Tensor:
    """softmax(alpha) over the state axis, broadcast to one (w_far, w_close) row per query head: (Hq, 2)."""
    w = torch.softmax(alpha.float(), dim=-1)
    return w.expand(num_q_heads, 2) if w.dim() == 1 else w


def naive_dsla(
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
    """Loop-over-time dual-state GLA, computed in the inputs' dtype (pass float64 for a reference).

    Args:
        q: (B, Hq, T, K) queries.
        k: (B, Hkv, T, K) keys; Hq must be a multiple of Hkv.
        v: (B, Hkv, T, V) values.
        g_far, g_close: (B, Hkv, T, K) log-decays (<= 0) of the two states.
        alpha: (2,) or (Hq, 2) mixing logits; w = softmax(alpha, -1).
        scale: read-out scale, default K ** -0.5.
        normalize: RMS-normalise each state's read-out over V before mixing.
        initial_state: (S_far, S_close), each (B, Hkv, K, V), or None for zeros.

    Returns:
        o: (B, Hq, T, V) and the final (S_far, S_close).
    """
    B, Hq, T, K = q.shape
    Hkv, V = k.shape[1], v.shape[-1]
    G = Hq // Hkv
    scale = K**-0.5 if scale is None else scale
    w = mixing_weights(alpha, Hq).to(q.dtype)  # (Hq, 2)
    if initial_state is None:
        states = [q.new_zeros(B, Hkv, K, V), q.new_zeros(B, Hkv, K, V)]
    else:
        states = [s.to(q.dtype).clone() for s in initial_state]
    outputs = []
    for t in range(T):
        q_t = q[:, :, t].reshape(B, Hkv, G, K)
        kv_t = k[:, :, t, :, None] * v[:, :, t, None, :]  # (B, Hkv, K, V)
        o_t = q.new_zeros(B, Hq, V)
        for s, g in enumerate((g_far, g_close)):
            states[s] = torch.exp(g[:, :, t, :, None]) * states[s] + kv_t
            read = scale * torch.einsum("bhgk,bhkv->bhgv", q_t, states[s]).reshape(B, Hq, V)
            if normalize:
                read = rms_normalize(read, eps)
            o_t = o_t + w[:, s, None] * read
        outputs.append(o_t)
    return torch.stack(outputs, dim=2), (states[0], states[1])
