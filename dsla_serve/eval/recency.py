"""How much weight each layer type puts on tokens at each distance: the paper's recency argument.

    dsla-serve eval recency --dsla DIR --gla DIR --layer 22 --plot recency.png --json

Attention: the softmax probabilities p_ij. Linear attention has no probabilities, but its output is
still a linear combination of past values, o_i = Σ_j c_ij v_j, with
c_ij = Σ_states w_s · scale · (q_i ⊙ exp(Λ_i - Λ_j)) · k_j / rms_i^s (the decayed score, divided by
the RMS normalisation of that state's read-out). The effective weight of token j is
|c_ij| / Σ_j' |c_ij'|. Profiles are averaged over heads and queries and binned by distance i - j.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from dsla_serve.layers import DSLAAttention, rotate
from dsla_serve.model.convert import decoder_layers, original_attention
from dsla_serve.model.hybrid import HybridModel

MIN_QUERY = 256  # queries with at least this much context, so long distances are comparable


def distance_bins(T: int) -> list[tuple[int, int]]:
    """[0,1), [1,2), [2,4), [4,8), ... up to T."""
    edges = [0, 1] + [2**i for i in range(1, math.ceil(math.log2(T)) + 1)]
    return [(a, min(b, T)) for a, b in itertools.pairwise(edges) if a < T]


def profile_from_weights(weights: Tensor, bins: list[tuple[int, int]]) -> list[float]:
    """weights (Hq, Tq, T) rows for queries MIN_QUERY.. (normalised, causal) -> mean mass per distance bin."""
    _, Tq, T = weights.shape
    query_pos = torch.arange(T - Tq, T)[:, None]
    dist = query_pos - torch.arange(T)[None, :]  # (Tq, T)
    return [(weights * ((dist >= a) & (dist < b))).sum(-1).mean().item() for a, b in bins]


@torch.no_grad()
def layer_input(hybrid: HybridModel, ids: Tensor, layer: int) -> Tensor:
    x, _ = hybrid(ids, dsla_layers=[], stop_at=layer)
    return decoder_layers(hybrid.base)[layer].input_layernorm(x)


@torch.no_grad()
def attention_weights(hybrid: HybridModel, h: Tensor, layer: int) -> Tensor:
    """(Hq, Tq, T) softmax attention of the original layer for the last queries of h (1, T, hidden)."""
    attn = original_attention(hybrid.base, layer)
    T = h.shape[1]
    cos, sin = hybrid.rotary_emb(h, torch.arange(T)[None])
    q = rotate(attn.q_proj(h).view(1, T, -1, hybrid.head_dim).transpose(1, 2), cos, sin)[0]
    k = rotate(attn.k_proj(h).view(1, T, -1, hybrid.head_dim).transpose(1, 2), cos, sin)[0]
    k = k.repeat_interleave(hybrid.num_heads // hybrid.num_kv_heads, 0)
    scores = (q[:, MIN_QUERY:] @ k.transpose(-1, -2)) * hybrid.head_dim**-0.5
    mask = torch.arange(T)[None, :] > torch.arange(MIN_QUERY, T)[:, None]
    return torch.softmax(scores.masked_fill(mask, -math.inf), -1)


@torch.no_grad()
def linear_weights(hybrid: HybridModel, dsla: DSLAAttention, h: Tensor, block: int = 64) -> Tensor:
    """(Hq, Tq, T) effective weights |c_ij| (normalised per query) of a DSLA/GLA layer on h (1, T, hidden).

    With a window of W tokens the states hold only tokens j <= i - W (read as S_{i-W}), and the last W
    tokens get the window's softmax weights; the two parts mix by the layer's weights, the states' scaled
    by the mean output gain of the head (their read-outs are RMS-normalised, the window's is not).
    """
    T, D, G, W = h.shape[1], hybrid.head_dim, hybrid.num_heads // hybrid.num_kv_heads, dsla.config.window
    q, k, v = dsla.project(h)
    q_s, k_s, v_s = dsla.state_query(q, h), dsla.adapt("k", k), dsla.adapt("v", v)
    g_far, g_close = dsla.gates(k_s, v_s)
    cos, sin = hybrid.rotary_emb(h, torch.arange(T)[None])
    q_rot, k_rot = rotate(q, cos, sin), rotate(k, cos, sin)
    if dsla.config.rope:
        q_s, k_s = rotate(q_s, cos, sin), rotate(k_s, cos, sin)
    q_s, k_s, v_s = q_s[0].double() * D**-0.5, k_s[0].double(), v_s[0].double()
    w = dsla.mix_weights().double()  # (Hq, 2) or (Hq, 3) with the window last
    if W:
        w = w * torch.cat((dsla.gain.double().mean(-1, keepdim=True).expand(-1, 2), torch.ones_like(w[:, 2:])), -1)
    states = [g_far] if dsla.gate_close is None else [g_far, g_close]
    total = torch.zeros(hybrid.num_heads, T - MIN_QUERY, T, dtype=torch.float64)
    k_rep, v_rep = k_s.repeat_interleave(G, 0), v_s.repeat_interleave(G, 0)
    for s, g in enumerate(states):
        lam = g[0].double().cumsum(1).repeat_interleave(G, 0)  # (Hq, T, K)
        for start in range(MIN_QUERY, T, block):
            rows = torch.arange(start, min(start + block, T))
            read_at = rows - W  # the query at i reads the state after token i - W
            decay = torch.exp((lam[:, read_at, None, :] - lam[:, None, :, :]).clamp(max=0))  # (Hq, b, T, K)
            c = torch.einsum("hik,hijk,hjk->hij", q_s[:, rows], decay, k_rep)
            c = c.masked_fill(torch.arange(T)[None, None, :] > read_at[None, :, None], 0)
            read = torch.einsum("hij,hjv->hiv", c, v_rep)
            rms = read.pow(2).mean(-1, keepdim=True).add(dsla.config.eps).sqrt() if dsla.config.normalize else 1.0
            total[:, rows[0] - MIN_QUERY : rows[-1] + 1 - MIN_QUERY] += w[:, s, None, None] * c / rms
    mass = total.abs()
    mass = mass / mass.sum(-1, keepdim=True)
    if not W:
        return mass
    kr = k_rot[0].double().repeat_interleave(G, 0)
    scores = (q_rot[0].double()[:, MIN_QUERY:] @ kr.transpose(-1, -2)) * D**-0.5  # (Hq, Tq, T)
    dist = torch.arange(MIN_QUERY, T)[:, None] - torch.arange(T)[None, :]
    p = torch.softmax(scores.masked_fill((dist < 0) | (dist >= W), -math.inf), -1)
    w_state = w[:, :2].sum(-1)[:, None, None]
    return (w_state * mass + w[:, 2, None, None] * p) / (w_state + w[:, 2, None, None])


def recency_profiles(hybrid: HybridModel, ids: Tensor, layer: int, layers: dict[str, DSLAAttention]) -> dict:
    """Distance profiles for the attention layer and each given linear layer on one block ids (1, T)."""
    T = ids.shape[1]
    if T <= MIN_QUERY:
        raise ValueError(f"need more than {MIN_QUERY} tokens, got {T}")
    h = layer_input(hybrid, ids, layer)
    bins = distance_bins(T)
    profiles = {"attention": profile_from_weights(attention_weights(hybrid, h, layer), bins)}
    for name, module in layers.items():
        profiles[name] = profile_from_weights(linear_weights(hybrid, module, h).float(), bins)
    return {
        "layer": layer,
        "tokens": T,
        "bins": [list(b) for b in bins],
        "profiles": profiles,
        "mass_last_16": {name: sum(p[i] for i, (a, _) in enumerate(bins) if a < 16) for name, p in profiles.items()},
    }


def plot_profiles(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    centers = [max(a, 0.5) * (1 if b - a <= 1 else math.sqrt(b / max(a, 1))) for a, b in result["bins"]]
    for name, prof in result["profiles"].items():
        widths = [b - a for a, b in result["bins"]]
        ax.plot(centers, [p / w for p, w in zip(prof, widths, strict=True)], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("distance to the query (tokens)")
    ax.set_ylabel("mean weight per token")
    ax.set_title(f"Layer {result['layer']}: weight on past tokens by distance")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
