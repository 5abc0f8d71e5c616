"""Eval commands on tiny inputs: well-formed JSON; lm-eval integration on a small local task."""

from __future__ import annotations

import json

import pytest
import torch

from dsla_serve.distill.data import load_data
from dsla_serve.distill.train import DistillConfig, distill
from dsla_serve.eval.passkey import answer_matches, build_probe
from dsla_serve.eval.recency import distance_bins
from dsla_serve.model import HybridModel, load_base
from tests.conftest import write_corpus
from tests.test_cli import run_cli


@pytest.fixture(scope="module")
def tiny_run(tiny_checkpoint, tokenizer, tmp_path_factory):
    """Text corpus + DSLA and GLA checkpoints distilled (briefly) on the tiny checkpoint."""
    root = tmp_path_factory.mktemp("eval")
    write_corpus(root / "text", docs=60)
    data = load_data(root / "text", tokenizer, seq_len=320, val_percent=25, max_train_blocks=4, max_val_blocks=2)
    runs = {}
    for variant in ("dsla", "gla"):
        from dsla_serve.config import DSLAConfig

        loaded = load_base(str(tiny_checkpoint))
        cfg = DistillConfig(order=[1, 0, 2], steps=5, bf16_frozen=False, dsla=DSLAConfig(variant=variant))
        distill(HybridModel(loaded.model), data, cfg, root / variant)
        runs[variant] = root / variant
    return {"text": root / "text", **runs}


def test_eval_ppl_json(tiny_checkpoint, tiny_run):
    out = json.loads(run_cli("eval", "ppl", "--model", str(tiny_checkpoint), "--weights", str(tiny_run["dsla"]),
                             "--data", str(tiny_run["text"]), "--seq-len", "64", "--blocks", "2",
                             "--conversion", "0,0.34,1", "--json").stdout)  # fmt: skip
    levels = out["levels"]
    assert [lv["conversion"] for lv in levels] == [0, 0.34, 1]
    assert [len(lv["dsla_layers"]) for lv in levels] == [0, 1, 3]
    assert levels[1]["dsla_layers"] == [1]  # first layer of the run's order
    assert levels[0]["ratio_to_attention"] == 1.0 and all(lv["ppl"] > 1 for lv in levels)
    assert out["order"] == [1, 0, 2] and out["undistilled"] == []


def test_eval_passkey_json(tiny_checkpoint, tiny_run):
    out = json.loads(run_cli("eval", "passkey", "--model", str(tiny_checkpoint), "--weights", str(tiny_run["dsla"]),
                             "--context", "120,200", "--trials", "2", "--conversion", "0,1", "--json").stdout)  # fmt: skip
    rows = out["results"]
    assert {(r["filler"], r["context"], r["level"]) for r in rows} == {
        (f, c, lv) for f in ("repetitive", "real") for c in (120, 200) for lv in ("0", "1")
    }
    assert all(r["trials"] == 2 and 0 <= r["correct"] <= 2 and len(r["hits"]) == 2 for r in rows)


def test_passkey_probe_has_exact_length_and_needle(tokenizer):
    filler = tokenizer("The grass is green. " * 50, add_special_tokens=False).input_ids
    probe = build_probe(tokenizer, filler, 300, "48213", 0.5)
    assert len(probe.ids) == 300
    text = tokenizer.decode(probe.ids)
    assert "The pass key is 48213" in text and text.endswith("The pass key is")
    assert answer_matches(" 48213. Remember", "48213") and not answer_matches(" 4821", "48213")
    with pytest.raises(ValueError, match="too short"):
        build_probe(tokenizer, filler, 20, "48213", 0.5)


def test_eval_recency_json_and_plot(tiny_checkpoint, tiny_run, tmp_path):
    plot = tmp_path / "recency.png"
    out = json.loads(run_cli("eval", "recency", "--model", str(tiny_checkpoint), "--dsla", str(tiny_run["dsla"]),
                             "--gla", str(tiny_run["gla"]), "--data", str(tiny_run["text"]), "--seq-len", "320",
                             "--plot", str(plot), "--json").stdout)  # fmt: skip
    assert set(out["profiles"]) == {"attention", "dsla", "gla"} and out["layer"] == 1
    for profile in out["profiles"].values():
        assert len(profile) == len(out["bins"]) and sum(profile) == pytest.approx(1.0, abs=1e-4)
    assert plot.stat().st_size > 1000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_distance_bins_cover_the_range():
    bins = distance_bins(320)
    assert bins[0] == (0, 1) and bins[-1][1] == 320
    assert all(a < b for a, b in bins) and all(bins[i][1] == bins[i + 1][0] for i in range(len(bins) - 1))


def test_lm_eval_on_a_local_task(tmp_path):
    """The embedded model, all attention, on four easy two-choice items through lm-eval."""
    from dsla_serve.eval.lm_eval import evaluate

    items = [
        {"question": "The capital of France is", "choices": [" Paris", " banana"], "answer": 0},
        {"question": "One, two, three, four,", "choices": [" purple", " five"], "answer": 1},
        {"question": "The opposite of hot is", "choices": [" cold", " seven"], "answer": 0},
        {"question": "Monday, Tuesday,", "choices": [" Wednesday", " carpet"], "answer": 0},
    ]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(x) for x in items))
    (tmp_path / "tiny_mc.yaml").write_text(
        "task: dsla_tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'items.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{question}}'\n"
        "doc_to_choice: '{{choices}}'\ndoc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n"
    )
    results = evaluate(["dsla_tiny_mc"], {"weights": "none", "conversion": 0.0}, include_path=str(tmp_path))
    assert results["results"]["dsla_tiny_mc"]["acc,none"] == 1.0


def test_eval_rejects_bad_levels(tiny_checkpoint, tiny_run):
    bad = run_cli("eval", "ppl", "--model", str(tiny_checkpoint), "--weights", str(tiny_run["dsla"]),
                  "--data", str(tiny_run["text"]), "--conversion", "0,abc", check=False)  # fmt: skip
    assert bad.returncode == 2 and "comma-separated numbers" in bad.stderr


def test_perplexity_matches_manual_nll(tiny_checkpoint, tiny_run, tokenizer):
    from dsla_serve.eval.perplexity import perplexity

    loaded = load_base(str(tiny_checkpoint))
    ids = load_data(tiny_run["text"], tokenizer, seq_len=64, val_percent=25, max_val_blocks=2).val
    logits = loaded.model(ids, use_cache=False).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert perplexity(HybridModel(loaded.model), ids, []) == pytest.approx(nll.exp().item(), rel=1e-4)
