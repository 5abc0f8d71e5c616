"""Per-token reference of dual-state gated linear attention: the spec the fast kernels are tested against.

Each of the two states (far = history, close = recency) follows

    S_t = diag(exp(g_t)) · S_{t-1} + k_t v_tᵀ          S: (K, V)
    r_t = scale · q_tᵀ S_t                              r: (V,)

and the layer output mixes the two read-outs with w = softmax(alpha) over the state axis. With
``normalize=True`` each read-out is RMS-normalised over V (and multiplied by ``gain``) before mixing
(see ``dsla_serve/layers/dsla_attention.py`` for why). Grouped-query attention: k, v and the gates
have ``Hkv`` heads, q has ``Hq = G·Hkv`` heads and query head ``h`` reads the state of KV head
``h // G`` (the same grouping as Hugging Face's ``repeat_kv``).

Exact local window (``window = W > 0``): the last W tokens (the query's own included) are attended
exactly with softmax over rotated queries/keys (``q_rot``/``k_rot``), and a token enters the two
states only when it leaves the window, so the query at position t reads S_{t-W}. The three
read-outs mix with softmax((alpha_far, alpha_close, beta)); while no token has left the window
(t < W) the output is the window's softmax attention alone, i.e. exactly the replaced attention.

A call may continue a sequence: k/v/gates/k_rot then hold L = P + T tokens, the first P being the
tokens still in the window (P = min(W, tokens so far)), q/q_rot the T new ones, and
``initial_state`` the states over every older token. The returned states cover all but the last W
of the L tokens; the caller keeps those W as the next window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

StatePair = tuple[Tensor, Tensor]
GateLogits = tuple[Tensor, float, float]
"""The gates' pre-activations (B, L, 1 | 2, Hkv, D) (far[, close]), the normaliser and the lowest log-decay."""


def rms_normalize(o: Tensor, eps: float) -> Tensor:
    """RMS-normalise over the last (value) axis."""
    return o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding as Llama applies it: x (B, H, T, D), cos/sin (B, T, D). Use -sin to undo it."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def log_decays(logits: Tensor, normalizer: float, gate_min: float) -> StatePair:
    """Per-token log-decays (g_far, g_close), each (B, Hkv, L, D) in float32 (float64 for float64), from
    the gates' pre-activations (B, L, nG, Hkv, D): max(logsigmoid(x) / normalizer, gate_min). One gate
    (nG = 1, the single-state variant) serves as both."""
    f = torch.float64 if logits.dtype == torch.float64 else torch.float32
    g = (F.logsigmoid(logits.to(f)) / normalizer).clamp(min=gate_min).permute(2, 0, 3, 1, 4)
    return g[0], g[-1]


def mixing_weights(alpha: Tensor, num_q_heads: int, beta: Tensor | None = None) -> Tensor:
    """Read-out weights per query head: (Hq, 2) = softmax(alpha), or (Hq, 3) with the window logit ``beta`` (Hq,)."""
    logits = alpha.float().expand(num_q_heads, 2) if alpha.dim() == 1 else alpha.float()
    if beta is not None:
        logits = torch.cat((logits, beta.float().expand(num_q_heads)[:, None]), -1)
    return torch.softmax(logits, dim=-1)


