"""QUALITY.md: DSLA checkpoints side by side on held-out (multi-domain) text, in one reproducible report.

    dsla-serve eval quality --variant dsla=DIR --variant window=DIR --data CORPUS_DIR --out-dir docs/quality
    (writes QUALITY.md, quality.json, recency.png)

Per variant and conversion level: perplexity on each domain's held-out split and its ratio to the
all-attention (0 %) model, the geometric mean of those ratios (every domain weighs the same, whatever
its perplexity scale), and greedy agreement with the 0 % model. Pass-key accuracy by context for the
0 % model and each variant at a few levels; the recency profile of the first layer of the first
variant's order. The 0 % model is measured once: every variant shares the base model. A variant whose
checkpoint covers only a prefix of its order is measured at the levels that prefix covers ("n/a"
elsewhere). The report states what each checkpoint's manifest says about its distillation and warns
when the variants were not distilled with the same budget and data.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import Tensor

from dsla_serve.distill.data import corpus_split, corpus_val_blocks, is_corpus, is_validation, load_data, read_documents
from dsla_serve.eval.agreement import agreement_by_level, corpus_prompts, teacher_continuations
from dsla_serve.eval.passkey import passkey_accuracy
from dsla_serve.eval.perplexity import perplexity, perplexity_by_domain
from dsla_serve.eval.recency import plot_profiles, recency_profiles
from dsla_serve.model.convert import MANIFEST
from dsla_serve.model.pretrained import load_hybrid
from dsla_serve.runtime import machine_info

FORMAT = "dsla-serve quality 2"
AGREEMENT_KEYS = ("agreement", "prefix_match", "kl_per_token")
PASSKEY_MARK = 0.9  # a variant's cell is marked below this fraction of the teacher's correct answers ...
PASSKEY_MIN = 2  # ... where the teacher got at least this many (fewer is noise)


@dataclass
class QualitySettings:
    levels: list[float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])  # 0 % is the reference
    passkey_levels: list[float] = field(default_factory=lambda: [0.25, 0.5])
    contexts: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    trials: int = 8
    fillers: tuple[str, ...] = ("repetitive", "real")
    prompts: int = 64  # agreement prompts, round-robin over the domains
    prompt_tokens: int = 64
    new_tokens: int = 32
    dtype: str = "float32"  # perplexity and agreement
    passkey_dtype: str = "bfloat16"  # the long pass-key prefills
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("levels", "passkey_levels"):
            values = list(dict.fromkeys(float(x) for x in getattr(self, name)))
            if not values or any(not 0 < x <= 1 for x in values):
                raise ValueError(f"{name} must be in (0, 1] (0 % is the reference, always measured), got {values}")
            setattr(self, name, values)
        if set(self.fillers) - {"repetitive", "real"} or not self.fillers:
            raise ValueError(f"fillers are repetitive and/or real, got {self.fillers}")


@dataclass
class EvalText:
    """Held-out text per domain: blocks for perplexity, whole documents for agreement prompts."""

    source: str
    corpus: bool
    seq_len: int
    blocks: dict[str, Tensor]  # domain -> (N <= blocks per domain, seq_len) token ids
    documents: dict[str, list[str]]  # domain -> held-out documents

    def describe(self) -> dict:
        h = hashlib.sha256(str(self.seq_len).encode())
        for d, b in self.blocks.items():
            h.update(d.encode() + b.numpy().tobytes())
        domains = {d: {"blocks": len(b), "tokens": b.numel(), "documents": len(self.documents.get(d, []))}
                   for d, b in self.blocks.items()}  # fmt: skip
        return {"source": self.source, "corpus": self.corpus, "seq_len": self.seq_len, "domains": domains,
                "fingerprint": h.hexdigest()}  # fmt: skip


def eval_text(source: str, tokenizer, seq_len: int, blocks: int) -> EvalText:
    """A `data corpus` dir: each domain's own held-out split. Anything else: one domain "text", the
    held-out 5 % of documents that ``load_data`` (hence distillation) sets aside. Raises DataError."""
    if is_corpus(source):
        per_domain = corpus_val_blocks(source, tokenizer, seq_len, blocks)
        return EvalText(source, True, seq_len, per_domain, corpus_split(source, "val"))
    val = load_data(source, tokenizer, seq_len, max_train_blocks=1, max_val_blocks=blocks).val
    docs: list[str] = []
    for part in filter(None, source.split(",")):
        if is_corpus(part):
            docs += [t for texts in corpus_split(part, "val").values() for t in texts]
        else:
            docs += [t for n, t in read_documents(part) if is_validation(n, 5.0)]
    return EvalText(source, False, seq_len, {"text": val}, {"text": docs})


def distillation_record(weights: str) -> dict:
    """What a checkpoint's manifest says about how it was made (missing keys stay None)."""
    manifest = json.loads((Path(weights) / MANIFEST).read_text())
    chain = manifest.get("chain") or []
    return {
        "dsla_config": manifest.get("dsla_config"),
        "hyperparameters": manifest.get("hyperparameters"),
        "command": manifest.get("command"),
        "data": manifest.get("data"),
        "data_fingerprint": manifest.get("data_fingerprint"),
        "layers": sorted(int(i) for i in manifest.get("layers", {})),
        "chain_seconds": sum(e.get("seconds", 0.0) for e in chain),
        "chain": [{k: e.get(k) for k in ("layer", "seconds", "val_ppl_ratio")} for e in chain],
        "machine": manifest.get("machine"),
    }


