"""Chained distillation: convert layers one at a time in the given order, each trained inside the
hybrid that already holds the earlier-converted (frozen) layers, so every prefix of the order is a
usable model.

    dsla-serve distill --data DIR --out runs/smollm2 [--order order.json] [--variant gla]

Per layer: (1) run the current hybrid (earlier layers converted) on the training blocks up to the
layer, (2) cache what stays fixed while the layer trains - its input, q/k/v (frozen projections) and
the attention output on that same input - and the all-attention teacher's residual stream after the
layer, (3) train only the new DSLA parameters layer-locally, optionally followed by a short
end-to-end stage (KL to the teacher's logits + CE), (4) freeze and save the layer, with the hybrid's
validation perplexity, before the next one. A rerun skips layers already saved (resume).
Multi-GPU: under ``accelerate launch`` every process trains on its own batches and gradients are
averaged; the main process saves.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dsla_serve.config import DSLAConfig
from dsla_serve.distill.data import TextData
from dsla_serve.distill.losses import LossWeights, kl_to_teacher, next_token_nll, normalized_mse
from dsla_serve.eval.perplexity import autocast as frozen_context
from dsla_serve.eval.perplexity import perplexity
from dsla_serve.layers import rotate
from dsla_serve.model.convert import (
    MANIFEST,
    base_fingerprint,
    convert,
    converted_layers,
    decoder_layers,
    original_attention,
    revert,
    save_dsla,
)
from dsla_serve.model.hybrid import HybridModel


@dataclass
class DistillConfig:
    order: list[int]
    dsla: DSLAConfig = field(default_factory=DSLAConfig)
    weights: LossWeights = field(default_factory=LossWeights)
    steps: int = 300  # layer-local steps per layer
    batch_size: int = 2
    lr: float = 3e-3
    e2e_steps: int = 0  # end-to-end steps per layer (KL/CE); 0 = layer-local only
    e2e_seq_len: int = 256
    e2e_lr: float = 1e-3
    e2e_scope: str = "layer"  # "layer": only the new layer trains end to end; "prefix": every converted layer
    seed: int = 0
    bf16_frozen: bool = True  # frozen forwards (inputs, teacher, perplexity) under bfloat16 autocast on CPU

    def __post_init__(self) -> None:
        if len(set(self.order)) != len(self.order):
            raise ValueError(f"order repeats layers: {self.order}")
        for name in ("steps", "e2e_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.batch_size < 1 or self.lr <= 0 or self.e2e_lr <= 0:
            raise ValueError("batch_size must be >= 1 and learning rates > 0")
        if self.e2e_scope not in ("layer", "prefix"):
            raise ValueError(f"e2e_scope must be 'layer' or 'prefix', got {self.e2e_scope!r}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["dsla"], d["weights"] = self.dsla.to_dict(), dataclasses.asdict(self.weights)
        return d


@dataclass
class LayerProblem:
    """What stays fixed while one layer trains, for every training block."""

    x: Tensor  # (N, T, hidden) residual stream entering the layer, in the current hybrid
    q: Tensor  # (N, Hq, T, D) pre-RoPE
    k: Tensor  # (N, Hkv, T, D) pre-RoPE
    v: Tensor  # (N, Hkv, T, D)
    target: Tensor  # (N, T, hidden) the attention's output (after o_proj) on the same input
    head_rms: Tensor  # (Hq, D) per-channel RMS of the attention output before o_proj
    teacher_out: Tensor | None  # (N, T, hidden) all-attention teacher's stream after the layer


@torch.no_grad()
def build_problem(
    hybrid: HybridModel, blocks: Tensor, layer: int, plan: list[int], teacher_out: Tensor | None, cfg: DistillConfig
) -> LayerProblem:
    attn = original_attention(hybrid.base, layer)
    norm = decoder_layers(hybrid.base)[layer].input_layernorm
    xs, qs, ks, vs, targets, sq = [], [], [], [], [], 0.0
    for i in range(0, len(blocks), cfg.batch_size):
        ids = blocks[i : i + cfg.batch_size].to(hybrid.device)
        with frozen_context(cfg.bf16_frozen):
            x, _ = hybrid(ids, dsla_layers=plan, stop_at=layer)
        x = x.float()
        B, T, _ = x.shape
        h = norm(x)
        q = attn.q_proj(h).view(B, T, -1, hybrid.head_dim).transpose(1, 2)
        k = attn.k_proj(h).view(B, T, -1, hybrid.head_dim).transpose(1, 2)
        v = attn.v_proj(h).view(B, T, -1, hybrid.head_dim).transpose(1, 2)
        cos, sin = hybrid.rotary_emb(x, torch.arange(T, device=x.device)[None])
        o = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True, enable_gqa=True)
        sq = sq + o.pow(2).sum((0, 2))
        targets.append(attn.o_proj(o.transpose(1, 2).reshape(B, T, -1)))
        xs.append(x), qs.append(q), ks.append(k), vs.append(v)
    n_tokens = blocks.numel()
    return LayerProblem(
        torch.cat(xs), torch.cat(qs), torch.cat(ks), torch.cat(vs), torch.cat(targets),
        (sq / n_tokens).sqrt(), teacher_out,
    )  # fmt: skip


@torch.no_grad()
def teacher_streams(hybrid: HybridModel, blocks: Tensor, cfg: DistillConfig) -> dict[int, Tensor]:
    """The all-attention model's residual stream after every layer, stored in bfloat16 (for 'hidden')."""
    out: dict[int, list[Tensor]] = {i: [] for i in range(hybrid.num_layers)}
    for i in range(0, len(blocks), cfg.batch_size):
        with frozen_context(cfg.bf16_frozen):
            _, hidden = hybrid(blocks[i : i + cfg.batch_size].to(hybrid.device), dsla_layers=[],
                               logits_for="none", hidden_states_at=range(hybrid.num_layers))  # fmt: skip
        for layer, h in hidden.items():
            out[layer].append(h.to(torch.bfloat16))
    return {layer: torch.cat(hs) for layer, hs in out.items()}


