"""Sampling and single-request generation (``dsla-serve generate``); the server's runner reuses ``sample``."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from dsla_serve.model import HybridCache, HybridModel

# NOTE(decisions): prompts are prefilled in chunks of this many tokens (bounded activation memory, same
# result). A chunk that continues a cache needs a lower-right causal mask, which SDPA runs ~1.5x slower
# than one causal call (8192 tokens, int8: 7.4-8.9 s in 2048-token chunks vs 5.0-5.9 s at once), so
# the chunk is the default model's whole context; ~0.3 GB of activations at 8192 tokens.
PREFILL_CHUNK = 8192


@dataclass
class SamplingParams:
    max_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample(logits: Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None) -> Tensor:
    """Next tokens (B,) from logits (B, V): greedy at temperature 0, else nucleus sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_p, idx = probs.sort(-1, descending=True)
        cut = sorted_p.cumsum(-1) - sorted_p > top_p  # drop tokens once the mass before them exceeds top_p
        sorted_p = sorted_p.masked_fill(cut, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def find_stop(text: str, stop: list[str]) -> int:
    """Index where the first stop string starts in text, or -1."""
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(hits) if hits else -1


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    prefill_s: float
    decode_ms_per_token: float
    cache_bytes: int
    dsla_layers: list[int]
    finish_reason: str  # "stop" or "length"

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def prefill(model: HybridModel, ids: Tensor, cache: HybridCache, chunk: int = PREFILL_CHUNK) -> Tensor:
    """Run ids (B, T) through the model in chunks, filling the cache; returns last-position logits (B, V)."""
    logits = None
    for start in range(0, ids.shape[1], chunk):
        logits, _ = model(ids[:, start : start + chunk], cache=cache, logits_for="last")
    return logits[:, -1]


@torch.no_grad()
def generate(
    model: HybridModel, tokenizer, prompt_ids: list[int], dsla_layers: list[int], params: SamplingParams
) -> GenerationResult:
    """Prefill then decode one sequence, timing both."""
    generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
    cache = HybridCache([model.new_cache(dsla_layers, capacity=len(prompt_ids) + params.max_tokens)])
    ids = torch.tensor([prompt_ids], device=model.device)
    t0 = time.perf_counter()
    logits = prefill(model, ids, cache)
    prefill_s = time.perf_counter() - t0
    eos = set() if params.ignore_eos else {tokenizer.eos_token_id}
    out: list[int] = []
    finish = "length"
    t1 = time.perf_counter()
    while True:
        token = int(sample(logits, params.temperature, params.top_p, generator)[0])
        if token in eos:
            finish = "stop"
            break
        out.append(token)
        if params.stop and find_stop(tokenizer.decode(out, skip_special_tokens=True), params.stop) >= 0:
            finish = "stop"
            break
        if len(out) >= params.max_tokens:
            break
        logits, _ = model(torch.tensor([[token]], device=model.device), cache=cache, logits_for="last")
        logits = logits[:, -1]
    decode_s = time.perf_counter() - t1
    text = tokenizer.decode(out, skip_special_tokens=True)
    cut = find_stop(text, params.stop)
    if cut >= 0:
        text = text[:cut]
    return GenerationResult(
        text=text,
        prompt_tokens=len(prompt_ids),
        completion_tokens=len(out),
        prefill_s=prefill_s,
        decode_ms_per_token=1000 * decode_s / max(len(out), 1),
        cache_bytes=cache[0].nbytes(),
        dsla_layers=sorted(dsla_layers),
        finish_reason=finish,
    )
