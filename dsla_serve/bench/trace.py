"""Request traces for replay: the Azure LLM inference trace CSV, windows of it, and seeded synthetic traces.

A trace is a list of requests, each with an arrival time (seconds from the first request), a prompt
length and a generation length, in tokens. The Azure format (``TIMESTAMP,ContextTokens,GeneratedTokens``)
is read and written, so a synthetic trace replays through the same command as the real one:

dsla-serve replay --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv --start 0 --limit 40 --time-scale 4
dsla-serve replay --synthetic 50 --rate 0.5 --arrival bursty --mix paper --seed 0
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
AZURE_ATTRIBUTION = (
    "Azure LLM inference trace 2023 (Microsoft Azure Public Dataset, AzureLLMInferenceDataset2023), CC BY 4.0"
)
# The paper's augmented Azure mix (authors' poster): share of requests per prompt-length bucket.
PAPER_MIX = "0-2048:64.68,2048-4096:16.16,4096-8192:16.03,8192-16384:3.1"


class TraceError(ValueError):
    """A trace file or a trace option is malformed; the message names the file and line."""


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float  # seconds after the first request of the trace (or window)
    prompt_tokens: int
    output_tokens: int
    line: int = 0  # line in the source CSV (1 = header), 0 for synthetic requests


@dataclass
class Trace:
    requests: list[TraceRequest]
    source: str  # file path, or "synthetic"
    attribution: str | None = None
    transforms: list[str] = field(default_factory=list)  # what was done to the source, in order

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    def stats(self) -> dict:
        """Counts, rates and length means: what a report needs to describe the replayed load."""
        p = np.array([r.prompt_tokens for r in self.requests], dtype=float)
        o = np.array([r.output_tokens for r in self.requests], dtype=float)
        n = len(self.requests)
        return {
            "requests": n,
            "duration_s": self.duration_s,
            "rate_per_s": (n - 1) / self.duration_s if n > 1 and self.duration_s > 0 else None,
            "prompt_tokens_mean": float(p.mean()) if n else 0.0,
            "prompt_tokens_max": int(p.max()) if n else 0,
            "output_tokens_mean": float(o.mean()) if n else 0.0,
            "output_tokens_max": int(o.max()) if n else 0,
        }

    def describe(self) -> dict:
        return {"source": self.source, "attribution": self.attribution, "transforms": self.transforms} | self.stats()

    def to_dict(self) -> dict:
        return self.describe() | {"requests_list": [asdict(r) for r in self.requests]}


def parse_timestamp(text: str) -> datetime:
    """Azure timestamps carry 7 fractional digits, which datetime does not take: cut to microseconds."""
    head, dot, frac = text.strip().partition(".")
    return datetime.fromisoformat(head + (dot + frac[:6] if dot else ""))


def read_azure(path: str | Path) -> Trace:
    """Read an Azure LLM inference trace CSV; any malformed row raises TraceError naming its line."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {path} does not exist")
    rows: list[tuple[datetime, int, int, int]] = []
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != list(COLUMNS):
            raise TraceError(f"{path}:1: expected the header {','.join(COLUMNS)}, got {','.join(header or [])!r}")
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 3:
                raise TraceError(f"{path}:{line}: expected 3 fields ({','.join(COLUMNS)}), got {len(row)}: {row}")
            try:
                ts = parse_timestamp(row[0])
            except ValueError:
                raise TraceError(f"{path}:{line}: TIMESTAMP {row[0]!r} is not a date-time") from None
            counts = []
            for name, text in zip(COLUMNS[1:], row[1:], strict=True):
                try:
                    value = int(text)
                except ValueError:
                    raise TraceError(f"{path}:{line}: {name} {text!r} is not an integer") from None
                if value < 0:
                    raise TraceError(f"{path}:{line}: {name} {value} is negative")
                counts.append(value)
            rows.append((ts, counts[0], counts[1], line))
    if not rows:
        raise TraceError(f"{path}: no requests after the header")
    rows.sort(key=lambda r: r[0])  # the published trace is sorted; a merged one may not be
    t0 = rows[0][0]
    reqs = [TraceRequest((ts - t0).total_seconds(), p, o, line) for ts, p, o, line in rows]
    attribution = AZURE_ATTRIBUTION if "Azure" in path.name else None
    return Trace(reqs, str(path), attribution)


