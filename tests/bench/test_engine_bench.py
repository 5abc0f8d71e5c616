"""The speed and memory suite on a tiny Llama saved as a local checkpoint: rows, ratios, memory laws, report."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from dsla_serve.bench.engine import BenchSettings, run_suites
from dsla_serve.bench.report import write_bench
from dsla_serve.model.loader import resolve
from tests.conftest import tiny_llama


@pytest.fixture(scope="module")
def result(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("tiny-model")
    tok = AutoTokenizer.from_pretrained(resolve(None)[0])
    tiny_llama(0, vocab_size=len(tok), max_position_embeddings=256).save_pretrained(folder)
    tok.save_pretrained(folder)
    settings = BenchSettings(contexts=[32, 64], batches=[1, 2], levels=[0.0, 0.5, 1.0], repeats=2, warmup=0,
                             decode_tokens=3, batch_context=32, model=str(folder), weights=None,
                             baselines=["hf-generate", "llama.cpp"])  # fmt: skip
    return run_suites(["prefill", "decode", "memory"], settings)


def test_every_point_has_every_engine_and_ratios_to_our_zero_level(result):
    prefill = result["prefill"]
    points = {(r["context"], r["batch"]) for r in prefill}
    assert points == {(32, 1), (64, 1), (32, 2)}
    for ctx, batch in points:
        here = [r for r in prefill if (r["context"], r["batch"]) == (ctx, batch)]
        assert {(r["engine"], r["level"]) for r in here} >= {("dsla-serve", 0.0), ("dsla-serve", 0.5),
                                                             ("dsla-serve", 1.0), ("hf-generate", 0.0)}  # fmt: skip
        base = next(r for r in here if r["engine"] == "dsla-serve" and r["level"] == 0.0)
        assert base["median_s"] > 0 and base["vs_ours_level0"] == pytest.approx(1.0)
        assert all(r["vs_ours_level0"] == pytest.approx(base["median_s"] / r["median_s"]) for r in here)
    assert any("llama.cpp skipped" in n for n in result["notes"])  # a local non-GGUF model


def test_memory_grows_with_context_for_attention_and_not_for_full_dsla(result):
    mem = {(r["level"], r["context"]): r["bytes"] for r in result["memory"] if r["engine"] == "dsla-serve"}
    assert all(r["bytes"] == r["formula_bytes"] for r in result["memory"] if r["engine"] == "dsla-serve")
    assert mem[(1.0, 32)] == mem[(1.0, 64)]
    assert mem[(0.0, 64)] == 2 * mem[(0.0, 32)]
    assert mem[(0.0, 64)] > mem[(0.5, 64)] > mem[(1.0, 64)]


def test_report_writes_markdown_json_and_plots(result, tmp_path):
    md = write_bench(result, tmp_path)
    text = md.read_text()
    assert "## Targets" in text and "## Decode" in text and "| 64 | 1 |" in text
    assert (tmp_path / "bench.json").stat().st_size > 0
    assert len(list(tmp_path.glob("*.png"))) >= 3
