"""Precision modes of the engine: decode speed and perplexity change of bfloat16, int8 and int4 weights
against float32, measured in one run so the default can be chosen by measurement.

    dsla-serve bench precision --contexts 512,4096 --levels 0,1 --blocks 2 --json

Every mode is loaded side by side; decode steps take turns mode by mode (outside load hits them
alike). Perplexity: held-out blocks of the multi-domain corpus (``data corpus``) when it is in the
cache, else of the Python docs, at each level, as a ratio to float32 at the same level; once of a
full forward (the prefill path) and once of teacher-forced decode through the cache (the decode
path, whose kernels differ: the int4 GEMV quantises activations).
"""

from __future__ import annotations

import copy
import time

import torch

from dsla_serve.bench.engine import step_stats
from dsla_serve.bench.prompts import load_text
from dsla_serve.eval.perplexity import perplexity
from dsla_serve.generate import prefill
from dsla_serve.model import HybridCache
from dsla_serve.model.pretrained import load_hybrid
from dsla_serve.runtime import machine_info

DTYPES = ("float32", "bfloat16", "int8", "int4")
DECODE_PPL_PREFIX = 32  # teacher-forced decode starts after this many prefilled tokens
LIMITS = {"bfloat16": 1.01, "int8": 1.02}  # the largest perplexity ratio to float32 each mode may cost


def held_out_blocks(tokenizer, blocks: int, data: str | None = None, seq_len: int = 1024) -> torch.Tensor:
    """``blocks`` held-out blocks per domain of a corpus ``data`` (default: the cache's corpus, else the
    Python docs); a plain text source gives ``blocks`` blocks."""
    from dsla_serve.distill.corpus import default_corpus_dir
    from dsla_serve.distill.data import cached_python_docs, corpus_val_blocks, is_corpus, load_data

    if data is None:
        data = str(default_corpus_dir()) if is_corpus(default_corpus_dir()) else str(cached_python_docs())
    if is_corpus(data):
        return torch.cat(list(corpus_val_blocks(data, tokenizer, seq_len, blocks).values()))
    return load_data(data, tokenizer, seq_len, max_train_blocks=1).val[:blocks]


@torch.no_grad()
def decode_perplexity(hybrid, blocks: torch.Tensor, plan: list[int], tokens: int) -> float:
    """Perplexity of teacher-forced decode, one token per step through the cache: the path decode
    runs (few-row kernels such as the int4 GEMV), which a full-sequence forward does not take."""
    nll, count = 0.0, 0
    for ids in blocks.split(1):
        n = min(tokens, ids.shape[1] - DECODE_PPL_PREFIX - 1)
        cache = HybridCache([hybrid.new_cache(plan, DECODE_PPL_PREFIX + n + 1)])
        logits = prefill(hybrid, ids[:, :DECODE_PPL_PREFIX], cache)
        for t in range(DECODE_PPL_PREFIX, DECODE_PPL_PREFIX + n):
            nll -= torch.log_softmax(logits.reshape(-1, logits.shape[-1])[-1].float(), -1)[ids[0, t]].item()
            logits, _ = hybrid(ids[:, t : t + 1], cache=cache, logits_for="last")
            count += 1
    return float(torch.tensor(nll / count).exp())


@torch.no_grad()
def run(
    model: str | None = None, weights: str | None = "auto", dtypes: tuple[str, ...] = DTYPES,
    contexts: tuple[int, ...] = (512, 4096), levels: tuple[float, ...] = (0.0, 1.0), blocks: int = 2,
    decode_tokens: int = 16, data: str | None = None, seq_len: int = 1024, decode_ppl_blocks: int = 4,
    decode_ppl_tokens: int = 128, log=print,
) -> dict:  # fmt: skip
    engines = {d: load_hybrid(model, weights, d) for d in dtypes}
    _, tok, info = engines[dtypes[0]]
    rows: list[dict] = []
    val = held_out_blocks(tok, blocks, data, seq_len)
    ppl: dict[tuple[str, float], float] = {}
    dppl: dict[tuple[str, float], float] = {}
    for d, (hybrid, _, _) in engines.items():
        for level in levels:
            ppl[d, level] = perplexity(hybrid, val, info.layers_for(level))
            dppl[d, level] = decode_perplexity(
                hybrid, val[:decode_ppl_blocks], info.layers_for(level), decode_ppl_tokens
            )
        log(f"{d}: perplexity done")
    corpus = tok(load_text(), add_special_tokens=False).input_ids
    for context in contexts:
        ids = torch.tensor([(corpus * (1 + context // len(corpus)))[:context]])
        caches, tokens, times = {}, {}, {}
        for d, (hybrid, _, _) in engines.items():
            base = HybridCache([hybrid.new_cache([], context + decode_tokens + 1)])
            first = prefill(hybrid, ids, base).argmax(-1)[:, None]
            for level in levels:  # every level from one attention prefill, by folding (exact)
                cache = copy.deepcopy(base)
                hybrid.fold_to_dsla(cache[0], info.layers_for(level))
                caches[d, level], tokens[d, level], times[d, level] = cache, first, []
        for _ in range(decode_tokens):
            for key, cache in caches.items():
                hybrid = engines[key[0]][0]
                t = time.perf_counter()
                logits, _ = hybrid(tokens[key], cache=cache, logits_for="last")
                tokens[key] = logits[:, -1].argmax(-1)[:, None]
                times[key].append(time.perf_counter() - t)
        for (d, level), ts in times.items():
            rows.append({"dtype": d, "level": level, "context": context, **step_stats(ts, 1),
                         "ppl": ppl[d, level], "ppl_ratio_to_float32": ppl[d, level] / ppl[dtypes[0], level],
                         "decode_ppl": dppl[d, level],
                         "decode_ppl_ratio_to_float32": dppl[d, level] / dppl[dtypes[0], level]})  # fmt: skip
        log(f"context {context}: decode done")
    return {"suite": "precision", "rows": rows, "val_blocks": len(val), "choice": choose(rows),
            "limits": LIMITS, "weights": weights, "machine": machine_info()}  # fmt: skip


def choose(rows: list[dict]) -> str:
    """The mode with the lowest median decode time over every measured point whose perplexity — of a
    full forward and, where measured, of teacher-forced decode — stays within its limit (float32 always
    qualifies; int4 has no limit of its own and is chosen only within int8's)."""
    by_mode: dict[str, list[dict]] = {}
    for r in rows:
        by_mode.setdefault(r["dtype"], []).append(r)
    ok = {
        d: rs for d, rs in by_mode.items()
        if d == "float32" or all(
            max(r["ppl_ratio_to_float32"], r.get("decode_ppl_ratio_to_float32", 1.0)) <= LIMITS.get(d, LIMITS["int8"])
            for r in rs
        )
    }  # fmt: skip
    return min(ok, key=lambda d: sum(r["ms_per_token"] for r in ok[d]))