def budget_differences(records: dict[str, dict]) -> list[str]:
    """One line per distillation setting on which the variants differ, besides their DSLA config.

    Orders are compared by prefix: a checkpoint distilled over fewer layers of the same order differs
    in coverage (reported as n/a), not in budget.
    """
    if len(records) < 2:
        return []
    hps = {n: r["hyperparameters"] or {} for n, r in records.items()}
    lines = []
    for key in sorted(set().union(*hps.values()) - {"dsla", "order"}):
        values = {n: h.get(key) for n, h in hps.items()}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            lines.append(f"{key}: " + ", ".join(f"{n}={json.dumps(v)}" for n, v in values.items()))
    orders = {n: h.get("order") or [] for n, h in hps.items()}
    if any(a[: len(b)] != b[: len(a)] for a in orders.values() for b in orders.values()):
        lines.append("order: " + ", ".join(f"{n}={o[:6]}{'...' if len(o) > 6 else ''}" for n, o in orders.items()))
    prints = {n: r["data_fingerprint"] for n, r in records.items()}
    if len(set(prints.values())) > 1:
        lines.append("data: " + ", ".join(f"{n}={(r['data'] or {}).get('source')} ({str(prints[n])[:12]})"
                                          for n, r in records.items()))  # fmt: skip
    return lines


def same_text(source: str) -> list[str]:
    """A data source as comparable paths (distillation records the resolved ``--data``)."""
    return [
        str(Path(p).expanduser().resolve()) if not p.startswith("hf:") else p for p in filter(None, source.split(","))
    ]


def covers(info, level: float) -> bool:
    """Whether the checkpoint distilled every layer that ``level`` converts (its order's prefix)."""
    return set(info.layers_for(level)) <= set(info.distilled)


def level_rows(info, levels: list[float], ppl: dict, agree: list[dict]) -> list[dict]:
    """One row per level: per-domain perplexity and ratio, geomean ratio, agreement; "covered": False if n/a."""
    covered = [lv for lv in levels if covers(info, lv)]
    rows = []
    for lv in levels:
        row = {"conversion": lv, "dsla_layers": info.layers_for(lv), "covered": lv in covered}
        if lv in covered:
            j = covered.index(lv)
            row["ppl"] = {d: r["levels"][j]["ppl"] for d, r in ppl["domains"].items()}
            row["ratio_to_attention"] = {d: r["levels"][j]["ratio_to_attention"] for d, r in ppl["domains"].items()}
            row["geomean_ratio_to_attention"] = ppl["geomean"][j]["geomean_ratio_to_attention"]
            row["agreement"] = {k: agree[j][k] for k in (*AGREEMENT_KEYS, "prompts", "domains")}
        else:
            row["undistilled_layers"] = sorted(set(row["dsla_layers"]) - set(info.distilled))
        rows.append(row)
    return rows


def recency_note(config: dict) -> str | None:
    """How the profile of a layer with a window is built (``eval/recency.linear_weights``)."""
    if not config.get("window"):
        return None
    return (f"the last {config['window']} tokens carry the exact window's softmax weights, older ones the states' "
            "(scaled by the head's mean output gain), mixed by the layer's learned weights")  # fmt: skip


