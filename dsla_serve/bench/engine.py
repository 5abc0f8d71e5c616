"""Engine speed and memory: prefill, decode and cache bytes per sequence, our hybrid engine at each
conversion level against Hugging Face ``generate`` on the same model (and llama.cpp on the same GGUF).

dsla-serve bench prefill --contexts 512,1024,2048,4096,8192 --batches 1,2,4,8 --json
dsla-serve bench decode --contexts 8192 --levels 0,0.5,1 --json
dsla-serve bench memory --json
dsla-serve bench all --out runs/bench

Every figure is a median of several timed runs (decode: of the per-token step times of one
generation); ratios are computed within one run, against our engine at level 0 on the same point.
The grid is a "cross" by default (every context at batch 1, every batch at one context): the full
product at 8192 x 8 is hours on a 2-core CPU. Inputs are windows of real text.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import asdict, dataclass, field

import torch
from transformers.generation.streamers import BaseStreamer

from dsla_serve.bench.common import time_median
from dsla_serve.bench.prompts import load_text
from dsla_serve.generate import prefill
from dsla_serve.model import HybridCache
from dsla_serve.model.loader import DTYPES, embedded_gguf, load_base
from dsla_serve.model.pretrained import load_hybrid
from dsla_serve.runtime import machine_info

log = logging.getLogger(__name__)

OURS, HF, LLAMACPP = "dsla-serve", "hf-generate", "llama.cpp"


@dataclass
class BenchSettings:
    contexts: list[int] = field(default_factory=lambda: [512, 1024, 2048, 4096, 8192])
    batches: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    levels: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    repeats: int = 3
    warmup: int = 1
    decode_tokens: int = 32
    grid: str = "cross"  # cross: contexts at batch 1 + batches at batch_context; full: every pair
    batch_context: int = 1024
    dtype: str = "float32"
    model: str | None = None
    weights: str | None = "auto"
    baselines: list[str] = field(default_factory=lambda: [HF, LLAMACPP])

    def __post_init__(self) -> None:
        if self.grid not in ("cross", "full"):
            raise ValueError(f"grid must be 'cross' or 'full', got {self.grid!r}")
        if not self.contexts or min(self.contexts) < 2 or not self.batches or min(self.batches) < 1:
            raise ValueError(f"contexts must be >= 2 and batches >= 1, got {self.contexts}, {self.batches}")
        if any(not 0 <= x <= 1 for x in self.levels) or 0.0 not in self.levels:
            raise ValueError(f"levels must be in [0, 1] and include 0 (the reference), got {self.levels}")
        if self.repeats < 1 or self.decode_tokens < 2:
            raise ValueError("repeats must be >= 1 and decode_tokens >= 2")
        unknown = set(self.baselines) - {HF, LLAMACPP}
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}: choose from {HF}, {LLAMACPP}")

    def points(self) -> list[tuple[int, int]]:
        """(context, batch) pairs to measure."""
        if self.grid == "full":
            return list(itertools.product(self.contexts, self.batches))
        pts = [(c, 1) for c in self.contexts] + [(self.batch_context, b) for b in self.batches if b > 1]
        return list(dict.fromkeys(pts))


class StepClock(BaseStreamer):
    """Records when generate hands over each step's tokens (the first put is the prompt)."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


