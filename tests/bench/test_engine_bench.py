"""The speed and memory suite on a tiny Llama saved as a local checkpoint: rows, ratios, memory laws, report."""

from __future__ import annotations

import pytest

from dsla_serve.bench.engine import BenchSettings, Engines, bench_decode, run_suites
from dsla_serve.bench.report import write_bench


@pytest.fixture(scope="module")
def result(tiny_model_dir) -> dict:
    settings = BenchSettings(contexts=[32, 64], batches=[1, 2], levels=[0.0, 0.5, 1.0], batch_levels=[0.0, 0.5],
                             repeats=2, single_run_tokens=64, memory_measured_max=32, decode_tokens=3,
                             batch_context=32, warm_up_s=0.2, model=str(tiny_model_dir), weights=None,
                             baselines=["hf-generate", "llama.cpp"])  # fmt: skip
    return run_suites(["prefill", "decode", "memory"], settings)


@pytest.mark.parametrize("suite", ["prefill", "decode"])
def test_every_point_has_its_engines_and_ratios_to_our_zero_level(result, suite):
    rows = result[suite]
    points = {(r["context"], r["batch"]) for r in rows}
    assert points == {(32, 1), (64, 1), (32, 2)}
    for ctx, batch in points:
        here = [r for r in rows if (r["context"], r["batch"]) == (ctx, batch)]
        ours = {0.0, 0.5, 1.0} if batch == 1 else {0.0, 0.5}  # batch points run batch_levels only
        assert {(r["engine"], r["level"]) for r in here} == {("dsla-serve", lv) for lv in ours} | {("hf-generate", 0.0)}
        base = next(r for r in here if r["engine"] == "dsla-serve" and r["level"] == 0.0)
        assert base["median_s"] > 0 and base["vs_ours_level0"] == pytest.approx(1.0)
        assert all(r["vs_ours_level0"] == pytest.approx(base["median_s"] / r["median_s"]) for r in here)
    assert any("llama.cpp skipped" in n for n in result["notes"])  # a local non-GGUF model


def test_long_prefill_points_run_once_and_say_so(result):
    runs = {(r["context"], r["batch"]): len(r["times_s"]) for r in result["prefill"]}
    assert runs == {(32, 1): 2, (64, 1): 1, (32, 2): 1}
    assert any("timed once" in n and "64x1" in n for n in result["notes"])


def test_decode_reaches_each_level_by_folding(result):
    rows = [r for r in result["decode"] if r["engine"] == "dsla-serve" and r["batch"] == 1]
    assert all(len(r["times_s"]) == 3 for r in rows)
    by_level = {(r["level"], r["context"]): r["cache_bytes_per_seq"] for r in rows}
    assert by_level[(1.0, 32)] == by_level[(1.0, 64)]  # all state: no KV left after folding
    assert by_level[(0.0, 64)] > by_level[(0.5, 64)] > by_level[(1.0, 64)]


def test_memory_grows_with_context_for_attention_and_not_for_full_dsla(result):
    mem = {(r["level"], r["context"]): r["bytes"] for r in result["memory"] if r["engine"] == "dsla-serve"}
    assert all(r["bytes"] == r["formula_bytes"] for r in result["memory"] if r["engine"] == "dsla-serve")
    sources = {(r["engine"], r["context"]): r["source"] for r in result["memory"]}
    assert sources[("dsla-serve", 32)] == "measured" and sources[("dsla-serve", 64)] == "formula"
    hf = {r["context"]: r["bytes"] for r in result["memory"] if r["engine"] == "hf-generate"}
    assert hf[64] == 2 * hf[32] == 2 * mem[(0.0, 32)]  # same KV layout as ours at 0 %
    assert mem[(1.0, 32)] == mem[(1.0, 64)]
    assert mem[(0.0, 64)] == 2 * mem[(0.0, 32)]
    assert mem[(0.0, 64)] > mem[(0.5, 64)] > mem[(1.0, 64)]


def test_report_writes_markdown_json_and_plots(result, tmp_path):
    md = write_bench(result, tmp_path)
    text = md.read_text()
    assert "## Targets" in text and "## Decode" in text and "| 64 | 1 |" in text
    assert (tmp_path / "bench.json").stat().st_size > 0
    assert len(list(tmp_path.glob("*.png"))) >= 3


def test_decode_batch_sizes_of_a_context_take_turns_step_by_step(tiny_model_dir):
    """The batch sweep's tokens/s ratios come from steps that alternate, not from runs minutes apart."""
    settings = BenchSettings(contexts=[32], batches=[1, 2], levels=[0.0, 1.0], batch_levels=[0.0], decode_tokens=3,
                             batch_context=32, model=str(tiny_model_dir), weights=None, baselines=[])  # fmt: skip
    e = Engines(settings)  # no warm-up: bench_decode alone
    steps: list[int] = []
    e.model.register_forward_pre_hook(lambda _, args: steps.append(args[0].shape[0]) if args[0].shape[1] == 1 else None)
    rows = bench_decode(e)
    assert steps == [1, 1, 2] * 3  # batch 1 at levels 0 and 1, then batch 2 at level 0, step after step
    assert {(r["batch"], r["level"]) for r in rows} == {(1, 0.0), (1, 1.0), (2, 0.0)}
    assert all(len(r["times_s"]) == 3 for r in rows)
