"""Greedy agreement between a hybrid (student) and the all-attention model (teacher).

    dsla-serve eval agreement --data CORPUS_DIR --prompts 64 --conversion 0.25,0.5 --json

Perplexity averages over every position of real text; what a user sees is the model's own
continuation. For prompts cut from held-out documents of several domains (each the opening
``prompt_tokens`` tokens, no chat template), both models continue greedily for ``new_tokens``
tokens (EOS not special: fixed-length continuations). Reported per level and per domain:

- ``agreement``: position-wise match fraction, mean over prompts of #{i: student_i == teacher_i} / n;
- ``prefix_match``: tokens before the first divergence / n (1.0 = identical continuation);
- ``kl_per_token``: mean KL(teacher || student) in nats over the teacher's continuation, teacher-forced
  (both models read prompt + teacher continuation; the divergence of their next-token distributions).
"""

from __future__ import annotations

import torch
from torch import Tensor

from dsla_serve.generate import prefill
from dsla_serve.model import HybridCache, HybridModel


def corpus_prompts(
    texts: dict[str, list[str]], tokenizer, n: int, prompt_tokens: int
) -> list[tuple[str, list[int]]]:  # fmt: skip
    """(domain, ids) for ``n`` prompts taken round-robin over domains from documents long enough.

    A document qualifies if it has ``prompt_tokens`` tokens followed by at least one more (so the
    opening is a real prefix); documents are taken in file order (the corpus writes them in hash order).
    """
    pools = {d: iter(ts) for d, ts in texts.items()}
    out: list[tuple[str, list[int]]] = []
    while len(out) < n and pools:
        for domain in list(pools):
            for text in pools[domain]:
                ids = tokenizer(text[: 32 * prompt_tokens], add_special_tokens=False).input_ids  # the opening only
                if len(ids) > prompt_tokens:
                    out.append((domain, ids[:prompt_tokens]))
                    break
            else:
                del pools[domain]  # exhausted
            if len(out) == n:
                break
    return out


@torch.no_grad()
def greedy(model: HybridModel, prompts: Tensor, plan: list[int], new_tokens: int) -> Tensor:
    """Greedy continuations (B, new_tokens) of equal-length prompts (B, T) with DSLA at ``plan``."""
    cache = HybridCache([model.new_cache(plan, capacity=prompts.shape[1] + new_tokens) for _ in range(len(prompts))])
    logits = prefill(model, prompts.to(model.device), cache)
    out = []
    for step in range(new_tokens):
        nxt = logits.argmax(-1)  # (B,)
        out.append(nxt)
        if step + 1 < new_tokens:
            logits = model(nxt[:, None], cache=cache, logits_for="last")[0][:, -1]
    return torch.stack(out, 1).cpu()


@torch.no_grad()
def continuation_kl(
    model: HybridModel, prompts: Tensor, cont: Tensor, plan: list[int], teacher_model: HybridModel | None = None
) -> Tensor:
    """KL(teacher || student) per sequence (B,), mean over the positions that predict ``cont`` (B, n).
    The teacher is ``teacher_model`` (default: ``model``) with every layer attention."""
    ids = torch.cat([prompts, cont], 1).to(model.device)
    sl = slice(prompts.shape[1] - 1, ids.shape[1] - 1)  # logits at these positions predict cont
    teacher_model = model if teacher_model is None else teacher_model
    teacher = torch.log_softmax(teacher_model(ids, dsla_layers=[])[0][:, sl].float(), -1)
    student = torch.log_softmax(model(ids, dsla_layers=plan)[0][:, sl].float(), -1)
    return (teacher.exp() * (teacher - student)).sum(-1).mean(-1).cpu()


def agreement_scores(teacher: Tensor, student: Tensor) -> tuple[Tensor, Tensor]:
    """(position-wise match fraction, prefix-match fraction) per sequence for token tensors (B, n)."""
    same = teacher == student
    prefix = same.int().cumprod(1).sum(1)  # tokens before the first divergence
    return same.float().mean(1), prefix.float() / teacher.shape[1]


def summarize(rows: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in keys} | {"prompts": len(rows)}


def teacher_continuations(
    model: HybridModel, prompts: list[tuple[str, list[int]]], new_tokens: int = 32, batch: int = 8
) -> Tensor:
    """The all-attention model's greedy continuations (N, new_tokens): what every level is scored against."""
    ids = torch.tensor([p for _, p in prompts])  # (N, T): equal lengths by construction
    return torch.cat([greedy(model, ids[i : i + batch], [], new_tokens) for i in range(0, len(ids), batch)])


def agreement_by_level(
    model: HybridModel, prompts: list[tuple[str, list[int]]], order: list[int], levels: list[float],
    new_tokens: int = 32, batch: int = 8, reference: Tensor | None = None, teacher: HybridModel | None = None,
) -> list[dict]:  # fmt: skip
    """One row per level: overall and per-domain agreement, prefix match and KL (see module doc).

    ``reference``: ``teacher_continuations`` of these prompts when already known (checkpoints of one
    base model share them), so the teacher's greedy decode is not run again. ``teacher``: the
    all-attention model scored against when it is not ``model`` itself (the same weights in another
    precision: level 0 then measures what the precision alone changes).
    """
    for level in levels:
        if not 0 <= level <= 1:
            raise ValueError(f"conversion levels must be in [0, 1], got {level}")
    if not prompts:
        raise ValueError("no prompts: the held-out documents are all shorter than the prompt length")
    domains = [d for d, _ in prompts]
    ids = torch.tensor([p for _, p in prompts])  # (N, T): equal lengths by construction
    chunks = [slice(i, i + batch) for i in range(0, len(ids), batch)]
    if reference is None:
        reference = teacher_continuations(model if teacher is None else teacher, prompts, new_tokens, batch)  # (N, n)
    elif reference.shape != (len(ids), new_tokens):
        raise ValueError(f"reference is {tuple(reference.shape)}, expected {(len(ids), new_tokens)}")
    keys = ("agreement", "prefix_match", "kl_per_token")
    out = []
    for level in levels:
        plan = sorted(order[: round(level * len(order))])
        student = torch.cat([greedy(model, ids[c], plan, new_tokens) for c in chunks])
        match, prefix = agreement_scores(reference, student)
        kl = torch.cat([continuation_kl(model, ids[c], reference[c], plan, teacher) for c in chunks])
        rows = [{"domain": d, "agreement": m, "prefix_match": p, "kl_per_token": max(k, 0.0)}  # >= 0 up to rounding
                for d, m, p, k in zip(domains, match.tolist(), prefix.tolist(), kl.tolist(), strict=True)]  # fmt: skip
        per_domain = {d: summarize([r for r in rows if r["domain"] == d], keys) for d in dict.fromkeys(domains)}
        out.append({"conversion": level, "dsla_layers": plan, **summarize(rows, keys), "domains": per_domain})
    return out