def run_quality(
    variants: dict[str, str], text: EvalText, settings: QualitySettings, model: str | None = None, log=print
) -> dict:
    """Every measurement of the report, for the checkpoints ``variants`` (name -> dir) of one base model."""
    s = settings
    result: dict = {"format": FORMAT, "settings": asdict(s), "data": text.describe(), "machine": machine_info(),
                    "teacher": {}, "variants": {}}  # fmt: skip
    reference = prompts = recency = None
    layer = None
    recency_domain = next(iter(text.blocks))
    for i, (name, weights) in enumerate(variants.items()):
        start = time.perf_counter()
        hybrid, tok, info = load_hybrid(model, weights, s.dtype)
        if i == 0:  # the 0 % model, prompts and the recency layer: once, from the first variant
            result["model"], layer = info.model, info.order[0]
            result["teacher"]["ppl"] = {d: perplexity(hybrid, b, []) for d, b in text.blocks.items()}
            prompts = corpus_prompts(text.documents, tok, s.prompts, s.prompt_tokens)
            if not prompts:
                raise ValueError(f"no agreement prompts: every held-out document is under {s.prompt_tokens} tokens")
            reference = teacher_continuations(hybrid, prompts, s.new_tokens)
            log(f"all-attention perplexity and continuations in {time.perf_counter() - start:.0f} s")
        covered = [lv for lv in s.levels if covers(info, lv)]
        ppl, agree = {"domains": {}, "geomean": []}, []
        if covered:
            ppl = perplexity_by_domain(hybrid, text.blocks, info.order, covered, teacher=result["teacher"]["ppl"])
            agree = agreement_by_level(hybrid, prompts, info.order, covered, s.new_tokens, reference=reference)
        record = distillation_record(info.weights)
        if layer in info.distilled:
            rec = recency_profiles(hybrid, text.blocks[recency_domain][:1], layer, {name: hybrid.dsla(layer)})
            if recency is None:
                recency = {**rec, "domain": recency_domain, "notes": {}}
            else:
                recency["profiles"][name] = rec["profiles"][name]
                recency["mass_last_16"][name] = rec["mass_last_16"][name]
            if note := recency_note(record["dsla_config"] or {}):
                recency["notes"][name] = note
        del hybrid
        log(f"{name}: perplexity and agreement at {covered} in {time.perf_counter() - start:.0f} s")
        start = time.perf_counter()
        hybrid, tok, info = load_hybrid(model, weights, s.passkey_dtype)
        if i == 0:
            result["teacher"]["passkey"] = passkey_accuracy(hybrid, tok, s.contexts, {"0": []}, s.trials, s.fillers,
                                                            s.seed)  # fmt: skip
        plans = {f"{lv:g}": info.layers_for(lv) for lv in s.passkey_levels if covers(info, lv)}
        passkey = passkey_accuracy(hybrid, tok, s.contexts, plans, s.trials, s.fillers, s.seed) if plans else []
        del hybrid
        log(f"{name}: pass-key at {list(plans)} in {time.perf_counter() - start:.0f} s")
        result["variants"][name] = {
            "weights": info.weights, "order": info.order, "distilled": info.distilled, "manifest": record,
            "levels": level_rows(info, s.levels, ppl, agree), "passkey": passkey,
        }  # fmt: skip
    result["recency"] = recency
    result["recency_layer"] = layer
    result["warnings"] = budget_differences({n: v["manifest"] for n, v in result["variants"].items()})
    sources = {n: (v["manifest"]["data"] or {}).get("source") for n, v in result["variants"].items()}
    result["data_mismatch"] = {n: src for n, src in sources.items() if src and same_text(src) != same_text(text.source)}
    result.update(legacy_ppl(result))
    return result


def legacy_ppl(result: dict) -> dict:
    """``ppl_dsla``: one variant's geometric-mean perplexity over domains per covered level (rows of
    `eval ppl --json`), which `dsla-serve profile --quality` and `replay --quality` read. Its ratio to
    level 0 is that variant's geomean ratio. The variant named "dsla", else the first."""
    name = "dsla" if "dsla" in result["variants"] else next(iter(result["variants"]))
    teacher = math.exp(sum(math.log(p) for p in result["teacher"]["ppl"].values()) / len(result["teacher"]["ppl"]))
    rows = [{"conversion": 0.0, "dsla_layers": [], "ppl": teacher, "ratio_to_attention": 1.0}]
    rows += [{"conversion": r["conversion"], "dsla_layers": r["dsla_layers"], "ppl": teacher * r["geomean_ratio_to_attention"],
              "ratio_to_attention": r["geomean_ratio_to_attention"]}
             for r in result["variants"][name]["levels"] if r["covered"]]  # fmt: skip
    return {"ppl_dsla": rows, "ppl_dsla_variant": name}


# --- QUALITY.md --------------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def ratio(x: float) -> str:
    return f"{x:.3f}" if x < 10 else f"{x:.1f}"


def pct(level: float) -> str:
    return f"{100 * level:g} %"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + " --- |" * len(header),
        *("| " + " | ".join(r) + " |" for r in rows),
    ]


