"""QUALITY.md: perplexity by conversion level (DSLA and the single-state GLA ablation), pass-key
accuracy by context length, and the recency plot, in one reproducible report.

    dsla-serve eval quality --dsla DIR --gla DIR --out-dir .   (writes QUALITY.md, quality.json, recency.png)
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from dsla_serve.eval.passkey import passkey_accuracy
from dsla_serve.eval.perplexity import perplexity_by_level
from dsla_serve.eval.recency import plot_profiles, recency_profiles
from dsla_serve.model.pretrained import load_hybrid
from dsla_serve.runtime import machine_info

LEVELS = [0.0, 0.25, 0.5, 0.75, 1.0]


def run_quality(
    dsla: str, gla: str, val_blocks, contexts: list[int] = (1024, 2048, 4096, 8192),
    trials: int = 8, passkey_levels: list[float] = (0.0, 0.25, 0.5), passkey_dtype: str = "bfloat16",
    model: str | None = None, log=print,
) -> dict:  # fmt: skip
    """Every measurement of the report; ``val_blocks`` is the held-out text (N, T)."""
    result: dict = {"dsla_weights": dsla, "gla_weights": gla, "levels": LEVELS, "machine": machine_info()}
    for variant, weights in (("dsla", dsla), ("gla", gla)):
        start = time.perf_counter()
        hybrid, tok, info = load_hybrid(model, weights, "float32")
        if info.undistilled:
            raise ValueError(f"{weights} does not cover every layer (undistilled: {info.undistilled})")
        result[f"ppl_{variant}"] = perplexity_by_level(hybrid, val_blocks, info.order, LEVELS)
        result[f"order_{variant}"] = info.order
        log(f"{variant} perplexity done in {time.perf_counter() - start:.0f} s")
        if variant == "dsla":
            gla_layer = load_hybrid(model, gla, "float32")[0].dsla(info.order[0])
            rec = recency_profiles(
                hybrid, val_blocks[:1], info.order[0], {"dsla": hybrid.dsla(info.order[0]), "gla": gla_layer}
            )
            result["recency"] = rec
        start = time.perf_counter()
        hybrid, tok, info = load_hybrid(model, weights, passkey_dtype)
        levels = passkey_levels if variant == "dsla" else [lv for lv in passkey_levels if lv > 0]
        plans = {f"{lv:g}": info.layers_for(lv) for lv in levels}
        result[f"passkey_{variant}"] = passkey_accuracy(hybrid, tok, list(contexts), plans, trials)
        log(f"{variant} passkey done in {time.perf_counter() - start:.0f} s")
    result["passkey_dtype"] = passkey_dtype
    result["trials"] = trials
    return result


def write_report(result: dict, out_dir: Path, data_desc: dict, seconds: float) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_profiles(result["recency"], str(out_dir / "recency.png"))
    (out_dir / "quality.json").write_text(json.dumps(result, indent=1))
    teacher = result["ppl_dsla"][0]["ppl"]
    lines = [
        "# Quality of the shipped DSLA checkpoint",
        "",
        f"Produced by `dsla-serve {shlex.join(sys.argv[1:])}` in {seconds / 60:.0f} min on "
        f"{result['machine']['cpu']} ({result['machine']['cores']} cores). Raw figures: `quality.json`.",
        f"Held-out text: {data_desc['val_blocks']} blocks of {data_desc['seq_len']} tokens "
        f"({data_desc['source']}, documents never seen in distillation).",
        "",
        "## Perplexity by conversion level",
        "",
        "Level = fraction of layers running DSLA, first in the conversion order. Ratio = perplexity / all-attention.",
        "",
        "| conversion | layers | DSLA ppl | DSLA ratio | GLA ppl | GLA ratio |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for d, g in zip(result["ppl_dsla"], result["ppl_gla"], strict=True):
        lines.append(
            f"| {100 * d['conversion']:.0f} % | {len(d['dsla_layers'])} | {d['ppl']:.3f} | "
            f"{d['ratio_to_attention']:.3f} | {g['ppl']:.3f} | {g['ratio_to_attention']:.3f} |"
        )
    lines += [
        "",
        f"All-attention perplexity: {teacher:.3f}.",
        "",
        "## Pass-key retrieval",
        "",
        f"{result['trials']} trials per cell, key at random depths, completion probe, "
        f"engine in {result['passkey_dtype']}. Accuracy (correct/trials).",
        "",
    ]
    rows = result["passkey_dsla"] + result["passkey_gla"]
    contexts = sorted({r["context"] for r in rows})
    for filler in ("repetitive", "real"):
        lines += [f"**{filler} filler**", "", "| model | " + " | ".join(f"{c} tok" for c in contexts) + " |"]
        lines.append("| --- |" + " --- |" * len(contexts))
        for variant in ("dsla", "gla"):
            levels = sorted({r["level"] for r in result[f"passkey_{variant}"]}, key=float)
            for lv in levels:
                name = "attention" if float(lv) == 0 else f"{variant.upper()} {100 * float(lv):.0f} %"
                cells = {
                    r["context"]: r for r in result[f"passkey_{variant}"] if r["filler"] == filler and r["level"] == lv
                }
                lines.append(
                    f"| {name} | " + " | ".join(f"{cells[c]['correct']}/{cells[c]['trials']}" for c in contexts) + " |"
                )
        lines.append("")
    rec = result["recency"]
    lines += [
        "## Recency",
        "",
        f"Layer {rec['layer']} (first in the order), one held-out block of {rec['tokens']} tokens: share of the "
        "weight on the last 16 tokens: "
        + ", ".join(f"{name} {100 * m:.1f} %" for name, m in rec["mass_last_16"].items())
        + ".",
        "",
        "![recency](recency.png)",
        "",
    ]
    path = out_dir / "QUALITY.md"
    path.write_text("\n".join(lines))
    return path
