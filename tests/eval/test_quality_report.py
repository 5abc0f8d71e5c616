"""`dsla-serve eval quality` end to end on a tiny base model: two checkpoints distilled here (one over
the whole order, one with a window over its first layer only and a different budget) on a tiny corpus."""

from __future__ import annotations

import json
import math

import pytest

from dsla_serve.config import DSLAConfig
from dsla_serve.distill.data import CORPUS_FORMAT, load_data
from dsla_serve.distill.train import DistillConfig, distill
from dsla_serve.eval.report import budget_differences
from dsla_serve.model import HybridModel, load_base
from dsla_serve.serving.profile import read_ppl
from tests.test_cli import run_cli

DOMAINS = {
    "prose": "The keeper of the lighthouse wrote the weather in his book every evening before the lamp was lit. ",
    "code": "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n",
    "dialogue": "A: How was the harbour today?\nB: Calm in the morning, then the wind rose.\nA: Did the boats come in?\n",
}


@pytest.fixture(scope="module")
def run(tiny_checkpoint, tokenizer, tmp_path_factory):
    """A 3-domain `data corpus` dir and two checkpoints of the tiny model distilled on it."""
    root = tmp_path_factory.mktemp("quality")
    corpus = root / "corpus"
    for d, text in DOMAINS.items():
        (corpus / d).mkdir(parents=True)
        for split, n in (("train", 4), ("val", 6)):
            docs = [{"name": f"{d}/{split}{i}", "text": f"{i}. " + text * 6} for i in range(n)]
            (corpus / d / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (corpus / "manifest.json").write_text(json.dumps({"format": CORPUS_FORMAT, "domains": {d: {} for d in DOMAINS}}))
    data = load_data(corpus, tokenizer, seq_len=64, max_train_blocks=2, max_val_blocks=1)
    runs = {"full": DistillConfig(order=[1, 0, 2], steps=2, bf16_frozen=False),
            "part": DistillConfig(order=[1], steps=3, bf16_frozen=False, dsla=DSLAConfig(window=8))}  # fmt: skip
    for name, cfg in runs.items():
        distill(HybridModel(load_base(str(tiny_checkpoint)).model), data, cfg, root / name,
                extra={"command": f"dsla-serve distill --out {name}"})  # fmt: skip
    return {"corpus": corpus, "full": root / "full", "part": root / "part", "root": root}


def test_quality_report_side_by_side(tiny_checkpoint, run):
    out = run["root"] / "report"
    run_cli("eval", "quality", "--model", str(tiny_checkpoint), "--dsla", str(run["full"]), "--variant",
            f"part={run['part']}", "--data", str(run["corpus"]), "--seq-len", "320", "--blocks", "1",
            "--prompts", "3", "--prompt-tokens", "16", "--new-tokens", "8", "--levels", "0.34,1",
            "--passkey-levels", "0.34,1", "--context", "120,200", "--trials", "2", "--out-dir", str(out))  # fmt: skip
    q = json.loads((out / "quality.json").read_text())
    assert list(q["variants"]) == ["dsla", "part"] and q["command"].startswith("dsla-serve eval quality")
    teacher = q["teacher"]["ppl"]
    assert list(teacher) == list(DOMAINS) and all(p > 1 for p in teacher.values())
    assert q["data"]["domains"]["code"] == {"blocks": 1, "tokens": 320, "documents": 6}

    full, part = q["variants"]["dsla"], q["variants"]["part"]
    assert [r["dsla_layers"] for r in full["levels"]] == [[1], [0, 1, 2]] and all(r["covered"] for r in full["levels"])
    for row in full["levels"] + part["levels"][:1]:
        for d in DOMAINS:
            assert row["ratio_to_attention"][d] == pytest.approx(row["ppl"][d] / teacher[d])
        geomean = math.prod(row["ratio_to_attention"].values()) ** (1 / len(DOMAINS))
        assert row["geomean_ratio_to_attention"] == pytest.approx(geomean)
        a = row["agreement"]
        assert a["prompts"] == 3 and set(a["domains"]) == set(DOMAINS)
        assert 0 <= a["prefix_match"] <= a["agreement"] <= 1 and 0 <= a["kl_per_token"] < 50
    # the window checkpoint distilled layer 1 only: level 1 (all three layers) is n/a, not measured
    assert part["distilled"] == [1] and part["levels"][0]["covered"]
    assert part["levels"][1] == {"conversion": 1.0, "dsla_layers": [0, 1, 2], "covered": False,
                                 "undistilled_layers": [0, 2]}  # fmt: skip
    assert part["levels"][0]["ppl"] != full["levels"][0]["ppl"]  # other weights on the same layer

    cells = {(r["filler"], r["context"], r["level"]) for r in q["teacher"]["passkey"]}
    assert cells == {(f, c, "0") for f in ("repetitive", "real") for c in (120, 200)}
    assert {r["level"] for r in full["passkey"]} == {"0.34", "1"} and {r["level"] for r in part["passkey"]} == {"0.34"}
    assert all(r["trials"] == 2 and 0 <= r["correct"] <= 2 for r in full["passkey"] + part["passkey"])

    rec = q["recency"]
    assert rec["layer"] == 1 and set(rec["profiles"]) == {"attention", "dsla", "part"}
    assert "last 8 tokens" in rec["notes"]["part"] and "dsla" not in rec["notes"]
    assert (out / "recency.png").read_bytes()[:4] == b"\x89PNG"
    assert any(w.startswith("steps: ") and "dsla=2" in w and "part=3" in w for w in q["warnings"])
    assert not any(w.startswith(("order", "data")) for w in q["warnings"]) and q["data_mismatch"] == {}
    # `dsla-serve profile --quality` / `replay --quality` read the "dsla" variant's geomean rows
    assert read_ppl(out / "quality.json") == pytest.approx(
        {0.0: math.exp(sum(map(math.log, teacher.values())) / 3)}
        | {r["conversion"]: math.exp(sum(map(math.log, r["ppl"].values())) / 3) for r in full["levels"]}
    )

    md = (out / "QUALITY.md").read_text()
    headline = next(line for line in md.splitlines() if line.startswith("| part |"))
    assert headline.endswith("| n/a |") and headline.count("n/a") == 1
    assert "NOT distilled with the same budget" in md and "| part | 100 % | n/a | n/a | n/a |" in md
    assert "window=8" in md and "`dsla-serve distill --out part`" in md and "## How to reproduce" in md
    assert md.count("per domain: perplexity (ratio)") == 2 and "| code |" in md


def test_quality_rejects_bad_options_before_measuring(tiny_checkpoint, run, tmp_path):
    bad = run_cli("eval", "quality", "--model", str(tiny_checkpoint), "--gla", str(run["full"]), "--context", "600",
                  "--out-dir", str(tmp_path), check=False)  # fmt: skip
    assert bad.returncode == 2 and "--context [600] exceeds the model's 512 tokens" in bad.stderr
    assert not (tmp_path / "quality.json").exists()
    bad = run_cli("eval", "quality", "--variant", "nodir", check=False)
    assert bad.returncode == 2 and "NAME=DIR" in bad.stderr
    bad = run_cli("eval", "quality", "--variant", f"a={tmp_path}", check=False)
    assert bad.returncode == 2 and "not a DSLA checkpoint dir" in bad.stderr
    bad = run_cli("eval", "quality", "--dsla", str(tmp_path), "--variant", f"dsla={tmp_path}", check=False)
    assert bad.returncode == 2 and "unique" in bad.stderr


def test_budget_differences_names_settings_and_compares_orders_by_prefix():
    def record(order, steps, fingerprint="f1"):
        return {"hyperparameters": {"order": order, "steps": steps, "dsla": {"window": 0}, "lr": 0.003},
                "data_fingerprint": fingerprint, "data": {"source": "corpus"}}  # fmt: skip

    assert budget_differences({"a": record([1, 0, 2], 300), "b": record([1], 300)}) == []
    lines = budget_differences({"a": record([1, 0, 2], 300), "b": record([0, 1], 600, "f2")})
    assert lines[0] == "steps: a=300, b=600"
    assert lines[1].startswith("order: a=[1, 0, 2]") and lines[2].startswith("data: a=corpus (f1)")