def perplexity_section(result: dict) -> list[str]:
    levels, teacher = result["settings"]["levels"], result["teacher"]["ppl"]
    lines = ["## Perplexity", "",
             "Level = fraction of layers running DSLA, first in the variant's conversion order. Ratio = perplexity / "
             "the all-attention model's on the same domain; headline = geometric mean of the per-domain ratios. "
             "n/a: the checkpoint has not distilled every layer of that level.", ""]  # fmt: skip
    rows = [[name, *(ratio(r["geomean_ratio_to_attention"]) if r["covered"] else "n/a" for r in v["levels"])]
            for name, v in result["variants"].items()]  # fmt: skip
    lines += table(["variant", *map(pct, levels)], rows)
    lines += ["", "All-attention perplexity: " + ", ".join(f"{d} {p:.3f}" for d, p in teacher.items()) + ".", ""]
    for name, v in result["variants"].items():
        lines += [f"**{name}** per domain: perplexity (ratio)", ""]
        rows = [[d, f"{teacher[d]:.3f}", *(f"{r['ppl'][d]:.3f} ({ratio(r['ratio_to_attention'][d])})" if r["covered"]
                                          else "n/a" for r in v["levels"])] for d in teacher]  # fmt: skip
        lines += [*table(["domain", "all-attention", *map(pct, levels)], rows), ""]
    return lines


def agreement_section(result: dict) -> list[str]:
    s = result["settings"]
    lines = ["## Greedy agreement with the all-attention model", "",
             f"{s['prompts']} prompts (each the first {s['prompt_tokens']} tokens of a held-out document, round-robin "
             f"over the domains, no chat template); both models continue greedily for {s['new_tokens']} tokens. "
             "Agreement: position-wise fraction of equal tokens; prefix: fraction before the first divergence; KL: "
             "mean KL(all-attention || variant) per token in nats, teacher-forced on the all-attention continuation.",
             ""]  # fmt: skip
    rows = []
    for name, v in result["variants"].items():
        for r in v["levels"]:
            a = r.get("agreement")
            cells = (
                [f"{a['agreement']:.3f}", f"{a['prefix_match']:.3f}", f"{a['kl_per_token']:.4f}"] if a else ["n/a"] * 3
            )
            rows.append([name, pct(r["conversion"]), *cells])
    return [*lines, *table(["variant", "level", "agreement", "prefix match", "KL (nats/token)"], rows), ""]


def passkey_cell(row: dict | None, teacher: dict) -> str:
    if row is None:
        return "n/a"
    cell = f"{row['correct']}/{row['trials']}"
    low = teacher["correct"] >= PASSKEY_MIN and row["correct"] < PASSKEY_MARK * teacher["correct"]
    return f"**{cell}**" if low else cell


def passkey_section(result: dict) -> list[str]:
    s = result["settings"]
    lines = ["## Pass-key retrieval", "",
             f"{s['trials']} trials per cell, key at random depths, completion probe, engine in {s['passkey_dtype']}; "
             f"every model sees the same probes. Correct/trials; **bold**: below {PASSKEY_MARK:g}x the all-attention "
             f"model's correct answers where it got at least {PASSKEY_MIN}.", ""]  # fmt: skip
    contexts = s["contexts"]
    for filler in s["fillers"]:
        teacher = {r["context"]: r for r in result["teacher"]["passkey"] if r["filler"] == filler}
        rows = [["attention", *(passkey_cell(teacher[c], teacher[c]) for c in contexts)]]
        for name, v in result["variants"].items():
            for lv in s["passkey_levels"]:
                cells = {r["context"]: r for r in v["passkey"] if r["filler"] == filler and r["level"] == f"{lv:g}"}
                rows.append([f"{name} {pct(lv)}", *(passkey_cell(cells.get(c), teacher[c]) for c in contexts)])
        lines += [f"**{filler} filler**", "", *table(["model", *(f"{c} tok" for c in contexts)], rows), ""]
    return lines


def recency_section(result: dict) -> list[str]:
    rec = result["recency"]
    if rec is None:
        return ["## Recency", "", f"No variant has layer {result['recency_layer']} distilled: no profile.", ""]
    notes = "".join(f" {n}: {note}." for n, note in rec["notes"].items())
    return ["## Recency", "",
            f"Layer {rec['layer']} (first in the order of {next(iter(result['variants']))}), one held-out block of "
            f"{rec['tokens']} tokens ({rec['domain']}); every variant that has this layer distilled. Share of the "
            "weight on the last 16 tokens: " + ", ".join(f"{n} {100 * m:.1f} %" for n, m in rec["mass_last_16"].items())
            + "." + notes, "", "![recency](recency.png)", ""]  # fmt: skip