def write_azure(trace: Trace, path: str | Path, epoch: datetime = datetime(2024, 1, 1)) -> None:
    """Write a trace in the Azure CSV format (synthetic traces replay through the same reader)."""
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in trace.requests:
            ts = epoch + timedelta(seconds=r.arrival_s)
            w.writerow([ts.strftime("%Y-%m-%d %H:%M:%S.%f"), r.prompt_tokens, r.output_tokens])


def window(trace: Trace, start: int = 0, limit: int | None = None) -> Trace:
    """Requests start .. start+limit-1 (by arrival order), re-timed so the first arrives at 0."""
    if start < 0 or (limit is not None and limit < 1):
        raise TraceError(f"window needs start >= 0 and limit >= 1, got start={start}, limit={limit}")
    if start >= len(trace):
        raise TraceError(f"--start {start} is past the end of the trace ({len(trace)} requests)")
    picked = trace.requests[start : None if limit is None else start + limit]
    t0 = picked[0].arrival_s
    reqs = [replace(r, arrival_s=r.arrival_s - t0) for r in picked]
    return replace(trace, requests=reqs, transforms=[*trace.transforms, f"window start={start} limit={limit}"])


def scale_time(trace: Trace, factor: float) -> Trace:
    """Multiply every arrival time by ``factor``: > 1 stretches the trace (less load), < 1 compresses it."""
    if not factor > 0 or math.isinf(factor):
        raise TraceError(f"--time-scale must be a positive number, got {factor}")
    reqs = [replace(r, arrival_s=r.arrival_s * factor) for r in trace.requests]
    return replace(trace, requests=reqs, transforms=[*trace.transforms, f"time x{factor:g}"])


def all_at_once(trace: Trace) -> Trace:
    """Every request arriving at 0: a server's capacity on the trace's mix of lengths."""
    reqs = [replace(r, arrival_s=0.0) for r in trace.requests]
    return replace(trace, requests=reqs, transforms=[*trace.transforms, "all at once"])


def utilization_scale(trace: Trace, capacity_rps: float, utilization: float) -> float:
    """The ``scale_time`` factor that makes the trace's mean arrival rate ``utilization`` times a
    server's capacity (requests per second on these requests): utilisation = arrival rate / service rate."""
    if not capacity_rps > 0 or not utilization > 0:
        raise TraceError(f"need a positive capacity and utilisation, got {capacity_rps} req/s and {utilization}")
    rate = trace.stats()["rate_per_s"]
    if not rate:
        raise TraceError("scaling to a utilisation needs at least two requests arriving at different times")
    return rate / (utilization * capacity_rps)


def cap_lengths(
    trace: Trace, context: int, max_prompt: int | None = None, max_output: int | None = None, min_prompt: int = 1
) -> Trace:
    """Clip lengths so every request fits the model: prompt + output <= context, each under its cap.

    Prompts are clipped first (min_prompt..max_prompt), then outputs to what the context leaves. The
    arrival pattern is untouched, so the trace keeps its shape in time.
    """
    if context < 2 or min_prompt < 1 or min_prompt >= context:
        raise TraceError(f"need 1 <= min_prompt < context, got min_prompt={min_prompt}, context={context}")
    p_cap = min(max_prompt or context - 1, context - 1)
    reqs, clipped = [], 0
    for r in trace.requests:
        p = min(max(r.prompt_tokens, min_prompt), p_cap)
        o = max(1, min(r.output_tokens, max_output or r.output_tokens, context - p))
        clipped += (p, o) != (r.prompt_tokens, r.output_tokens)
        reqs.append(replace(r, prompt_tokens=p, output_tokens=o))
    note = f"cap context={context} prompt<={p_cap} output<={max_output or 'context'} ({clipped} requests changed)"
    return replace(trace, requests=reqs, transforms=[*trace.transforms, note])


