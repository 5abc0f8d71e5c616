"""``dsla-serve eval ...``: perplexity, pass-key, recency, lm-eval, and the QUALITY.md report."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console

from dsla_serve.distill.cli import PYDOC, resolve_data

eval_app = typer.Typer(no_args_is_help=True, help="Quality of hybrid models (JSON with --json).")
err = Console(stderr=True, soft_wrap=True)  # no hard wraps: logs and pipes read whole lines


def parse_floats(text: str, name: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"{name} takes comma-separated numbers, got {text!r}") from None


def load(model, weights, dtype):
    from dsla_serve.model import CheckpointError, ModelLoadError
    from dsla_serve.model.pretrained import load_hybrid

    try:
        return load_hybrid(model, None if weights == "none" else weights, dtype)
    except (ModelLoadError, CheckpointError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e


def held_out(data: str, tokenizer, seq_len: int, blocks: int):
    from dsla_serve.distill.data import DataError, load_data

    try:
        return load_data(resolve_data(data), tokenizer, seq_len, max_train_blocks=1, max_val_blocks=blocks).val
    except DataError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e


@eval_app.command("ppl")
def ppl(
    data: str = typer.Option(PYDOC, help="Text; its held-out split (by document) is used."),
    seq_len: int = typer.Option(1024, min=16),
    blocks: int = typer.Option(32, min=1, help="Held-out blocks of --seq-len tokens."),
    conversion: str = typer.Option("0,0.25,0.5,0.75,1"),
    model: str = typer.Option(None),
    weights: str = typer.Option("auto", help="DSLA checkpoint dir ('auto': shipped for the default model)."),
    dtype: str = typer.Option("float32"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Perplexity per conversion level (that fraction of layers, first in the order, as DSLA)."""
    from dsla_serve.eval.perplexity import perplexity_by_level

    levels = parse_floats(conversion, "--conversion")
    hybrid, tok, info = load(model, weights, dtype)
    val = held_out(data, tok, seq_len, blocks)
    start = time.perf_counter()
    rows = perplexity_by_level(hybrid, val, info.order, levels)
    result = {"model": info.model, "weights": info.weights, "order": info.order, "undistilled": info.undistilled,
              "tokens": val.numel(), "seq_len": seq_len, "levels": rows, "seconds": time.perf_counter() - start}  # fmt: skip
    if as_json:
        print(json.dumps(result))
        return
    for row in rows:
        print(f"conversion {row['conversion']:.2f}: ppl {row['ppl']:.3f} (x{row['ratio_to_attention']:.3f})")


