"""Perplexity on held-out text, per conversion level (and per domain for a `data corpus` directory).

dsla-serve eval ppl --data DIR --seq-len 1024 --conversion 0,0.25,0.5,0.75,1 --json
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from dsla_serve.distill.losses import next_token_nll
from dsla_serve.model.hybrid import HybridModel


def autocast(bf16: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)


@torch.no_grad()
def perplexity(hybrid: HybridModel, blocks: Tensor, plan: list[int], batch_size: int = 2, bf16: bool = False) -> float:
    """exp(mean next-token NLL) of the hybrid running DSLA at ``plan`` over blocks (N, T)."""
    total, count = 0.0, 0
    with autocast(bf16):
        for i in range(0, len(blocks), batch_size):
            ids = blocks[i : i + batch_size].to(hybrid.device)
            logits, _ = hybrid(ids, dsla_layers=plan)
            total += next_token_nll(logits, ids).item() * ids[:, 1:].numel()
            count += ids[:, 1:].numel()
    return math.exp(total / count)


def perplexity_by_level(
    hybrid: HybridModel, blocks: Tensor, order: list[int], levels: list[float], bf16: bool = False,
    teacher: float | None = None,
) -> list[dict]:  # fmt: skip
    """One row per conversion level: the first round(level * n) layers of ``order`` run DSLA.

    ``teacher``: the all-attention perplexity on these blocks when already known (several checkpoints
    of one base model share it), so it is not measured again.
    """
    rows = []
    for level in levels:
        if not 0 <= level <= 1:
            raise ValueError(f"conversion levels must be in [0, 1], got {level}")
        plan = sorted(order[: round(level * len(order))])
        ppl = teacher if not plan and teacher is not None else perplexity(hybrid, blocks, plan, bf16=bf16)
        if not plan:
            teacher = ppl
        rows.append({"conversion": level, "dsla_layers": plan, "ppl": ppl})
    if teacher is None:
        teacher = perplexity(hybrid, blocks, [], bf16=bf16)
    for row in rows:
        row["ratio_to_attention"] = row["ppl"] / teacher
    return rows


def perplexity_by_domain(
    hybrid: HybridModel, blocks: dict[str, Tensor], order: list[int], levels: list[float], bf16: bool = False,
    teacher: dict[str, float] | None = None,
) -> dict:  # fmt: skip
    """``perplexity_by_level`` on each domain's blocks, plus the geometric mean of the per-domain ratios.

    The geometric mean weighs every domain equally whatever its perplexity scale (code vs prose).
    ``teacher``: each domain's all-attention perplexity, when already known.
    """
    teacher = teacher or {}
    domains = {d: {"tokens": b.numel(), "levels": perplexity_by_level(hybrid, b, order, levels, bf16, teacher.get(d))}
               for d, b in blocks.items()}  # fmt: skip
    geomean = []
    for i, level in enumerate(levels):
        logs = [math.log(r["levels"][i]["ratio_to_attention"]) for r in domains.values()]
        geomean.append({"conversion": level, "geomean_ratio_to_attention": math.exp(sum(logs) / len(logs))})
    return {"domains": domains, "geomean": geomean}
