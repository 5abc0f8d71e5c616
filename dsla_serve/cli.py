"""The ``dsla-serve`` command line: one typer app with a sub-command per job.

dsla-serve generate --prompt "Hello" --conversion 0.5
dsla-serve order --metric entropy && dsla-serve distill --out runs/dsla
dsla-serve eval ppl --conversion 0,0.25,0.5 --json
dsla-serve bench kernel --seq-len 8192 --json
dsla-serve serve --policy adaptive --port 8000
dsla-serve bench all --out runs/bench && dsla-serve replay --synthetic 20 --compare off,adaptive
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer
from rich.console import Console

from dsla_serve.config import DTYPE_HELP
from dsla_serve.runtime import tune_allocator

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Dual-state linear attention serving.")
bench_app = typer.Typer(no_args_is_help=True, help="Speed and memory benchmarks (JSON with --json).")
app.add_typer(bench_app, name="bench")
err = Console(stderr=True, soft_wrap=True)  # no hard wraps: logs and pipes read whole lines


def parse_layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated layer indices like 3,7,11, got {text!r}") from None


def fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    tune_allocator()


@app.command()
def generate(
    prompt: str = typer.Option(..., help="Prompt text."),
    model: str = typer.Option(
        None, help="Base model: checkpoint dir, .gguf file or hub id (default: embedded SmolLM2-135M-Instruct)."
    ),
    weights: str = typer.Option("auto", help="DSLA checkpoint dir; 'auto' uses the one shipped for the default model."),
    dsla_layers: str = typer.Option(None, help="Comma-separated layers to run as DSLA, e.g. 3,7,11."),
    conversion: float = typer.Option(None, help="Fraction of layers to run as DSLA, first in the conversion order."),
    max_tokens: int = typer.Option(64, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, min=0.0, max=1.0),
    seed: int = typer.Option(None),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat template."),
    dtype: str = typer.Option("auto", help=DTYPE_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Generate a completion and report prefill/decode timing and cache bytes."""
    from dsla_serve.generate import SamplingParams
    from dsla_serve.generate import generate as run
    from dsla_serve.model import CheckpointError, ModelLoadError
    from dsla_serve.model.pretrained import load_hybrid

    if dsla_layers is not None and conversion is not None:
        fail("give either --dsla-layers or --conversion, not both")
    layers_arg = parse_layers(dsla_layers)
    try:
        hybrid, tok, info = load_hybrid(model, None if weights == "none" else weights, dtype)
        layers = info.layers_for(conversion, layers_arg)
        bad = [i for i in layers if not 0 <= i < hybrid.num_layers]
        if bad:
            fail(f"layers {bad} out of range [0, {hybrid.num_layers})")
        text = (
            tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
            if chat
            else prompt
        )
        ids = tok(text).input_ids
        limit = hybrid.config.max_position_embeddings
        if len(ids) + max_tokens > limit:
            fail(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model's context of {limit}")
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
        result = run(hybrid, tok, ids, layers, params)
    except (ModelLoadError, CheckpointError, ValueError) as e:
        fail(str(e))
    note = info.note(layers)
    if as_json:
        out = result.to_dict() | {"model": info.model, "dsla_weights": info.weights, "note": note}
        print(json.dumps(out))
        return
    print(result.text)
    err.print(
        f"[dim]prompt {result.prompt_tokens} tok, prefill {result.prefill_s:.3f} s | "
        f"{result.completion_tokens} tok at {result.decode_ms_per_token:.1f} ms/tok | "
        f"cache {result.cache_bytes / 2**20:.2f} MiB | DSLA layers {result.dsla_layers or 'none'}[/dim]"
    )
    if note:
        err.print(f"[yellow]note:[/yellow] {note}")


@app.command("export-hf")
def export_hf(
    out: Path = typer.Argument(..., help="Directory to write (created; files in it are replaced)."),
    model: str = typer.Option(None, help="Base model: checkpoint dir, .gguf file or hub id (default: embedded)."),
    dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
) -> None:
    """Write the base model as a standard Hugging Face checkpoint (config, model.safetensors, tokenizer,
    generation config) that vLLM and `AutoModelForCausalLM.from_pretrained` read."""
    from dsla_serve.model import ModelLoadError
    from dsla_serve.model.loader import export_hf as run

    try:
        path = run(model, out, dtype)
    except ModelLoadError as e:
        fail(str(e))
    print(path)
    err.print(f"[dim]{', '.join(sorted(f.name for f in path.iterdir()))}[/dim]")


@bench_app.command("kernel")
def bench_kernel(
    seq_len: int = typer.Option(8192, min=1),
    heads: int = typer.Option(9, min=1),
    head_dim: int = typer.Option(64, min=1),
    batch: int = typer.Option(1, min=1),
    repeats: int = typer.Option(5, min=1),
    dtype: str = typer.Option("float32"),
    window: int = typer.Option(0, min=0, help="DSLA's exact window in tokens."),
    decode_batch: int = typer.Option(0, min=0, help="Also time attention decode over this many cached sequences."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Chunked dual-state kernel vs naive reference vs SDPA causal attention, one shape."""
    from dsla_serve.bench.kernels import bench_kernel as run

    r = run(seq_len, heads, head_dim, batch, repeats, dtype, window, decode_batch)
    if as_json:
        print(json.dumps(r))
        return
    naive = f"{r['naive_dsla_s']:.3f} s" if r["naive_dsla_s"] is not None else "skipped"
    scan = f"{r['scan_dsla_s'] * 1000:.1f} ms" if r["scan_dsla_s"] is not None else "unavailable"
    print(
        f"T={seq_len} H={heads} D={head_dim}: chunk DSLA {r['chunk_dsla_s'] * 1000:.1f} ms | C++ scan {scan} | SDPA causal "
        f"{r['sdpa_causal_s'] * 1000:.1f} ms | naive {naive} | decode step: DSLA {r['step_dsla_ms']:.3f} ms, "
        f"attention over {seq_len} keys {r['sdpa_decode_ms']:.3f} ms | "
        f"DSLA speed-up vs SDPA {r['speedup_vs_sdpa']:.2f}x"
    )


from dsla_serve.distill.cli import data_app, demote, distill, order  # noqa: E402  (typer commands; heavy imports inside)
from dsla_serve.eval.cli import eval_app  # noqa: E402
from dsla_serve.serving.cli import control, serve  # noqa: E402
from dsla_serve.serving.loadtest import bench_serving  # noqa: E402
from dsla_serve.serving.profile import profile_command  # noqa: E402

app.command()(order)
app.command()(demote)
app.command()(distill)
app.add_typer(data_app, name="data")
app.add_typer(eval_app, name="eval")

app.command()(serve)
app.command()(control)
app.command("profile")(profile_command)
bench_app.command("serving")(bench_serving)

# ---- benchmarks (engine speed and memory) and trace replay: dsla_serve/bench/cli.py
from dsla_serve.bench.cli import (  # noqa: E402
    bench_all,
    bench_decode,
    bench_memory,
    bench_precision,
    bench_prefill,
    peer_vllm,
    replay,
)
from dsla_serve.bench.soak import bench_soak  # noqa: E402

bench_app.command("prefill")(bench_prefill)
bench_app.command("decode")(bench_decode)
bench_app.command("memory")(bench_memory)
bench_app.command("all")(bench_all)
bench_app.command("precision")(bench_precision)
peer_app = typer.Typer(no_args_is_help=True, help="Outside engines on the same model, beside our policies.")
peer_app.command("vllm")(peer_vllm)
bench_app.add_typer(peer_app, name="peer")
bench_app.command("soak")(bench_soak)
app.command()(replay)

if __name__ == "__main__":
    sys.exit(app())