@eval_app.command("passkey")
def passkey(
    context: str = typer.Option("1024,2048,4096,8192", help="Prompt lengths in tokens."),
    trials: int = typer.Option(8, min=1),
    conversion: str = typer.Option("0,0.25,0.5"),
    filler: str = typer.Option("repetitive,real"),
    model: str = typer.Option(None),
    weights: str = typer.Option("auto"),
    dtype: str = typer.Option("float32"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Pass-key retrieval accuracy by context length, filler and conversion level."""
    from dsla_serve.eval.passkey import passkey_accuracy

    fillers = tuple(f.strip() for f in filler.split(","))
    if set(fillers) - {"repetitive", "real"}:
        raise typer.BadParameter(f"--filler takes repetitive and/or real, got {filler!r}")
    hybrid, tok, info = load(model, weights, dtype)
    plans = {f"{lv:g}": info.layers_for(lv) for lv in parse_floats(conversion, "--conversion")}
    contexts = [int(c) for c in parse_floats(context, "--context")]
    try:
        rows = passkey_accuracy(hybrid, tok, contexts, plans, trials, fillers, seed)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    if as_json:
        print(json.dumps({"model": info.model, "weights": info.weights, "results": rows}))
        return
    for r in rows:
        print(f"{r['filler']:>10} {r['context']:>6} tokens, conversion {r['level']}: {r['correct']}/{r['trials']}")


@eval_app.command("recency")
def recency(
    dsla: str = typer.Option("auto", help="DSLA checkpoint dir."),
    gla: str = typer.Option(None, help="Single-state GLA checkpoint dir (same layer), for comparison."),
    model: str = typer.Option(None),
    layer: int = typer.Option(None, help="Layer to profile (default: the first of the DSLA order)."),
    data: str = typer.Option(PYDOC),
    seq_len: int = typer.Option(1024, min=300),
    plot: Path = typer.Option(None, help="Write a PNG plot here."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Weight on past tokens by distance: attention vs single-state GLA vs DSLA, at one layer."""
    from dsla_serve.eval.recency import plot_profiles, recency_profiles
    from dsla_serve.model import convert, load_base

    hybrid, tok, info = load(model, dsla, "float32")
    layer = info.order[0] if layer is None else layer
    modules = {"dsla": hybrid.dsla(layer)}
    if gla:
        modules["gla"] = convert(load_base(model).model, [layer], weights=gla)[layer]
    ids = held_out(data, tok, seq_len, 1)[:1]
    result = recency_profiles(hybrid, ids, layer, modules)
    if plot:
        plot_profiles(result, str(plot))
        result["plot"] = str(plot)
    if as_json:
        print(json.dumps(result))
        return
    for name, mass in result["mass_last_16"].items():
        print(f"{name:>10}: {100 * mass:.1f}% of the weight on the last 16 tokens")


@eval_app.command("lm-eval")
def lm_eval_cmd(
    tasks: str = typer.Option(..., help="Comma-separated lm-eval task names."),
    conversion: float = typer.Option(0.0),
    model: str = typer.Option(None),
    weights: str = typer.Option("auto"),
    limit: int = typer.Option(None, help="Examples per task."),
    include_path: str = typer.Option(None, help="Dir of extra task YAMLs (local tasks)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Run lm-evaluation-harness tasks on the hybrid model."""
    from dsla_serve.eval.lm_eval import evaluate

    args = {"model": model, "weights": weights, "conversion": conversion}
    results = evaluate([t.strip() for t in tasks.split(",")], args, limit, include_path)
    out = {"results": results["results"], "config": {"conversion": conversion, "limit": limit}}
    print(json.dumps(out, default=str) if as_json else json.dumps(out["results"], indent=1, default=str))


@eval_app.command("quality")
def quality(
    dsla: str = typer.Option(..., help="DSLA checkpoint dir (all layers)."),
    gla: str = typer.Option(..., help="Single-state GLA checkpoint dir distilled with the same budget."),
    data: str = typer.Option(PYDOC),
    seq_len: int = typer.Option(1024, min=300),
    blocks: int = typer.Option(32, min=1),
    context: str = typer.Option("1024,2048,4096,8192"),
    trials: int = typer.Option(8, min=1),
    passkey_dtype: str = typer.Option("bfloat16", help="Engine dtype for the (long) pass-key prefills."),
    out_dir: Path = typer.Option(Path("."), help="Where QUALITY.md, quality.json and recency.png go."),
) -> None:
    """Write QUALITY.md: perplexity (DSLA vs GLA) by level, pass-key by context, recency plot."""
    from transformers import AutoTokenizer

    from dsla_serve.distill.data import load_data
    from dsla_serve.eval.report import run_quality, write_report
    from dsla_serve.model.loader import resolve

    start = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(resolve(None)[0])
    text = load_data(resolve_data(data), tok, seq_len, max_train_blocks=1, max_val_blocks=blocks)
    val, desc = text.val, text.describe()
    contexts = [int(c) for c in parse_floats(context, "--context")]
    result = run_quality(dsla, gla, val, contexts=contexts, trials=trials, passkey_dtype=passkey_dtype,
                         log=lambda m: err.print(m))  # fmt: skip
    path = write_report(result, out_dir, desc, time.perf_counter() - start)
    err.print(f"wrote {path}")