def cosine_lr(step: int, steps: int, warmup: int = 10) -> float:
    """Linear warm-up over at most a tenth of the stage, then cosine to a tenth of the peak.

    NOTE(decisions): a fixed 10-step warm-up left 10-step end-to-end stages entirely in warm-up (the
    shipped chain's first design: its e2e stage never reached the peak rate)."""
    warmup = max(1, min(warmup, steps // 10))
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


class Trainer:
    """Optimises one layer's DSLA parameters; gradients are averaged across accelerate processes."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, steps: int, accelerator=None):
        self.params, self.steps, self.accelerator = params, steps, accelerator
        self.opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: cosine_lr(s, steps))

    def step(self, loss: Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            for p in self.params:
                if p.grad is not None:
                    p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.sched.step()


def train_local(
    hybrid: HybridModel, layer: int, problem: LayerProblem, cfg: DistillConfig, gen: torch.Generator,
    report: Callable[[int, dict[str, float]], None], accelerator=None,
) -> list[dict[str, float]]:  # fmt: skip
    """Layer-local stage: match the attention output (and the teacher's stream) on cached inputs."""
    dsla = hybrid.dsla(layer)
    decoder = decoder_layers(hybrid.base)[layer]
    w = cfg.weights
    trainer = Trainer(list(dsla.dsla_parameters().values()), cfg.lr, cfg.steps, accelerator)
    N, T = problem.x.shape[:2]
    cos, sin = hybrid.rotary_emb(problem.x[:1], torch.arange(T, device=problem.x.device)[None])
    if problem.teacher_out is not None:  # scale of the teacher's own update at this layer
        hidden_scale = (problem.teacher_out.float() - problem.x).pow(2).mean().clamp(min=1e-6)
    history = []
    norm = decoder.input_layernorm
    for step in range(cfg.steps):
        idx = torch.randint(0, N, (min(cfg.batch_size, N),), generator=gen)
        h = norm(problem.x[idx]) if "q" in dsla.adapters else None
        o = dsla.attend(problem.q[idx], problem.k[idx], problem.v[idx], cos, sin, hidden=h)[0]
        out = dsla.output(o)
        terms = {}
        if w.attn:
            terms["attn"] = normalized_mse(out, problem.target[idx])
        if w.hidden and problem.teacher_out is not None:
            r = problem.x[idx] + out
            y = r + decoder.mlp(decoder.post_attention_layernorm(r))
            terms["hidden"] = normalized_mse(y, problem.teacher_out[idx], hidden_scale)
        loss = sum(getattr(w, k) * v for k, v in terms.items())
        trainer.step(loss)
        record = {k: v.item() for k, v in terms.items()}
        history.append(record)
        report(step, record)
    return history


def train_e2e(
    hybrid: HybridModel, layer: int, plan: list[int], blocks: Tensor, cfg: DistillConfig, gen: torch.Generator,
    report: Callable[[int, dict[str, float]], None], accelerator=None,
) -> list[dict[str, float]]:  # fmt: skip
    """End-to-end stage on short prefixes: KL to the all-attention teacher's logits and next-token CE.

    ``e2e_scope="layer"`` trains the new layer (the model runs from it on); "prefix" trains every
    converted layer of the chain so far (the whole model runs with autograd).
    """
    w = cfg.weights
    trained = [layer] if cfg.e2e_scope == "layer" else [*plan, layer]
    params = [p for i in trained for p in hybrid.dsla(i).dsla_parameters().values()]
    for p in params:
        p.requires_grad_(True)
    trainer = Trainer(params, cfg.e2e_lr, cfg.e2e_steps, accelerator)
    start_at = min(trained)
    history = []
    for step in range(cfg.e2e_steps):
        idx = torch.randint(0, len(blocks), (min(cfg.batch_size, len(blocks)),), generator=gen)
        ids = blocks[idx, : cfg.e2e_seq_len].to(hybrid.device)
        with torch.no_grad(), frozen_context(cfg.bf16_frozen):
            teacher, _ = hybrid(ids, dsla_layers=[])
            x, _ = hybrid(ids, dsla_layers=plan, stop_at=start_at)
        logits, _ = hybrid(None, dsla_layers=[*plan, layer], start_at=start_at, start_hidden=x.float())
        terms = {}
        if w.kl:
            terms["kl"] = kl_to_teacher(logits, teacher, w.temperature)
        if w.ce:
            terms["ce"] = next_token_nll(logits, ids)
        if not terms:
            raise ValueError("e2e_steps > 0 needs a kl or ce weight > 0")
        trainer.step(sum(getattr(w, k) * v for k, v in terms.items()))
        record = {k: v.item() for k, v in terms.items()}
        history.append(record)
        report(step, record)
    return history


def summarize(history: list[dict[str, float]], tail: int = 10) -> dict[str, dict[str, float]]:
    """First and mean-of-last-``tail`` value of every loss term."""
    if not history:
        return {}
    return {
        k: {"first": history[0][k], "last": sum(h[k] for h in history[-tail:]) / len(history[-tail:])}
        for k in history[0]
    }


def resume_state(out: Path, fingerprint: dict, cfg: DistillConfig, data: TextData) -> dict[str, Any] | None:
    """The existing run's manifest if ``out`` holds one made with the same settings; error if not.

    The order may grow: a run over the first k layers of an order is extended by a run over more.
    """
    file = out / MANIFEST
    if not file.is_file():
        return None
    manifest = json.loads(file.read_text())
    mine = json.loads(json.dumps(cfg.to_dict()))  # as stored: tuples become lists
    # settings added since a run was made take their defaults (which is what that run used)
    defaults = json.loads(json.dumps(DistillConfig(order=[]).to_dict()))
    stored = manifest.get("hyperparameters", {})
    theirs = {**defaults, **stored, "dsla": {**defaults["dsla"], **stored.get("dsla", {})}}
    old_order, new_order = theirs.pop("order", []), mine.pop("order")
    checks = {
        "base model": manifest.get("base_model") == fingerprint,
        "hyperparameters": theirs == mine,
        "data": manifest.get("data_fingerprint") == data.fingerprint,
        "order": new_order[: len(old_order)] == old_order,
    }
    for what, ok in checks.items():
        if not ok:
            raise ValueError(
                f"{out} holds a distillation run with a different {what}; resume only with the same "
                f"settings (the order may only be extended), or pass another --out"
            )
    return manifest


def distill(
    hybrid: HybridModel, data: TextData, cfg: DistillConfig, out: str | Path,
    progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
    extra: dict[str, Any] | None = None, accelerator=None,
) -> dict[str, Any]:  # fmt: skip
    """Run (or resume) the chain; returns the final manifest. ``progress(phase, step, total, losses)``."""
    out = Path(out)
    base = hybrid.base
    is_main = accelerator is None or accelerator.is_main_process
    fingerprint = base_fingerprint(base)
    manifest = resume_state(out, fingerprint, cfg, data)
    chain: list[dict[str, Any]] = manifest["chain"] if manifest else []
    done = [entry["layer"] for entry in chain]
    revert(base, [i for i in converted_layers(base) if i not in done])  # every other layer starts fresh
    if done:
        convert(base, done, weights=out)
    report = progress or (lambda *a: None)
    teacher_ppl = manifest["teacher_val_ppl"] if manifest else perplexity(hybrid, data.val, [], bf16=cfg.bf16_frozen)
    teacher = teacher_streams(hybrid, data.train, cfg) if cfg.weights.hidden else None
    header = {
        "hyperparameters": cfg.to_dict(),
        "data": data.describe(),
        "data_fingerprint": data.fingerprint,
        "teacher_val_ppl": teacher_ppl,
        "order": cfg.order,
        **(extra or {}),
    }
    for j, layer in enumerate(cfg.order):
        if layer in done:
            continue
        start = time.perf_counter()
        plan = cfg.order[:j]
        gen = torch.Generator().manual_seed(
            cfg.seed * 1000 + layer + 7919 * (accelerator.process_index if accelerator else 0)
        )
        dsla = convert(base, [layer], config=cfg.dsla)[layer]
        problem = build_problem(hybrid, data.train, layer, plan, teacher[layer] if teacher else None, cfg)
        with torch.no_grad():
            dsla.gain.copy_(problem.head_rms.clamp(min=1e-3))

        def stage(name: str, total: int, layer: int = layer):
            return lambda s, r: report(f"layer {layer} {name}", s, total, r)

        local = train_local(hybrid, layer, problem, cfg, gen, stage("local", cfg.steps), accelerator)
        del problem
        e2e = train_e2e(hybrid, layer, plan, data.train, cfg, gen, stage("e2e", cfg.e2e_steps), accelerator)
        for i in [*plan, layer]:
            for p in hybrid.dsla(i).parameters():
                p.requires_grad_(False)
        ppl = perplexity(hybrid, data.val, [*plan, layer], bf16=cfg.bf16_frozen)
        chain.append({
            "step": j, "layer": layer, "local": summarize(local), "e2e": summarize(e2e),
            "val_ppl": ppl, "val_ppl_ratio": ppl / teacher_ppl, "seconds": time.perf_counter() - start,
        })  # fmt: skip
        report(f"layer {layer} done", j + 1, len(cfg.order), {"val_ppl": ppl, "ratio": ppl / teacher_ppl})
        if is_main:  # an end-to-end stage over the prefix changed the earlier layers too
            saved = [*plan, layer] if cfg.e2e_scope == "prefix" and cfg.e2e_steps else [layer]
            save_dsla(out, base, saved, extra={**header, "chain": chain})
        if accelerator is not None:
            accelerator.wait_for_everyone()
    return json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else {**header, "chain": chain}
