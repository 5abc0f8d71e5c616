"""Kernel benchmark: chunked dual-state DSLA vs the naive reference vs PyTorch SDPA causal attention.

dsla-serve bench kernel --seq-len 8192 --heads 9 --head-dim 64 --json
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsla_serve.bench.common import time_median
from dsla_serve.ops import chunk_dsla, naive_dsla, step_dsla
from dsla_serve.runtime import machine_info

NAIVE_MAX_LEN = 2048  # the per-token reference is timed only up to here


@torch.no_grad()
def bench_kernel(
    seq_len: int, heads: int = 9, head_dim: int = 64, batch: int = 1, repeats: int = 5, dtype: str = "float32"
) -> dict:
    """Median seconds of each implementation on one shape, and SDPA/DSLA ratios (> 1: DSLA faster)."""
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, heads, seq_len, head_dim)
    q, k, v = (torch.randn(shape, generator=gen).to(dt) for _ in range(3))
    g_far = (-0.01 * torch.rand(shape, generator=gen)).to(dt)
    g_close = (-torch.rand(shape, generator=gen)).to(dt)
    alpha = torch.zeros(heads, 2)
    chunk = time_median(lambda: chunk_dsla(q, k, v, g_far, g_close, alpha), repeats)
    sdpa = time_median(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), repeats)
    state = (torch.zeros(batch, heads, head_dim, head_dim), torch.zeros(batch, heads, head_dim, head_dim))
    one = [t[:, :, :1] for t in (q, k, v, g_far, g_close)]
    step = time_median(lambda: step_dsla(*one, alpha, initial_state=state), max(repeats, 20))
    # attention's decode step over seq_len cached keys, for contrast with the constant-size DSLA step
    attn_step = time_median(lambda: F.scaled_dot_product_attention(q[:, :, -1:], k, v), max(repeats, 20))
    result = {
        "shape": {"batch": batch, "heads": heads, "seq_len": seq_len, "head_dim": head_dim, "dtype": dtype},
        "chunk_dsla_s": chunk["median_s"],
        "sdpa_causal_s": sdpa["median_s"],
        "naive_dsla_s": None,
        "step_dsla_ms": 1000 * step["median_s"],
        "sdpa_decode_ms": 1000 * attn_step["median_s"],
        "speedup_vs_sdpa": sdpa["median_s"] / chunk["median_s"],
        "repeats": repeats,
        "machine": machine_info(),
    }
    if seq_len <= NAIVE_MAX_LEN:
        result["naive_dsla_s"] = time_median(lambda: naive_dsla(q, k, v, g_far, g_close, alpha), 1, 0)["median_s"]
    else:
        result["naive_note"] = f"naive reference timed only up to {NAIVE_MAX_LEN} tokens"
    return result
