"""Design ablation: train one layer alone under several DSLA designs and compare model perplexity.

    python -m dsla_serve.distill.ablation --data DIR --layer 22 --out ablation.json

Every variant gets the same cached inputs, the same layer-local budget and the same held-out
blocks; the figure of merit is the model's validation perplexity with that single layer converted,
as a ratio to the all-attention model's. This is the measurement behind the defaults in
``DSLAConfig`` (RoPE inside DSLA, RMS read-out normalisation, two states) and behind training only
the new parameters (not q/o). Evaluation goes through Hugging Face's own forward with the layer
converted in place, so variants that change the layer's internals need no engine support.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from dsla_serve.config import DSLAConfig
from dsla_serve.distill.data import cached_python_docs, load_data
from dsla_serve.distill.losses import LossWeights, next_token_nll
from dsla_serve.distill.train import DistillConfig, Trainer, build_problem, train_local
from dsla_serve.model import HybridModel, convert, load_base, revert
from dsla_serve.runtime import machine_info, tune_allocator

VARIANTS = {  # name: two states, RMS read-out norm and no RoPE unless the name says otherwise
    "dsla": {"config": DSLAConfig()},
    "dsla-rope": {"config": DSLAConfig(rope=True)},
    "dsla-no-norm": {"config": DSLAConfig(normalize=False)},  # the authors' code
    "gla": {"config": DSLAConfig(variant="gla")},  # one state
    "dsla-tuned-qo": {"config": DSLAConfig(), "tune_qo": True},  # q_proj/o_proj fine-tuned too
    "dsla-out-gate": {"config": DSLAConfig(output_gate=True)},  # per-channel output gate from the query
    # exact local window of W tokens (W = 0 above is the paper's DSLA), and low-rank adapters on top of it
    **{f"dsla-w{w}": {"config": DSLAConfig(window=w)} for w in (32, 64, 128)},
    **{f"gla-w{w}": {"config": DSLAConfig(variant="gla", window=w)} for w in (32, 64)},
    **{
        f"dsla-w{w}-{a}": {"config": DSLAConfig(window=w, adapter_rank=8, adapters=a)}
        for w in (32, 64)
        for a in ("qo", "kv", "qkvo")
    },
}


@torch.no_grad()
def hf_perplexity(model, blocks, batch_size: int = 2) -> float:
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        ids = blocks[i : i + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits
        total += next_token_nll(logits, ids).item() * ids[:, 1:].numel()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def run(data_path: str, layer: int, steps: int, train_blocks: int, val_blocks: int, variants: list[str]) -> dict:
    loaded = load_base()
    base = loaded.model
    data = load_data(data_path, loaded.tokenizer, 1024, max_train_blocks=train_blocks, max_val_blocks=val_blocks)
    hybrid = HybridModel(base)
    teacher_ppl = hf_perplexity(base, data.val)
    cfg = DistillConfig(order=[layer], steps=steps, weights=LossWeights(attn=1.0))
    convert(base, [layer])
    problem = build_problem(hybrid, data.train, layer, [], None, cfg)
    revert(base, [layer])
    results = {}
    for name in variants:
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
        spec = VARIANTS[name]
        start = time.perf_counter()
        dsla = convert(base, [layer], config=spec["config"])[layer]
        if spec["config"].normalize:  # unnormalised read-outs (the authors' code) have no gain to set
            with torch.no_grad():
                dsla.gain.copy_(problem.head_rms.clamp(min=1e-3))
        init_ppl = hf_perplexity(base, data.val)
        if spec.get("tune_qo"):  # private copies, so attention keeps the originals
            dsla.q_proj, dsla.o_proj = copy.deepcopy(dsla.q_proj), copy.deepcopy(dsla.o_proj)
            extra = [*dsla.q_proj.parameters(), *dsla.o_proj.parameters()]
            for p in extra:
                p.requires_grad_(True)
            qo = Trainer(extra, 1e-4, steps)
            _train_with_qo(hybrid, layer, problem, cfg, qo)
        else:
            train_local(hybrid, layer, problem, cfg, torch.Generator().manual_seed(0), lambda s, r: None)
        ppl = hf_perplexity(base, data.val)
        results[name] = {
            "init_ppl_ratio": init_ppl / teacher_ppl,
            "trained_ppl_ratio": ppl / teacher_ppl,
            "seconds": time.perf_counter() - start,
        }
        print(json.dumps({name: results[name]}), flush=True)
        revert(base, [layer])
    return {
        "layer": layer,
        "steps": steps,
        "teacher_val_ppl": teacher_ppl,
        "data": data.describe(),
        "variants": results,
        "machine": machine_info(),
    }


def _train_with_qo(hybrid, layer, problem, cfg, qo: Trainer) -> None:
    """Layer-local training where q_proj/o_proj copies are tuned too (at a 30x lower rate)."""
    from dsla_serve.distill.losses import normalized_mse

    dsla = hybrid.dsla(layer)
    gates = Trainer(list(dsla.dsla_parameters().values()), cfg.lr, cfg.steps)
    gen = torch.Generator().manual_seed(0)
    N, T = problem.x.shape[:2]
    cos, sin = hybrid.rotary_emb(problem.x[:1], torch.arange(T)[None])
    norm = hybrid.base.model.layers[layer].input_layernorm
    for _ in range(cfg.steps):
        idx = torch.randint(0, N, (cfg.batch_size,), generator=gen)
        h = norm(problem.x[idx])
        q = dsla.q_proj(h).view(len(idx), T, -1, hybrid.head_dim).transpose(1, 2)
        o = dsla.attend(q, problem.k[idx], problem.v[idx], cos, sin)[0]
        loss = normalized_mse(dsla.o_proj(o), problem.target[idx])
        gates.opt.zero_grad(set_to_none=True)
        qo.step(loss)  # backward + q/o update
        gates.opt.step()
        gates.sched.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=None, help="text dir (default: Python docs, fetched via apt-get)")
    p.add_argument("--layer", type=int, default=22)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--train-blocks", type=int, default=16)
    p.add_argument("--val-blocks", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--out", default=None)
    a = p.parse_args()
    tune_allocator()
    result = run(
        a.data or str(cached_python_docs()), a.layer, a.steps, a.train_blocks, a.val_blocks, a.variants.split(",")
    )
    text = json.dumps(result, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