def combine(
    reads: Tensor,
    alpha: Tensor,
    *,
    normalize: bool,
    eps: float,
    gain: Tensor | None = None,
    window_read: Tensor | None = None,
    beta: Tensor | None = None,
    has_state: Tensor | None = None,
    weights: Tensor | None = None,
) -> Tensor:
    """Mix state read-outs (2, B, Hq, T, V) and the window's (B, Hq, T, V) into (B, Hq, T, V).

    ``has_state`` (B or 1, T) bool: positions whose states hold at least one token; elsewhere the
    output is the window read-out alone. ``gain`` (Hq, V) scales the normalised state read-outs only:
    the window read-out is already at the attention's scale. ``weights``: ``mixing_weights`` precomputed.
    """
    Hq = reads.shape[2]
    if normalize:
        reads = rms_normalize(reads, eps)
    if gain is not None:
        reads = reads * gain.to(reads.dtype)[:, None, :]
    if weights is None:  # (Hq, 2|3); callers that step many times pass them precomputed
        weights = mixing_weights(alpha, Hq, beta if window_read is not None else None)
    w = weights if weights.dtype == reads.dtype else weights.to(reads.dtype)
    out = w[:, 0, None, None] * reads[0] + w[:, 1, None, None] * reads[1]
    if window_read is None:
        return out
    out = out + w[:, 2, None, None] * window_read.to(reads.dtype)
    if has_state is None:
        return out
    return torch.where(has_state[:, None, :, None], out, window_read.to(reads.dtype))


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
    gain: Tensor | None = None,
    window: int = 0,
    q_rot: Tensor | None = None,
    k_rot: Tensor | None = None,
    beta: Tensor | None = None,
    window_scale: float | None = None,
    window_values: Tensor | None = None,
) -> tuple[Tensor, StatePair]:
    """Loop-over-time dual-state GLA, computed in the inputs' dtype (pass float64 for a reference).

    Args:
        q: (B, Hq, T, K) queries of the T new tokens.
        k: (B, Hkv, L, K) keys; L = T without a window, P + T with one (see the module docstring).
        v: (B, Hkv, L, V) values.
        g_far, g_close: (B, Hkv, L, K) log-decays (<= 0) of the two states.
        alpha: (2,) or (Hq, 2) mixing logits of the two states.
        scale: state read-out scale, default K ** -0.5.
        normalize: RMS-normalise each state's read-out over V before mixing.
        initial_state: (S_far, S_close), each (B, Hkv, K, V), or None for zeros.
        gain: (Hq, V) multiplies the (normalised) state read-outs.
        window: W, tokens attended exactly; 0 = the paper's DSLA.
        q_rot: (B, Hq, T, K), k_rot: (B, Hkv, L, K) rotated queries/keys of the window (default q, k).
        beta: (Hq,) or () window mixing logit (needed when window > 0).
        window_scale: softmax scale of the window, default K ** -0.5.
        window_values: (B, Hkv, L, V) values the window reads (default v, which the states read).

    Returns:
        o: (B, Hq, T, V) and the final (S_far, S_close) over all but the last ``window`` of the L tokens.
    """
    B, Hq, T, K = q.shape
    Hkv, L, V = k.shape[1], k.shape[2], v.shape[-1]
    G, P, W = Hq // Hkv, k.shape[2] - T, window
    if P < 0 or P > W:
        raise ValueError(f"keys hold {L} tokens for {T} queries: the prefix must be 0..{W} window tokens")
    scale = K**-0.5 if scale is None else scale
    window_scale = K**-0.5 if window_scale is None else window_scale
    q_rot = q if q_rot is None else q_rot
    k_rot = k if k_rot is None else k_rot
    v_win = v if window_values is None else window_values
    if initial_state is None:
        states = [q.new_zeros(B, Hkv, K, V), q.new_zeros(B, Hkv, K, V)]
    else:
        states = [s.to(q.dtype).clone() for s in initial_state]
    reads, win_reads, has_state = [], [], []
    for c in range(P, L):  # c: index of the new token among the L
        j = c - W  # the token entering the states now (W = 0: the new token itself)
        if j >= 0:
            kv_j = k[:, :, j, :, None] * v[:, :, j, None, :]  # (B, Hkv, K, V)
            for s, g in enumerate((g_far, g_close)):
                states[s] = torch.exp(g[:, :, j, :, None]) * states[s] + kv_j
        q_t = q[:, :, c - P].reshape(B, Hkv, G, K)
        reads.append(torch.stack([scale * torch.einsum("bhgk,bhkv->bhgv", q_t, S).reshape(B, Hq, V) for S in states]))
        has_state.append(j >= 0)
        if W:
            lo = max(0, c - W + 1)
            qr = q_rot[:, :, c - P].reshape(B, Hkv, G, K)
            scores = window_scale * torch.einsum("bhgk,bhjk->bhgj", qr, k_rot[:, :, lo : c + 1])
            p = torch.softmax(scores, dim=-1)
            win_reads.append(torch.einsum("bhgj,bhjv->bhgv", p, v_win[:, :, lo : c + 1]).reshape(B, Hq, V))
    reads_t = torch.stack(reads, dim=3)  # (2, B, Hq, T, V)
    if not W:
        o = combine(reads_t, alpha, normalize=normalize, eps=eps, gain=gain)
        return o, (states[0], states[1])
    flags = torch.tensor(has_state, device=q.device)[None]  # (1, T)
    o = combine(reads_t, alpha, normalize=normalize, eps=eps, gain=gain,
                window_read=torch.stack(win_reads, dim=2), beta=beta, has_state=flags)  # fmt: skip
    return o, (states[0], states[1])