def budget(m: dict) -> str:
    hp, data = m["hyperparameters"] or {}, m["data"] or {}
    if not hp:
        return "no distillation record in the manifest"
    return (f"{hp.get('steps')} local + {hp.get('e2e_steps')} end-to-end steps per layer (batch {hp.get('batch_size')}, "
            f"lr {hp.get('lr')}, e2e scope {hp.get('e2e_scope', 'layer')}), {data.get('train_blocks')} training blocks "
            f"of {data.get('seq_len')} tokens from {data.get('source')} (fingerprint "
            f"{str(m['data_fingerprint'])[:12]}), {len(m['chain'])} layer{'s' * (len(m['chain']) != 1)} in {duration(m['chain_seconds'])} "
        f"({duration(m['chain_seconds'] / max(len(m['chain']), 1))} per layer)")  # fmt: skip


def conditions_section(result: dict) -> list[str]:
    s, data, mach = result["settings"], result["data"], result["machine"]
    blocks = ", ".join(f"{d} {v['blocks']}" for d, v in data["domains"].items())
    lines = ["## Conditions", "",
             f"- Held-out text: {data['source']} ({'each domain its own held-out split' if data['corpus'] else 'the held-out 5 % of documents'}); "
             f"blocks of {data['seq_len']} tokens per domain: {blocks} (fingerprint {data['fingerprint'][:12]}).",
             f"- Perplexity and agreement in {s['dtype']}; {s['prompts']} agreement prompts; pass-key {s['trials']} "
             f"trials per cell in {s['passkey_dtype']}, seed {s['seed']}.",
             f"- Base model {result['model']}; {mach['cpu']} ({mach['cores']} cores, {mach['torch_threads']} torch "
             f"threads, torch {mach['torch']}).", ""]  # fmt: skip
    for name, v in result["variants"].items():
        m, cfg = v["manifest"], v["manifest"]["dsla_config"] or {}
        shown = {k: cfg.get(k) for k in ("variant", "window", "adapter_rank", "adapters", "rope", "normalize",
                                          "output_gate") if k in cfg}  # fmt: skip
        head = v["order"][: len(v["distilled"])]  # load_hybrid puts the distilled layers first, in their order
        rest = "" if len(head) == len(v["order"]) else "; the other layers are not distilled (their levels: n/a)"
        lines += [f"**{name}**: `{v['weights']}`",
                  f"- DSLA config: {', '.join(f'{k}={val}' for k, val in shown.items())}",
                  f"- distilled: {len(head)} of {len(v['order'])} layers, in the order {head[:8]}"
                  f"{'...' if len(head) > 8 else ''}{rest}",
                  f"- budget: {budget(m)}",
                  f"- command: `{m['command'] or 'not recorded'}`", ""]  # fmt: skip
    return lines


def warning_lines(result: dict) -> list[str]:
    lines = []
    if result["warnings"]:
        lines.append("> **Warning: the variants were NOT distilled with the same budget and data.** They differ in: "
                     + "; ".join(result["warnings"]) + ".")  # fmt: skip
    for name, source in result["data_mismatch"].items():
        lines.append(f"> **Note:** {name} was distilled on {source}, not on the evaluated text: its held-out split "
                     "is not guaranteed to be unseen by that checkpoint.")  # fmt: skip
    return [*lines, ""] if lines else []


def write_report(result: dict, out_dir: Path) -> Path:
    """quality.json, recency.png and QUALITY.md under ``out_dir``; ``result`` holds command, created, seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if result["recency"] is not None:
        plot_profiles(result["recency"], str(out_dir / "recency.png"))
    (out_dir / "quality.json").write_text(json.dumps(result, indent=1))
    names = list(result["variants"])
    lines = [f"# Quality of DSLA checkpoints: {', '.join(names)}", "",
             f"Produced by `{result['command']}` in {duration(result['seconds'])} on {result['machine']['cpu']} "
             f"({result['machine']['cores']} cores), {result['created']}. Raw figures: `quality.json`.", ""]  # fmt: skip
    lines += warning_lines(result)
    lines += perplexity_section(result) + agreement_section(result) + passkey_section(result)
    lines += recency_section(result) + conditions_section(result)
    lines += ["## How to reproduce", "",
              f"Rerun `{result['command']}` with the checkpoints listed under Conditions and the same held-out text "
              "(a corpus is built by `dsla-serve data corpus`).", ""]  # fmt: skip
    path = out_dir / "QUALITY.md"
    path.write_text("\n".join(lines))
    return path