def parse_mix(text: str) -> list[tuple[int, int, float]]:
    """'0-2048:64.68,2048-4096:16.16' (or 'paper') -> [(lo, hi, share)], shares normalised to sum 1."""
    text = PAPER_MIX if text == "paper" else text
    buckets = []
    for part in text.split(","):
        try:
            span, weight = part.split(":")
            lo, hi = (int(x) for x in span.split("-"))
            w = float(weight)
        except ValueError:
            raise TraceError(f"bad bucket {part!r}: expected LO-HI:WEIGHT like 2048-4096:16.16") from None
        if not 0 <= lo < hi or w < 0:
            raise TraceError(f"bad bucket {part!r}: need 0 <= LO < HI and WEIGHT >= 0")
        buckets.append((lo, hi, w))
    total = sum(w for *_, w in buckets)
    if total <= 0:
        raise TraceError(f"bucket weights of {text!r} sum to zero")
    return [(lo, hi, w / total) for lo, hi, w in buckets]


def arrivals(n: int, rate: float, kind: str, rng: np.random.Generator, burstiness: float = 4.0) -> np.ndarray:
    """n arrival times with mean rate ``rate``/s, the first at 0.

    poisson: exponential gaps (coefficient of variation 1). bursty: gamma gaps with the same mean and
    coefficient of variation sqrt(burstiness), so requests come in clumps separated by long lulls.
    """
    if n < 1 or not rate > 0:
        raise TraceError(f"synthetic traces need n >= 1 and rate > 0, got n={n}, rate={rate}")
    if kind == "poisson":
        gaps = rng.exponential(1 / rate, n - 1)
    elif kind == "bursty":
        if burstiness <= 1:
            raise TraceError(f"burstiness must be > 1 (1 is Poisson), got {burstiness}")
        shape = 1 / burstiness  # gamma CV^2 = 1 / shape
        gaps = rng.gamma(shape, 1 / (rate * shape), n - 1)
    else:
        raise TraceError(f"arrival kind must be 'poisson' or 'bursty', got {kind!r}")
    return np.concatenate([[0.0], np.cumsum(gaps)])


def synthetic(
    n: int, rate: float, arrival: str = "poisson", mix: str = "paper", output_mean: float = 211.0,
    seed: int = 0, burstiness: float = 4.0,
) -> Trace:  # fmt: skip
    """A seeded synthetic trace: arrivals as in ``arrivals``, prompt lengths uniform inside a bucket drawn
    from ``mix``, generation lengths geometric with mean ``output_mean`` (the Azure conversation mean is 211)."""
    if output_mean < 1:
        raise TraceError(f"output_mean must be >= 1, got {output_mean}")
    rng = np.random.default_rng(seed)
    buckets = parse_mix(mix)
    times = arrivals(n, rate, arrival, rng, burstiness)
    which = rng.choice(len(buckets), size=n, p=[w for *_, w in buckets])
    prompts = [int(rng.integers(max(buckets[b][0], 1), buckets[b][1])) for b in which]
    outputs = rng.geometric(1 / output_mean, n)
    reqs = [TraceRequest(float(t), p, int(o)) for t, p, o in zip(times, prompts, outputs, strict=True)]
    desc = f"synthetic n={n} rate={rate:g}/s arrival={arrival} mix={mix} output_mean={output_mean:g} seed={seed}"
    return Trace(reqs, "synthetic", None, [desc])


def bucket_shares(trace: Trace, mix: str) -> list[float]:
    """Share of the trace's requests whose prompt length falls in each bucket of ``mix``."""
    buckets = parse_mix(mix)
    n = max(len(trace), 1)
    return [sum(lo <= r.prompt_tokens < hi for r in trace.requests) / n for lo, hi, _ in buckets]