class Engines:
    """Our hybrid engine and the outside baselines, loaded once, with inputs cut from real text."""

    def __init__(self, s: BenchSettings):
        self.s = s
        self.model, self.tok, self.info = load_hybrid(s.model, s.weights, s.dtype)
        self.notes: list[str] = []
        if self.info.undistilled:
            self.notes.append(f"DSLA layers {self.info.undistilled} are undistilled (speed and memory are unaffected)")
        self.corpus = self.tok(load_text(), add_special_tokens=False).input_ids
        self.hf = None
        if HF in s.baselines:
            hf_dtype = s.dtype if s.dtype in DTYPES else "float32"
            if hf_dtype != s.dtype:
                self.notes.append(f"Hugging Face runs in {hf_dtype}: it has no {s.dtype} mode")
            self.hf = load_base(s.model, hf_dtype).model
        self.llama = None
        if LLAMACPP in s.baselines:
            self.llama = self.load_llamacpp()

    def load_llamacpp(self):
        if self.s.model is not None and not str(self.s.model).endswith(".gguf"):
            self.notes.append("llama.cpp skipped: it needs a .gguf --model (or the embedded default)")
            return None
        try:
            from llama_cpp import Llama
        except ImportError:
            self.notes.append("llama.cpp skipped: llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
            return None
        path = str(self.s.model or embedded_gguf())
        n_ctx = max(self.s.contexts) + self.s.decode_tokens + 8
        llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=torch.get_num_threads(), verbose=False)
        self.notes.append(f"llama.cpp runs the GGUF file as stored ({path.rsplit('/', 1)[-1]}), batch 1 only")
        return llm

    def ids(self, context: int, batch: int) -> torch.Tensor:
        """(batch, context) token ids: windows of the prompt text at different offsets."""
        corpus = self.corpus * (1 + (context * batch) // len(self.corpus))
        step = max(1, (len(corpus) - context) // batch)
        return torch.tensor([corpus[b * step : b * step + context] for b in range(batch)])

    def layers(self, level: float) -> list[int]:
        return self.info.layers_for(level)


def row(suite: str, engine: str, level: float | None, context: int, batch: int, **kw) -> dict:
    return {"suite": suite, "engine": engine, "level": level, "context": context, "batch": batch} | kw


@torch.no_grad()
def bench_prefill(e: Engines) -> list[dict]:
    """Seconds from prompt to first token (prefill + one sampling step), per point and engine."""
    s, rows = e.s, []
    for context, batch in s.points():
        ids = e.ids(context, batch)
        for level in s.levels:
            plan = e.layers(level)

            def run(plan=plan, ids=ids, context=context, batch=batch) -> None:
                cache = HybridCache([e.model.new_cache(plan, context + 1) for _ in range(batch)])
                prefill(e.model, ids, cache).argmax(-1)

            t = time_median(run, s.repeats, s.warmup)
            rows.append(row("prefill", OURS, level, context, batch, **t, tokens_per_s=batch * context / t["median_s"]))
        if e.hf is not None:
            t = time_median(
                lambda ids=ids: e.hf.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False
                ),
                s.repeats,
                s.warmup,
            )
            rows.append(row("prefill", HF, 0.0, context, batch, **t, tokens_per_s=batch * context / t["median_s"]))
        if e.llama is not None and batch == 1:
            tokens = ids[0].tolist()

            def run_llama(tokens=tokens) -> None:
                e.llama.reset()
                e.llama.eval(tokens)

            t = time_median(run_llama, s.repeats, s.warmup)
            rows.append(row("prefill", LLAMACPP, 0.0, context, 1, **t, tokens_per_s=context / t["median_s"]))
        log.info("prefill context=%d batch=%d done", context, batch)
    return add_ratios(rows)


def step_stats(times: list[float], batch: int) -> dict:
    times = sorted(times)
    med = times[len(times) // 2]
    return {"median_s": med, "times_s": times, "ms_per_token": 1000 * med, "tokens_per_s": batch / med}


@torch.no_grad()
def bench_decode(e: Engines) -> list[dict]:
    """Per-token decode latency after a prompt of ``context`` tokens (median over the steps of one
    generation of ``decode_tokens`` tokens), and the cache bytes per sequence it held."""
    s, rows = e.s, []
    k = s.decode_tokens
    for context, batch in s.points():
        ids = e.ids(context, batch)
        for level in s.levels:
            plan = e.layers(level)
            cache = HybridCache([e.model.new_cache(plan, context + k + 1) for _ in range(batch)])
            token = prefill(e.model, ids, cache).argmax(-1)[:, None]
            times = []
            for _ in range(k):
                t = time.perf_counter()
                logits, _ = e.model(token, cache=cache, logits_for="last")
                token = logits[:, -1].argmax(-1)[:, None]
                times.append(time.perf_counter() - t)
            rows.append(row("decode", OURS, level, context, batch, **step_stats(times, batch),
                            cache_bytes_per_seq=cache[0].nbytes()))  # fmt: skip
        if e.hf is not None:
            clock = StepClock()
            e.hf.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=k + 1, min_new_tokens=k + 1,
                do_sample=False, streamer=clock,
            )  # fmt: skip
            steps = [b - a for a, b in itertools.pairwise(clock.stamps[1:])]
            rows.append(row("decode", HF, 0.0, context, batch, **step_stats(steps, batch)))
        if e.llama is not None and batch == 1:
            e.llama.reset()
            e.llama.eval(ids[0].tolist())
            times = []
            for token in e.corpus[:k]:
                t = time.perf_counter()
                e.llama.eval([token])
                times.append(time.perf_counter() - t)
            rows.append(row("decode", LLAMACPP, 0.0, context, 1, **step_stats(times, 1)))
        log.info("decode context=%d batch=%d done", context, batch)
    return add_ratios(rows)


@torch.no_grad()
def bench_memory(e: Engines) -> list[dict]:
    """Cache bytes one sequence holds after a real prefill of each context, per level, against the
    engine's own per-token formula and Hugging Face's DynamicCache for the same prompt."""
    s, rows = e.s, []
    for context in s.contexts:
        ids = e.ids(context, 1)
        for level in s.levels:
            plan = e.layers(level)
            cache = HybridCache([e.model.new_cache(plan, context)])
            prefill(e.model, ids, cache)
            seq = cache[0]
            formula = e.model.cache_bytes_per_token(plan) * context + e.model.state_bytes(plan)
            rows.append(row("memory", OURS, level, context, 1, bytes=seq.nbytes(), kv_bytes=seq.kv_bytes(),
                            state_bytes=seq.state_bytes(), formula_bytes=formula))  # fmt: skip
        if e.hf is not None:
            out = e.hf(ids, use_cache=True, logits_to_keep=1)
            kv = sum(t.nbytes for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
            rows.append(row("memory", HF, 0.0, context, 1, bytes=kv, kv_bytes=kv, state_bytes=0))
    return add_ratios(rows, key="bytes")


def add_ratios(rows: list[dict], key: str = "median_s") -> list[dict]:
    """Each row's ratio to our engine at level 0 on the same point: speed-up for times (> 1: faster
    than all-attention), fraction for bytes (< 1: smaller)."""
    ref = {(r["context"], r["batch"]): r[key] for r in rows if r["engine"] == OURS and r["level"] == 0.0}
    for r in rows:
        base = ref.get((r["context"], r["batch"]))
        if base:
            r["vs_ours_level0"] = base / r[key] if key == "median_s" else r[key] / base
    return rows


SUITES = {"prefill": bench_prefill, "decode": bench_decode, "memory": bench_memory}


def run_suites(names: list[str], s: BenchSettings) -> dict:
    """Load the engines once, run the named suites, return one JSON-ready result."""
    t0 = time.perf_counter()
    e = Engines(s)
    result: dict = {"settings": asdict(s), "machine": machine_info(), "model": e.info.model}
    result |= {"dsla_weights": e.info.weights, "order": e.info.order, "order_source": e.info.order_source}
    for name in names:
        result[name] = SUITES[name](e)
    result["notes"] = e.notes
    result["elapsed_s"] = time.perf_counter() - t0
    return result
