"""Data loading, layer order, and chained distillation (loss goes down, interrupted runs resume)."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch

from dsla_serve.distill.data import DataError, load_data, read_documents
from dsla_serve.distill.losses import LossWeights
from dsla_serve.distill.order import attention_entropy, kl_sensitivity, order_from_scores
from dsla_serve.distill.train import DistillConfig, distill
from dsla_serve.model import CheckpointError, HybridModel, convert
from tests.conftest import tiny_llama, write_corpus


@pytest.fixture
def corpus(tmp_path, tokenizer):
    write_corpus(tmp_path / "text", docs=40)
    return load_data(tmp_path / "text", tokenizer, seq_len=64, val_percent=20, max_train_blocks=8, max_val_blocks=4)


def test_data_formats_and_errors(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text('{"text": "first doc"}\n\n{"text": "second doc"}\n')
    assert [t for _, t in read_documents(tmp_path / "a.jsonl")] == ["first doc", "second doc"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2"):
        read_documents(tmp_path / "bad.jsonl")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["x y z", "u v w"]}), tmp_path / "t.parquet")
    assert len(read_documents(tmp_path / "t.parquet")) == 2
    with pytest.raises(DataError, match="does not exist"):
        read_documents(tmp_path / "missing")
    with pytest.raises(DataError, match="empty train or validation"):
        load_data(tmp_path / "a.jsonl", tokenizer, seq_len=8)


def test_split_is_by_document_and_deterministic(corpus, tmp_path, tokenizer):
    again = load_data(tmp_path / "text", tokenizer, seq_len=64, val_percent=20, max_train_blocks=8, max_val_blocks=4)
    assert again.fingerprint == corpus.fingerprint and torch.equal(again.train, corpus.train)
    assert corpus.train.shape == (8, 64) and corpus.val.shape == (4, 64)
    other = load_data(tmp_path / "text", tokenizer, seq_len=64, val_percent=20, max_train_blocks=8, seed=1)
    assert other.fingerprint != corpus.fingerprint


def test_entropy_order_on_tiny_model(corpus):
    hybrid = HybridModel(tiny_llama(vocab_size=49152))
    scores = attention_entropy(hybrid, corpus.train[:2])
    assert len(scores) == 4 and all(0 < s < 64 for s in scores)  # entropy of <= 64 positions: below ln(64)·...
    order = order_from_scores(scores)
    assert sorted(order) == [0, 1, 2, 3] and scores[order[0]] == min(scores)


def test_kl_sensitivity_on_tiny_model(corpus):
    hybrid = HybridModel(tiny_llama(vocab_size=49152))
    scores = kl_sensitivity(
        hybrid, corpus.train[:2], corpus.val[:2], DistillConfig(order=[], steps=3, bf16_frozen=False)
    )
    assert len(scores) == 4 and all(s > 0 for s in scores)
    assert not any(hybrid.dsla_layers)  # every layer put back


def run_chain(model, corpus, out, **kw):
    cfg = DistillConfig(order=[2, 0], steps=25, batch_size=2, lr=1e-2, bf16_frozen=False, **kw)
    return distill(HybridModel(model), corpus, cfg, out)


def test_chained_distillation_lowers_loss_and_records_manifest(corpus, tmp_path):
    manifest = run_chain(tiny_llama(vocab_size=49152), corpus, tmp_path / "run",
                         weights=LossWeights(attn=1.0, hidden=0.5))  # fmt: skip
    chain = manifest["chain"]
    assert [c["layer"] for c in chain] == [2, 0] and manifest["order"] == [2, 0]
    for c in chain:
        for term in ("attn", "hidden"):
            assert c["local"][term]["last"] < c["local"][term]["first"], (c["layer"], term)
        assert c["val_ppl"] > 0 and c["val_ppl_ratio"] == pytest.approx(c["val_ppl"] / manifest["teacher_val_ppl"])
    assert manifest["data_fingerprint"] == corpus.fingerprint
    assert manifest["hyperparameters"]["steps"] == 25
    assert sorted(manifest["layers"]) == ["0", "2"]


def test_e2e_stage_lowers_kl(corpus, tmp_path):
    manifest = run_chain(tiny_llama(vocab_size=49152), corpus, tmp_path / "run", e2e_steps=15, e2e_seq_len=32,
                         weights=LossWeights(attn=1.0, kl=1.0, ce=0.1))  # fmt: skip
    for c in manifest["chain"]:
        assert c["e2e"]["kl"]["last"] < c["e2e"]["kl"]["first"]


def test_prefix_e2e_with_window_and_adapters_lowers_kl_and_resumes(corpus, tmp_path):
    """The chosen design: window + adapters, an e2e stage training every converted layer so far.

    The first layer is trained again at the second step (and saved again); a run interrupted in the
    second layer's e2e stage resumes from the first layer as it was saved."""
    from dsla_serve.config import DSLAConfig

    out = tmp_path / "run"
    kw = dict(order=[2, 0], steps=10, batch_size=2, lr=1e-2, bf16_frozen=False, e2e_steps=12, e2e_seq_len=32,
              e2e_scope="prefix", e2e_lr=3e-3, dsla=DSLAConfig(window=8, adapter_rank=4),
              weights=LossWeights(attn=1.0, kl=1.0))  # fmt: skip

    def stop_in_second_e2e(phase, step, total, losses):
        if phase == "layer 0 e2e" and step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(HybridModel(tiny_llama(vocab_size=49152)), corpus, DistillConfig(**kw), out, stop_in_second_e2e)

    def layer_file(manifest, i):
        return out / manifest["layers"][str(i)]["file"]

    after_first = layer_file(json.loads((out / "manifest.json").read_text()), 2).read_bytes()
    manifest = distill(HybridModel(tiny_llama(vocab_size=49152)), corpus, DistillConfig(**kw), out)
    assert [c["layer"] for c in manifest["chain"]] == [2, 0]
    # the first step's e2e KL falls; the second's is dominated by which random blocks a step draws
    first = manifest["chain"][0]["e2e"]["kl"]
    assert first["last"] < 0.8 * first["first"]
    assert layer_file(manifest, 2).read_bytes() != after_first  # the prefix stage trained layer 2 again
    # the re-saved layer went to a new file, swapped in with the manifest; the old one is gone
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(e["file"] for e in manifest["layers"].values())
    assert manifest["dsla_config"]["window"] == 8 and manifest["dsla_config"]["adapter_rank"] == 4


