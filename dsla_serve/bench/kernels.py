"""Kernel benchmark: chunked dual-state DSLA vs the naive reference vs PyTorch SDPA causal attention,
and the ways to run attention decode over a batch of cached sequences.

dsla-serve bench kernel --seq-len 8192 --heads 9 --head-dim 64 --window 32 --json
dsla-serve bench kernel --seq-len 4096 --decode-batch 8 --json   # + attention decode: per sequence vs padded
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsla_serve.bench.common import time_median
from dsla_serve.ops import chunk_dsla, naive_dsla, native, step_dsla
from dsla_serve.runtime import machine_info

NAIVE_MAX_LEN = 2048  # the per-token reference is timed only up to here


@torch.no_grad()
def bench_kernel(
    seq_len: int, heads: int = 9, head_dim: int = 64, batch: int = 1, repeats: int = 5, dtype: str = "float32",
    window: int = 0, decode_batch: int = 0,
) -> dict:  # fmt: skip
    """Median seconds of each implementation on one shape, and SDPA/DSLA ratios (> 1: DSLA faster)."""
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dt) for _ in range(3))
    g_far = (-0.01 * torch.rand(shape, generator=gen)).to(dt)
    g_close = (-torch.rand(shape, generator=gen)).to(dt)
    alpha = torch.zeros(heads, 2)
    beta = torch.zeros(heads) if window else None
    chunk = time_median(lambda: chunk_dsla(q, k, v, g_far, g_close, alpha, window=window, beta=beta), repeats)
    scan = None
    if native.available():  # the C++ prefill scan: what the engine runs for CPU inference
        scan = time_median(lambda: native.scan_dsla(q, k, v, g_far, g_close, alpha, window=window, beta=beta), repeats)
    sdpa = time_median(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)
    state = (torch.zeros(batch, heads, head_dim, head_dim), torch.zeros(batch, heads, head_dim, head_dim))
    one = [t[:, :, :1] for t in (q, k, v, g_far, g_close)]
    step = time_median(lambda: step_dsla(*one, alpha, initial_state=state), max(repeats, 20))
    # attention's decode step over seq_len cached keys, for contrast with the constant-size DSLA step
    attn_step = time_median(lambda: F.scaled_dot_product_attention(q[:, :, -1:], k, v), max(repeats, 20))
    result = {
        "shape": {
            "batch": batch,
            "heads": heads,
            "seq_len": seq_len,
            "head_dim": head_dim,
            "dtype": dtype,
            "window": window,
        },
        "chunk_dsla_s": chunk["median_s"],
        "scan_dsla_s": scan["median_s"] if scan else None,
        "sdpa_causal_s": sdpa["median_s"],
        "naive_dsla_s": None,
        "step_dsla_ms": 1000 * step["median_s"],
        "sdpa_decode_ms": 1000 * attn_step["median_s"],
        "speedup_vs_sdpa": sdpa["median_s"] / chunk["median_s"],
        "scan_speedup_vs_sdpa": sdpa["median_s"] / scan["median_s"] if scan else None,
        "repeats": repeats,
        "machine": machine_info(),
    }
    if decode_batch:
        result["decode_attention_ms"] = decode_attention(decode_batch, seq_len, heads, head_dim, max(repeats, 15))
    if seq_len <= NAIVE_MAX_LEN:
        kw = {"window": window, "beta": beta}
        result["naive_dsla_s"] = time_median(lambda: naive_dsla(q, k, v, g_far, g_close, alpha, **kw), 1, 0)["median_s"]
    else:
        result["naive_note"] = f"naive reference timed only up to {NAIVE_MAX_LEN} tokens"
    return result


@torch.no_grad()
def decode_attention(batch: int, context: int, heads: int, head_dim: int, repeats: int, kv_heads: int = 3) -> dict:
    """One attention decode step over ``batch`` sequences of different lengths (about ``context`` cached
    keys each), median ms: one SDPA per sequence with the group's query heads as rows (the engine's
    way), one per sequence with ``enable_gqa``, and one padded batched call with a length mask (which
    first copies the caches into a padded tensor, as it must each step)."""
    G = heads // kv_heads
    gen = torch.Generator().manual_seed(0)
    lens = [max(1, context - 37 * b) for b in range(batch)]
    keys = [torch.randn(kv_heads, n, head_dim, generator=gen) for n in lens]
    values = [torch.randn(kv_heads, n, head_dim, generator=gen) for n in lens]
    q = torch.randn(batch, heads, 1, head_dim, generator=gen)

    def rows():
        return [F.scaled_dot_product_attention(q[b].view(1, kv_heads, G, head_dim), keys[b][None], values[b][None])
                for b in range(batch)]  # fmt: skip

    def gqa():
        return [F.scaled_dot_product_attention(q[b : b + 1], keys[b][None], values[b][None], enable_gqa=True)
                for b in range(batch)]  # fmt: skip

    def padded():
        M = max(lens)
        kp, vp = torch.zeros(batch, kv_heads, M, head_dim), torch.zeros(batch, kv_heads, M, head_dim)
        for b in range(batch):
            kp[b, :, : lens[b]], vp[b, :, : lens[b]] = keys[b], values[b]
        mask = (torch.arange(M)[None, :] < torch.tensor(lens)[:, None])[:, None, None, :]
        return F.scaled_dot_product_attention(q.view(batch, kv_heads, G, head_dim), kp, vp, attn_mask=mask)

    out = {name: 1000 * time_median(fn, repeats)["median_s"] for name, fn in
           (("per_sequence_rows", rows), ("per_sequence_enable_gqa", gqa), ("padded_batch", padded))}  # fmt: skip
    return {"batch": batch, "context": context, **out}
