"""Engine speed and memory: prefill, decode and cache bytes per sequence, our hybrid engine at each
conversion level against Hugging Face ``generate`` on the same model (and llama.cpp on the same GGUF).

dsla-serve bench prefill --contexts 512,1024,2048,4096,8192 --batches 1,2,4,8 --json
dsla-serve bench decode --contexts 8192 --levels 0,0.5,1 --json
dsla-serve bench memory --json
dsla-serve bench all --out runs/bench

Every figure is a median of several timed runs (decode: of the per-token step times of one
generation); ratios are computed within one run, against our engine at level 0 on the same point.
The grid is a "cross" by default (every context at batch 1 at every level, every batch at one
context at ``batch_levels``): the full product at 8192 x 8 is hours on a 2-core CPU. Prefill points
of ``single_run_tokens`` tokens or more (context x batch) are timed once: an 8192-token prefill is a
minute or more here, and one run of it varies far less than short ones do. Inputs are windows of real text.

Decode prefills each point once, all-attention, and reaches every level by folding the KV caches of
the level's layers into DSLA states (the in-flight conversion the server does: exact, and far
cheaper than one prefill per level); Hugging Face decodes from a cache prefilled the same way. Every
batch size and level of a context takes turns step by step, so their caches are held at once (with
``grid="full"`` at long contexts, the sum over the batch sizes).
"""

from __future__ import annotations

import copy
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial

import torch
from transformers.generation.streamers import BaseStreamer