def test_interrupted_run_resumes_and_skips_finished_layers(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = DistillConfig(order=[2, 0, 1], steps=10, bf16_frozen=False)
    calls = []

    def interrupt_after_first_layer(phase, step, total, losses):
        calls.append(phase)
        if phase == "layer 0 local":  # second layer of the order is training: stop the run
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        distill(HybridModel(tiny_llama(vocab_size=49152)), corpus, cfg, out, interrupt_after_first_layer)
    first = json.loads((out / "manifest.json").read_text())
    assert [c["layer"] for c in first["chain"]] == [2]
    digest = hashlib.sha256((out / "layer_2.safetensors").read_bytes()).hexdigest()

    phases = []
    manifest = distill(HybridModel(tiny_llama(vocab_size=49152)), corpus, cfg, out, lambda p, *a: phases.append(p))
    assert [c["layer"] for c in manifest["chain"]] == [2, 0, 1]
    assert not any(p.startswith("layer 2") for p in phases)  # not retrained
    assert hashlib.sha256((out / "layer_2.safetensors").read_bytes()).hexdigest() == digest
    assert manifest["chain"][0] == first["chain"][0]

    with pytest.raises(ValueError, match="different hyperparameters"):
        distill(HybridModel(tiny_llama(vocab_size=49152)), corpus, DistillConfig(order=[2, 0, 1], steps=11), out)
    with pytest.raises(ValueError, match="different order"):
        distill(
            HybridModel(tiny_llama(vocab_size=49152)),
            corpus,
            DistillConfig(order=[0, 2, 1], steps=10, bf16_frozen=False),
            out,
        )


def test_a_shorter_run_is_extended(corpus, tmp_path):
    out = tmp_path / "run"
    distill(
        HybridModel(tiny_llama(vocab_size=49152)), corpus, DistillConfig(order=[2], steps=5, bf16_frozen=False), out
    )
    phases = []
    manifest = distill(HybridModel(tiny_llama(vocab_size=49152)), corpus,
                       DistillConfig(order=[2, 1], steps=5, bf16_frozen=False), out, lambda p, *a: phases.append(p))  # fmt: skip
    assert [c["layer"] for c in manifest["chain"]] == [2, 1] and manifest["order"] == [2, 1]
    assert not any(p.startswith("layer 2") for p in phases)


def test_distilled_layers_refuse_another_base(corpus, tmp_path):
    run_chain(tiny_llama(vocab_size=49152), corpus, tmp_path / "run")
    with pytest.raises(CheckpointError, match="another base model"):
        convert(tiny_llama(seed=3, vocab_size=49152), [2], weights=tmp_path / "run")


def test_several_sources_alternate_and_keep_their_split(tmp_path, tokenizer):
    write_corpus(tmp_path / "a", docs=30, seed=1)
    write_corpus(tmp_path / "b", docs=30, seed=2)
    alone = load_data(tmp_path / "b", tokenizer, seq_len=64, val_percent=20)
    both = load_data(f"{tmp_path / 'a'},{tmp_path / 'b'}", tokenizer, seq_len=64, val_percent=20, max_train_blocks=6)
    a = load_data(tmp_path / "a", tokenizer, seq_len=64, val_percent=20)
    assert both.documents == 60 and both.train.shape == (6, 64)
    b_train = {tuple(r.tolist()) for r in alone.train}
    a_train = {tuple(r.tolist()) for r in a.train}
    assert [tuple(r.tolist()) in a_train for r in both.train] == [True, False] * 3
    assert all(tuple(r.tolist()) in b_train for r in both.train[1::2])
    val_rows = {tuple(r.tolist()) for r in both.val}
    assert {tuple(r.tolist()) for r in alone.val} <= val_rows  # b's held-out documents stay held out


def test_run_from_before_new_settings_still_resumes(corpus, tmp_path):
    """A manifest written before a setting existed resumes: the missing setting is taken at its default."""
    out = tmp_path / "run"
    cfg = dict(steps=5, bf16_frozen=False)
    distill(HybridModel(tiny_llama(vocab_size=49152)), corpus, DistillConfig(order=[2], **cfg), out)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["hyperparameters"]["e2e_scope"]
    for key in ("window", "adapter_rank", "adapters", "window_logit"):
        del manifest["hyperparameters"]["dsla"][key]
    (out / "manifest.json").write_text(json.dumps(manifest))
    extended = distill(HybridModel(tiny_llama(vocab_size=49152)), corpus, DistillConfig(order=[2, 0], **cfg), out)
    assert [c["layer"] for c in extended["chain"]] == [2, 0]


def test_learning_rate_schedule_reaches_its_peak_in_short_stages():
    from dsla_serve.distill.train import cosine_lr

    for steps in (3, 10, 300):
        lrs = [cosine_lr(s, steps) for s in range(steps)]
        assert max(lrs) == pytest.approx(1.0) and min(lrs) >= 0.1 - 1e-9
        assert lrs.index(max(lrs)) <= max(1, steps // 10)


def test_demote_moves_layers_past_a_prefix():
    from dsla_serve.distill.order import demote

    order = [5, 3, 9, 1, 7, 0, 2, 8, 4, 6]
    new = demote(order, [9, 7], past=4)
    assert new == [5, 3, 1, 0, 9, 7, 2, 8, 4, 6]
    assert sorted(new) == sorted(order)
    for n in range(4 + 2, len(order) + 1):  # prefixes from past + len(layers) on hold the same layers
        assert set(new[:n]) == set(order[:n])
    for bad in ([9, 9], [11]):
        with pytest.raises(ValueError, match="distinct layers"):
            demote(order, bad, past=2)
    with pytest.raises(ValueError, match="past"):
        demote(order, [9], past=10)
    with pytest.raises(ValueError, match="earlier"):  # 6 is last: past 2 others would promote it
        demote(order, [6], past=2)
