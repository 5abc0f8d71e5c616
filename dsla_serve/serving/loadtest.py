"""``dsla-serve bench serving``: decode throughput and cache bytes per sequence of the serving engine
with N concurrent long prompts, at several static conversion levels, in one run (ratios within it).

It drives ``EngineCore`` directly (the server's own scheduler, runner and caches, without HTTP), so
the figures are the engine's and not the event loop's.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import typer

from dsla_serve.serving.controller import ControllerConfig
from dsla_serve.serving.engine import EngineCore
from dsla_serve.serving.request import Request, RequestParams, Status
from dsla_serve.serving.scheduler import SchedulerConfig


def run_level(hybrid, tok, info, level: float, prompts: list[list[int]], decode_tokens: int) -> dict:
    """Prefill every prompt in one batch, then time ``decode_tokens`` batched decode steps."""
    sched = SchedulerConfig(max_num_seqs=len(prompts), memory_budget=1 << 40, prefill_chunk=2048)
    core = EngineCore(hybrid, tok, info, sched, ControllerConfig(policy="static", conversion=level))
    params = RequestParams(max_tokens=decode_tokens + 1, ignore_eos=True)
    reqs = [Request(f"load-{i}", p, params, lambda out: None) for i, p in enumerate(prompts)]
    for r in reqs:
        core.add(r)
    t0 = time.perf_counter()
    while not all(r.output_ids for r in reqs):  # every sequence prefilled and holds its first token
        core.step()
    prefill_s = time.perf_counter() - t0
    per_seq = [{"reserved": r.reserved, "held": r.cache.kv_bytes() + r.cache.state_bytes()} for r in reqs]
    gaps = []
    while not all(r.status == Status.FINISHED for r in reqs):
        t = time.perf_counter()
        core.step()
        gaps.append(time.perf_counter() - t)
    return {
        "level": level, "dsla_layers": info.layers_for(level), "streams": len(prompts),
        "prompt_tokens": len(prompts[0]), "prefill_s": prefill_s, "decode_steps": len(gaps),
        "decode_step_ms_median": 1000 * statistics.median(gaps),
        "decode_tokens_per_s": len(prompts) / statistics.median(gaps),
        "reserved_bytes_per_seq": statistics.mean(p["reserved"] for p in per_seq),
        "cache_bytes_per_seq": statistics.mean(p["held"] for p in per_seq),
    }  # fmt: skip


def bench_serving(
    streams: int = typer.Option(8, min=1, help="Concurrent sequences."),
    prompt_tokens: int = typer.Option(4096, min=16, help="Tokens per prompt (real text)."),
    decode_tokens: int = typer.Option(32, min=2, help="Decode steps timed per level."),
    levels: str = typer.Option("0,0.5", help="Static conversion levels to compare; the first is the baseline."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or int4."),
    threads: int = typer.Option(None, min=1, help="Torch threads (default: all cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Serving-engine decode throughput and cache bytes per sequence with N long prompts per level."""
    from dsla_serve.bench.prompts import PromptBuilder, load_text
    from dsla_serve.model.pretrained import load_hybrid, set_threads
    from dsla_serve.runtime import machine_info, tune_allocator

    tune_allocator()
    set_threads(threads)
    load_before = os.getloadavg()  # other jobs on the machine skew the figures: record them
    hybrid, tok, info = load_hybrid(None, "auto", dtype)
    builder = PromptBuilder(tok, load_text())
    prompts = [tok(builder.build(prompt_tokens, i)[0], add_special_tokens=False).input_ids[:prompt_tokens]
               for i in range(streams)]  # fmt: skip
    rows = [run_level(hybrid, tok, info, float(lv), prompts, decode_tokens) for lv in levels.split(",")]
    base = rows[0]
    for r in rows:
        r["throughput_vs_first"] = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        r["cache_bytes_vs_first"] = r["cache_bytes_per_seq"] / base["cache_bytes_per_seq"]
        r["reserved_bytes_vs_first"] = r["reserved_bytes_per_seq"] / base["reserved_bytes_per_seq"]
    result = {"rows": rows, "dtype": dtype, "machine": machine_info(),
              "load_average": {"before": load_before, "after": os.getloadavg()}}  # fmt: skip
    if as_json:
        print(json.dumps(result))
        return
    for r in rows:
        print(
            f"level {r['level']:.3g}: prefill {r['prefill_s']:.1f} s, decode {r['decode_tokens_per_s']:.1f} tok/s "
            f"({r['throughput_vs_first']:.2f}x), cache {r['cache_bytes_per_seq'] / 2**20:.1f} MiB/seq "
            f"({r['cache_bytes_vs_first']:.2f}x), reserved {r['reserved_bytes_per_seq'] / 2**20:.1f} MiB/seq"
        )
    print(f"load average (1, 5, 15 min) before {load_before}, after {result['load_average']['after']}")