from dsla_serve.bench.common import WARM_UP_S, time_interleaved
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
    contexts: list[int] = field(default_factory=lambda: [512, 2048, 8192])
    batches: list[int] = field(default_factory=lambda: [1, 8])
    levels: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    batch_levels: list[float] = field(default_factory=lambda: [0.0, 0.5])  # levels at batch > 1 points
    repeats: int = 3
    warmup: int = 0  # untimed runs per prefill point (our decode warm-up and one HF generate always run first)
    warm_up_s: float = WARM_UP_S  # seconds of decoding before any timing (NOTE in common.py)
    single_run_tokens: int = 8192  # prefill points of this many tokens (context x batch) or more: one run
    memory_measured_max: int = 2048  # memory: real prefills up to this context, the checked formula beyond
    decode_tokens: int = 16
    grid: str = "cross"  # cross: contexts at batch 1 + batches at batch_context; full: every pair
    batch_context: int = 1024
    dtype: str = "auto"
    model: str | None = None
    weights: str | None = "auto"
    baselines: list[str] = field(default_factory=lambda: [HF])

    def __post_init__(self) -> None:
        from dsla_serve.model.pretrained import resolve_dtype

        self.dtype = resolve_dtype(self.dtype, self.model)
        if self.grid not in ("cross", "full"):
            raise ValueError(f"grid must be 'cross' or 'full', got {self.grid!r}")
        if not self.contexts or min(self.contexts) < 2 or not self.batches or min(self.batches) < 1:
            raise ValueError(f"contexts must be >= 2 and batches >= 1, got {self.contexts}, {self.batches}")
        for name in ("levels", "batch_levels"):
            levels = getattr(self, name)
            if any(not 0 <= x <= 1 for x in levels) or 0.0 not in levels:
                raise ValueError(f"{name} must be in [0, 1] and include 0 (the reference), got {levels}")
        if self.repeats < 1 or self.decode_tokens < 2:
            raise ValueError("repeats must be >= 1 and decode_tokens >= 2")
        unknown = set(self.baselines) - {HF, LLAMACPP}
        if unknown:
            raise ValueError(f"unknown baselines {sorted(unknown)}: choose from {HF}, {LLAMACPP}")

    def points(self) -> list[tuple[int, int]]:
        """(context, batch) pairs to measure."""
        if self.grid == "full":
            return list(itertools.product(self.contexts, self.batches))
        sweep = [(self.batch_context, b) for b in sorted({1, *self.batches})] if max(self.batches) > 1 else []
        pts = [(c, 1) for c in self.contexts] + sweep
        return list(dict.fromkeys(pts))

    def levels_at(self, batch: int) -> list[float]:
        return self.levels if batch == 1 else sorted(set(self.batch_levels) & set(self.levels) | {0.0})

    def runs_at(self, context: int, batch: int) -> tuple[int, int]:
        """(repeats, warmup) of a prefill point: long ones run once."""
        return (1, 0) if context * batch >= self.single_run_tokens else (self.repeats, self.warmup)


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
            hf_dtype = s.dtype if s.dtype in DTYPES else "bfloat16"  # its nearest to our int8/int4 modes
            if hf_dtype != s.dtype:
                self.notes.append(f"Hugging Face runs in {hf_dtype}: it has no {s.dtype} mode")
            self.hf = load_base(s.model, hf_dtype).model
        self.llama = None
        if LLAMACPP in s.baselines:
            self.llama = self.load_llamacpp()
        else:
            self.notes.append("llama.cpp not run (optional: --baselines hf-generate,llama.cpp; it reads the Q4 GGUF)")

    def load_llamacpp(self):
        if self.s.model is not None and not str(self.s.model).endswith(".gguf"):
            self.notes.append("llama.cpp skipped: it needs a .gguf --model (or the embedded default)")
            return None
        try:
            from llama_cpp import Llama
        except ImportError:
            self.notes.append("llama.cpp skipped: llama-cpp-python is not installed (pip install -e '.[llamacpp]')")
            return None
        from llama_cpp import llama_cpp

        path = str(self.s.model or embedded_gguf())
        n_ctx = max(self.s.contexts) + self.s.decode_tokens + 8
        # NOTE(decisions): llama-cpp-python 0.3.36 dies (SIGSEGV at the first eval) on the embedded Q4_1
        # GGUF when llama.cpp repacks the weights into its CPU extra buffers on this machine (AMX_INT8,
        # AVX512); loaded without them it runs, with its plain Q4_1 kernels. Reports say so.
        defaults = llama_cpp.llama_model_default_params

        def no_repacking():
            params = defaults()
            params.use_extra_bufts = False
            return params

        llama_cpp.llama_model_default_params = no_repacking
        try:
            llm = Llama(model_path=path, n_ctx=n_ctx, n_batch=512, n_threads=torch.get_num_threads(), verbose=False)
        finally:
            llama_cpp.llama_model_default_params = defaults
        self.notes.append(
            f"llama.cpp runs the GGUF file as stored ({path.rsplit('/', 1)[-1]}), batch 1 only, without weight "
            "repacking (use_extra_bufts=False: with it llama-cpp-python 0.3.36 crashes on this file here)"
        )
        return llm

    def ids(self, context: int, batch: int) -> torch.Tensor:
        """(batch, context) token ids: windows of the prompt text at different offsets."""
        corpus = self.corpus * (1 + (context * batch) // len(self.corpus))
        step = max(1, (len(corpus) - context) // batch)
        return torch.tensor([corpus[b * step : b * step + context] for b in range(batch)])

    def layers(self, level: float) -> list[int]:
        return self.info.layers_for(level)

    @torch.no_grad()
    def warm_up(self) -> None:
        """A short prefill and ``warm_up_s`` of decoding split between levels before any timing, and one
        Hugging Face generate (llama.cpp takes none): first-call costs (allocator, kernel selection, lazy
        imports) and the settling of the memory the models were loaded into would otherwise land on the
        first point."""
        ids = self.ids(64, 1)
        steps = max(1, min(1024, (getattr(self.model.config, "max_position_embeddings", None) or 2048) - 66))
        for level in (0.0, 1.0):
            cache = HybridCache([self.model.new_cache(self.layers(level), 64 + steps)])
            token = prefill(self.model, ids, cache).argmax(-1)[:, None]
            end = time.perf_counter() + self.s.warm_up_s / 2
            for _ in range(steps):  # within the model's positions
                token = self.model(token, cache=cache, logits_for="last")[0][:, -1].argmax(-1)[:, None]
                if time.perf_counter() > end:
                    break
        if self.hf is not None:
            self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)


def row(suite: str, engine: str, level: float | None, context: int, batch: int, **kw) -> dict:
    return {"suite": suite, "engine": engine, "level": level, "context": context, "batch": batch} | kw


def our_prefill(e: Engines, ids: torch.Tensor, plan: list[int]) -> None:
    cache = HybridCache([e.model.new_cache(plan, ids.shape[1] + 1) for _ in range(ids.shape[0])])
    prefill(e.model, ids, cache).argmax(-1)


def llama_prefill(llama, tokens: list[int]) -> None:
    llama.reset()
    llama.eval(tokens)


def prefill_runs(e: Engines, context: int, batch: int) -> dict[tuple[str, float], Callable[[], object]]:
    """One prompt-to-first-token run per engine at this point, keyed (engine, level)."""
    ids = e.ids(context, batch)
    fns: dict[tuple[str, float], Callable[[], object]] = {
        (OURS, level): partial(our_prefill, e, ids, e.layers(level)) for level in e.s.levels_at(batch)
    }
    if e.hf is not None:
        mask = torch.ones_like(ids)
        fns[(HF, 0.0)] = partial(e.hf.generate, ids, attention_mask=mask, max_new_tokens=1, do_sample=False)
    if e.llama is not None and batch == 1:
        fns[(LLAMACPP, 0.0)] = partial(llama_prefill, e.llama, ids[0].tolist())
    return fns


@torch.no_grad()
def bench_prefill(e: Engines) -> list[dict]:
    """Seconds from prompt to first token (prefill + one sampling step), per point and engine; the
    engines of a point take turns, run after run."""
    rows = []
    for context, batch in e.s.points():
        timed = time_interleaved(prefill_runs(e, context, batch), *e.s.runs_at(context, batch))
        for (engine, level), t in timed.items():
            speed = batch * context / t["median_s"]
            rows.append(row("prefill", engine, level, context, batch, **t, tokens_per_s=speed))
        log.info("prefill context=%d batch=%d done", context, batch)
    return add_ratios(rows)


def step_stats(times: list[float], batch: int) -> dict:
    times = sorted(times)
    med = times[len(times) // 2]
    return {"median_s": med, "times_s": times, "ms_per_token": 1000 * med, "tokens_per_s": batch / med}


@torch.no_grad()
def bench_decode(e: Engines) -> list[dict]:
    """Per-token decode latency after a prompt of ``context`` tokens (median over the steps of one
    generation of ``decode_tokens`` tokens), and the cache bytes per sequence it held. Every (batch,
    level) of a context takes turns step by step, so the batch sweep's tokens/s ratios are as robust
    to outside load as the levels' ratios."""
    s, rows = e.s, []
    k = s.decode_tokens
    by_context: dict[int, list[int]] = {}
    for context, batch in s.points():
        by_context.setdefault(context, []).append(batch)
    for context, batches in by_context.items():
        caches, tokens, times = {}, {}, {}
        for batch in batches:
            folded = HybridCache([e.model.new_cache([], context + k + 1) for _ in range(batch)])
            first = prefill(e.model, e.ids(context, batch), folded).argmax(-1)[:, None]
            for level in sorted(s.levels_at(batch)):  # levels nest (a prefix of the order): fold onwards
                for seq in folded.sequences:
                    e.model.fold_to_dsla(seq, e.layers(level))
                key = (batch, level)
                caches[key], tokens[key], times[key] = copy.deepcopy(folded), first, []
        for _ in range(k):
            for key, cache in caches.items():
                t = time.perf_counter()
                logits, _ = e.model(tokens[key], cache=cache, logits_for="last")
                tokens[key] = logits[:, -1].argmax(-1)[:, None]
                times[key].append(time.perf_counter() - t)
        for (batch, level), cache in caches.items():
            rows.append(row("decode", OURS, level, context, batch, **step_stats(times[batch, level], batch),
                            cache_bytes_per_seq=cache[0].nbytes()))  # fmt: skip
        for batch in batches:
            rows += baseline_decode(e, context, batch)
        log.info("decode context=%d batches=%s done", context, batches)
    return add_ratios(rows)


def baseline_decode(e: Engines, context: int, batch: int) -> list[dict]:
    """Hugging Face's and llama.cpp's decode rows at one point (each timed on its own)."""
    rows, k, ids = [], e.s.decode_tokens, e.ids(context, batch)
    if e.hf is not None:
        past = e.hf(ids[:, :-1], use_cache=True, logits_to_keep=1).past_key_values
        clock = StepClock()
        e.hf.generate(
            ids, attention_mask=torch.ones_like(ids), past_key_values=past, max_new_tokens=k + 1,
            min_new_tokens=k + 1, do_sample=False, streamer=clock,
        )  # fmt: skip
        # stamps: the prompt, then each new token; the first token's step reads the last prompt token
        steps = [b - a for a, b in itertools.pairwise(clock.stamps[1:])]
        rows.append(row("decode", HF, 0.0, context, batch, **step_stats(steps, batch)))
    if e.llama is not None and batch == 1:
        e.llama.reset()
        e.llama.eval(ids[0].tolist())
        steps = []
        for tok in e.corpus[:k]:
            t = time.perf_counter()
            e.llama.eval([tok])
            steps.append(time.perf_counter() - t)
        rows.append(row("decode", LLAMACPP, 0.0, context, 1, **step_stats(steps, 1)))
    return rows


def hf_cache_bytes(e: Engines, ids: torch.Tensor) -> int:
    out = e.hf(ids, use_cache=True, logits_to_keep=1)
    return sum(t.nbytes for layer in out.past_key_values.layers for t in (layer.keys, layer.values))


@torch.no_grad()
def bench_memory(e: Engines) -> list[dict]:
    """Cache bytes one sequence holds after a prefill of each context, per level. Up to
    ``memory_measured_max`` tokens from real prefills (ours and Hugging Face's DynamicCache), checked
    against the engine's own accounting; beyond, from that accounting (``source`` says which)."""
    s, rows = e.s, []
    hf_per_token = None
    for context in s.contexts:
        measured = context <= s.memory_measured_max
        ids = e.ids(context, 1)
        for level in s.levels:
            plan = e.layers(level)
            formula = e.model.cache_bytes_per_token(plan) * context + e.model.state_bytes(plan)
            if not measured:
                rows.append(row("memory", OURS, level, context, 1, bytes=formula, kv_bytes=formula
                                - e.model.state_bytes(plan), state_bytes=e.model.state_bytes(plan),
                                formula_bytes=formula, source="formula"))  # fmt: skip
                continue
            cache = HybridCache([e.model.new_cache(plan, context)])
            prefill(e.model, ids, cache)
            seq = cache[0]
            rows.append(row("memory", OURS, level, context, 1, bytes=seq.nbytes(), kv_bytes=seq.kv_bytes(),
                            state_bytes=seq.state_bytes(), formula_bytes=formula, source="measured"))  # fmt: skip
        if e.hf is not None:
            if measured:
                kv = hf_cache_bytes(e, ids)
                hf_per_token = kv / context
            else:  # DynamicCache grows by the same bytes per token at every length
                hf_per_token = hf_per_token or hf_cache_bytes(e, ids[:, :64]) / 64
                kv = round(hf_per_token * context)
            rows.append(row("memory", HF, 0.0, context, 1, bytes=kv, kv_bytes=kv, state_bytes=0,
                            source="measured" if measured else "per-token bytes measured"))  # fmt: skip
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
    e.warm_up()
    single = [f"{c}x{b}" for c, b in s.points() if s.runs_at(c, b)[0] == 1 and s.repeats > 1]
    if "prefill" in names and single:
        e.notes.append(f"prefill points of >= {s.single_run_tokens} tokens ({', '.join(single)}) are timed once")
    result: dict = {"settings": asdict(s), "machine": machine_info(), "model": e.info.model}
    result |= {"dsla_weights": e.info.weights, "order": e.info.order, "order_source": e.info.order_source}
    for name in names:
        result[name] = SUITES[name](e)
    result["notes"] = e.notes
    result["elapsed_s"] = time.perf_counter() - t0
    return result
