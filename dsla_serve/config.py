"""Validated configuration of the DSLA layers; saved in every checkpoint manifest."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

VARIANTS = ("dsla", "gla")
DTYPE_HELP = (
    '"auto" (where the CPU has bfloat16 instructions: int4 for a model whose GGUF matrices are all Q4_1, '
    "else int8; float32 elsewhere; measured: docs/bench/precision.json), float32, bfloat16, int8 or int4."
)
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class DSLAConfig:
    """How a DSLA layer is built from the attention layer it replaces.

    NOTE(decisions): ``rope`` and ``normalize`` defaults were chosen by measurement
    (``python -m dsla_serve.distill.ablation``; figures in README "Design decisions").
    """

    variant: str = "dsla"  # "dsla": two states; "gla": single-state ablation
    rope: bool = False  # apply the attention's rotary embedding to q and k inside DSLA (measured: better off)
    normalize: bool = True  # RMS-normalise each state's read-out (with a learned per-channel gain)
    output_gate: bool = True  # scale the output per channel by 2·sigmoid(W q + b), from the token's own query
    gate_normalizer: float = 16.0  # g = logsigmoid(W [k; v] + b) / gate_normalizer, clamped at GATE_MIN
    far_half_life: tuple[float, float] = (256.0, 8192.0)  # initial half-lives (tokens) of the history state
    close_half_life: tuple[float, float] = (1.0, 32.0)  # ... and of the recency state
    eps: float = 1e-6
    chunk_size: int = 64
    window: int = 0  # last W tokens attended exactly (softmax with RoPE); 0 = the paper's DSLA
    window_logit: float = 0.0  # initial mixing logit of the window's read-out (states start at 0 each)
    adapter_rank: int = 0  # rank of the low-rank adapters of the state path; 0 = none
    adapters: str = "qkvo"  # which of q, k, v, o get one (when adapter_rank > 0)

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("far_half_life", "close_half_life"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be 0 < low <= high, got {(lo, hi)}")
            object.__setattr__(self, name, (float(lo), float(hi)))
        if self.gate_normalizer <= 0:
            raise ValueError(f"gate_normalizer must be > 0, got {self.gate_normalizer}")
        if self.chunk_size < 1 or self.chunk_size > 64:
            raise ValueError(f"chunk_size must be in [1, 64] (the kernel's stability bound), got {self.chunk_size}")
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")
        if self.adapter_rank < 0 or set(self.adapters) - set("qkvo"):
            raise ValueError(
                f"adapter_rank must be >= 0 and adapters a subset of 'qkvo', got {self.adapter_rank}, {self.adapters!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DSLAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown DSLA config fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
