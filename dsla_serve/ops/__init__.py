"""Dual-state gated linear attention kernels: a naive reference, a chunked form and a decode step.

All three share one signature: ``(q, k, v, g_far, g_close, alpha, *, scale, normalize, eps,
initial_state, gain, window, ...) -> (o, (S_far, S_close))``.
"""

from dsla_serve.ops.chunk import DEFAULT_CHUNK, GATE_MIN, chunk_dsla, gate_floor, window_attention
from dsla_serve.ops.naive import StatePair, naive_dsla
from dsla_serve.ops.recurrent import step_dsla

__all__ = [
    "DEFAULT_CHUNK",
    "GATE_MIN",
    "StatePair",
    "chunk_dsla",
    "gate_floor",
    "naive_dsla",
    "step_dsla",
    "window_attention",
]
