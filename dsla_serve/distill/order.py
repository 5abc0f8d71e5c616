"""Layer order for conversion: which layers to convert first.

    dsla-serve order --data DIR --metric entropy|kl --out order.json

Two sensitivity metrics, lowest score converted first:
- ``entropy`` (the paper's): mean attention entropy of each layer over calibration text, averaged over
  heads and query positions (positions < 32 skipped: a short prefix has little to spread over). The
  authors treat concentrated (low-entropy) layers as the least sensitive.
- ``kl`` (measured): the rise in next-token KL to the all-attention model when that one layer alone
  is converted and briefly trained layer-locally.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dsla_serve.distill.losses import kl_to_teacher
from dsla_serve.distill.train import DistillConfig, build_problem, frozen_context, train_local
from dsla_serve.layers import rotate
from dsla_serve.model.convert import convert, decoder_layers, original_attention, revert
from dsla_serve.model.hybrid import HybridModel

MIN_POSITION = 32


@torch.no_grad()
def attention_entropy(hybrid: HybridModel, blocks: Tensor, batch_size: int = 1) -> list[float]:
    """Mean entropy (nats) of each layer's causal attention distributions over blocks (N, T)."""
    n = hybrid.num_layers
    totals = torch.zeros(n, dtype=torch.float64)
    count = 0
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(hybrid.device)
        x = hybrid.embed_tokens(ids)
        B, T, _ = x.shape
        cos, sin = hybrid.rotary_emb(x, torch.arange(T, device=x.device)[None])
        for i, layer in enumerate(decoder_layers(hybrid.base)):
            attn = original_attention(hybrid.base, i)
            h = layer.input_layernorm(x)
            q = rotate(attn.q_proj(h).view(B, T, -1, hybrid.head_dim).transpose(1, 2), cos, sin)
            k = rotate(attn.k_proj(h).view(B, T, -1, hybrid.head_dim).transpose(1, 2), cos, sin)
            k = k.repeat_interleave(hybrid.num_heads // hybrid.num_kv_heads, dim=1)
            scores = (q @ k.transpose(-1, -2)) * hybrid.head_dim**-0.5  # (B, Hq, T, T)
            scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=x.device).tril(), -math.inf)
            logp = torch.log_softmax(scores.float(), -1)
            ent = -(logp.exp() * logp.nan_to_num(neginf=0.0)).sum(-1)  # (B, Hq, T)
            totals[i] += ent[:, :, MIN_POSITION:].mean().item()
            x = x + hybrid.mix(i, h, cos, sin, (list(range(B)), []), None, [0] * B)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        count += 1
    return (totals / count).tolist()


@torch.no_grad()
def mean_kl(hybrid: HybridModel, blocks: Tensor, plan: list[int], teacher_logits: list[Tensor], bf16: bool) -> float:
    vals = []
    with frozen_context(bf16):
        for ids, teacher in zip(blocks.split(1), teacher_logits, strict=True):
            logits, _ = hybrid(ids.to(hybrid.device), dsla_layers=plan)
            vals.append(kl_to_teacher(logits, teacher, 1.0).item())
    return sum(vals) / len(vals)


def kl_sensitivity(
    hybrid: HybridModel, train: Tensor, val: Tensor, cfg: DistillConfig,
    progress: Callable[[int, int, float], None] | None = None,
) -> list[float]:  # fmt: skip
    """KL(teacher || hybrid) on ``val`` with each layer alone converted after ``cfg.steps`` local steps."""
    base = hybrid.base
    with torch.no_grad(), frozen_context(cfg.bf16_frozen):
        teacher = [hybrid(ids.to(hybrid.device), dsla_layers=[])[0] for ids in val.split(1)]
    scores = []
    for layer in range(hybrid.num_layers):
        revert(base, [layer])
        dsla = convert(base, [layer], config=cfg.dsla)[layer]
        problem = build_problem(hybrid, train, layer, [], None, cfg)
        with torch.no_grad():
            dsla.gain.copy_(problem.head_rms.clamp(min=1e-3))
        train_local(hybrid, layer, problem, cfg, torch.Generator().manual_seed(cfg.seed + layer), lambda s, r: None)
        scores.append(mean_kl(hybrid, val, [layer], teacher, cfg.bf16_frozen))
        revert(base, [layer])
        if progress:
            progress(layer, hybrid.num_layers, scores[-1])
    return scores


def order_from_scores(scores: list[float]) -> list[int]:
    """Layers sorted by score, lowest (least sensitive) first; ties by index."""
    return sorted(range(len(scores)), key=lambda i: (scores[i], i))


def demote(order: list[int], layers: list[int], past: int) -> list[int]:
    """``order`` with ``layers`` moved to just after the first ``past`` of the others, each group keeping
    its relative order: the prefixes up to ``past`` lose them, every prefix from ``past + len(layers)``
    on holds the same set as before.

    NOTE(decisions): for layers whose conversion breaks retrieval that the per-layer KL misses (pass-key
    leave-one-out, docs/quality/retrieval-order): moved only past the level that needs them out, so
    the longer prefixes keep the KL order's perplexity."""
    if not set(layers) <= set(order) or len(set(layers)) != len(layers):
        raise ValueError(f"layers to demote must be distinct layers of the order, got {layers}")
    keep = [i for i in order if i not in layers]
    if not 0 <= past <= len(keep):
        raise ValueError(f"past must be in [0, {len(keep)}], got {past}")
    new = keep[:past] + [i for i in order if i in layers] + keep[past:]
    earlier = [i for i in layers if new.index(i) < order.index(i)]
    if earlier:
        raise ValueError(f"layers {earlier} would move earlier, not later: demote past fewer layers")
    return new
