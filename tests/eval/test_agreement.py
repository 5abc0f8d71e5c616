"""Per-domain perplexity and teacher/student agreement on a tiny model and a tiny corpus directory."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsla_serve.distill.data import CORPUS_FORMAT
from dsla_serve.eval.agreement import agreement_by_level, agreement_scores, corpus_prompts, greedy
from dsla_serve.model import HybridModel, convert
from tests.conftest import randomize_gates, tiny_llama
from tests.test_cli import run_cli

DOMAINS = {
    "prose": "The keeper of the lighthouse wrote the weather in his book every evening before the lamp was lit.",
    "code": "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n",
    "dialogue": "A: How was the harbour today?\nB: Calm in the morning, then the wind rose.\nA: Did the boats come in?",
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A `data corpus` layout: manifest + <domain>/{train,val}.jsonl, three domains of distinct text."""
    root = tmp_path_factory.mktemp("corpus")
    for d, text in DOMAINS.items():
        (root / d).mkdir()
        for split, n in (("train", 2), ("val", 6)):
            docs = [{"name": f"{d}/{split}{i}", "text": f"{i}. " + text * 4} for i in range(n)]
            (root / d / f"{split}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    manifest = {"format": CORPUS_FORMAT, "domains": {d: {} for d in DOMAINS}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_eval_ppl_per_domain_json(tiny_checkpoint, corpus):
    out = json.loads(run_cli("eval", "ppl", "--model", str(tiny_checkpoint), "--weights", "none", "--data",
                             str(corpus), "--seq-len", "32", "--blocks", "3", "--conversion", "0,0.34,1",
                             "--json").stdout)  # fmt: skip
    assert list(out["domains"]) == list(DOMAINS) and out["blocks_per_domain"] == 3
    for d in DOMAINS:
        levels = out["domains"][d]["levels"]
        assert out["domains"][d]["tokens"] == 3 * 32
        assert [lv["conversion"] for lv in levels] == [0, 0.34, 1] and levels[0]["ratio_to_attention"] == 1.0
        assert all(lv["ppl"] > 1 for lv in levels)
    for i, row in enumerate(out["geomean"]):
        ratios = [out["domains"][d]["levels"][i]["ratio_to_attention"] for d in DOMAINS]
        assert row["geomean_ratio_to_attention"] == pytest.approx(math.prod(ratios) ** (1 / 3))
    assert out["geomean"][0]["geomean_ratio_to_attention"] == pytest.approx(1.0)
    bad = run_cli("eval", "ppl", "--model", str(tiny_checkpoint), "--weights", "none", "--data", str(corpus),
                  "--domains", "poetry", "--json", check=False)  # fmt: skip
    assert bad.returncode == 2 and "poetry" in bad.stderr


def test_eval_agreement_json(tiny_checkpoint, corpus):
    out = json.loads(run_cli("eval", "agreement", "--model", str(tiny_checkpoint), "--weights", "none", "--data",
                             str(corpus), "--prompts", "5", "--prompt-tokens", "16", "--new-tokens", "8",
                             "--conversion", "0,1", "--json").stdout)  # fmt: skip
    assert out["prompts"] == 5 and out["new_tokens"] == 8 and "position-wise" in out["reported"]["agreement"]
    zero, full = out["levels"]
    assert (zero["agreement"], zero["prefix_match"], zero["kl_per_token"]) == (1.0, 1.0, 0.0)  # the teacher itself
    assert full["dsla_layers"] == [0, 1, 2] and set(full["domains"]) == set(DOMAINS)
    assert sum(v["prompts"] for v in full["domains"].values()) == 5
    for row in [full, *full["domains"].values()]:
        assert 0 <= row["prefix_match"] <= row["agreement"] <= 1 and 0 <= row["kl_per_token"] < 50


def test_eval_agreement_against_a_teacher_in_another_precision(tiny_checkpoint, corpus):
    """--reference-dtype: the all-attention teacher runs in float32, the students in bfloat16, so level 0
    measures what bfloat16 alone changes (against itself it would score agreement 1 and KL 0)."""
    out = json.loads(run_cli("eval", "agreement", "--model", str(tiny_checkpoint), "--weights", "none", "--data",
                             str(corpus), "--prompts", "4", "--prompt-tokens", "16", "--new-tokens", "8",
                             "--conversion", "0", "--dtype", "bfloat16", "--reference-dtype", "float32",
                             "--json").stdout)  # fmt: skip
    assert out["dtype"] == "bfloat16" and out["teacher"].endswith("float32")
    (zero,) = out["levels"]
    assert zero["dsla_layers"] == [] and 0 <= zero["kl_per_token"] < 0.05
    assert zero["agreement"] < 1 or zero["kl_per_token"] > 0  # scored against itself it would be 1 and 0
    assert 0 <= zero["prefix_match"] <= zero["agreement"] <= 1


def test_agreement_scores_positionwise_vs_prefix():
    teacher = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    student = torch.tensor([[1, 9, 3, 4], [5, 6, 7, 8]])
    match, prefix = agreement_scores(teacher, student)
    assert match.tolist() == [0.75, 1.0] and prefix.tolist() == [0.25, 1.0]


def test_batched_greedy_matches_one_by_one_and_kl_grows_with_conversion(tokenizer):
    base = tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=3)
    modules = convert(base, [0, 1, 2])
    randomize_gates(modules.values(), std=0.5)
    model = HybridModel(base)
    texts = {d: [t * 3] for d, t in DOMAINS.items()}
    prompts = corpus_prompts(texts, tokenizer, 3, 12)
    assert [d for d, _ in prompts] == list(DOMAINS) and all(len(p) == 12 for _, p in prompts)
    ids = torch.tensor([p for _, p in prompts])
    batched = greedy(model, ids, [0, 2], 6)
    single = torch.cat([greedy(model, ids[i : i + 1], [0, 2], 6) for i in range(3)])
    assert torch.equal(batched, single)
    rows = agreement_by_level(model, prompts, [2, 0, 1], [0, 1 / 3, 1], new_tokens=6, batch=2)
    assert rows[0]["kl_per_token"] == 0.0 and rows[1]["dsla_layers"] == [2]
    assert rows[1]["kl_per_token"] > 0 and rows[2]["kl_per_token"] > 0
    with pytest.raises(ValueError, match="levels must be in"):
        agreement_by_level(model, prompts, [2, 0, 1], [1.5])
