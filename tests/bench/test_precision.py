"""Precision modes: one run measures every mode on a tiny checkpoint; the choice respects the limits."""

from __future__ import annotations

from dsla_serve.bench.precision import choose, run
from tests.conftest import write_corpus


def row(dtype, ms, ratio):
    return {"dtype": dtype, "ms_per_token": ms, "ppl_ratio_to_float32": ratio}


def test_choice_is_fastest_within_limits():
    rows = [row("float32", 10, 1.0), row("bfloat16", 6, 1.004), row("int8", 4, 1.03), row("int4", 3, 1.015)]
    assert choose(rows) == "int4"
    rows[-1]["ppl_ratio_to_float32"] = 1.05  # int4 now costs too much, int8 too: bf16 is the fastest left
    assert choose(rows) == "bfloat16"
    assert choose([row("float32", 10, 1.0), row("bfloat16", 11, 1.0)]) == "float32"
    rows[1]["decode_ppl_ratio_to_float32"] = 1.02  # bf16 within its limit on a full forward, not in decode
    assert choose(rows) == "float32"


def test_run_measures_every_mode(tiny_checkpoint, tmp_path):
    write_corpus(tmp_path / "text", docs=80)
    result = run(str(tiny_checkpoint), None, ("float32", "bfloat16", "int8"), (40,), (0.0, 1.0), blocks=2,
                 decode_tokens=3, data=str(tmp_path / "text"), seq_len=64, log=lambda m: None)  # fmt: skip
    rows = result["rows"]
    assert {(r["dtype"], r["level"]) for r in rows} == {
        (d, lv) for d in ("float32", "bfloat16", "int8") for lv in (0, 1)
    }
    assert all(r["ms_per_token"] > 0 and r["ppl"] > 1 for r in rows)
    ref = [r for r in rows if r["dtype"] == "float32"]
    assert all(r["ppl_ratio_to_float32"] == 1.0 for r in ref)
    assert all(abs(r["ppl_ratio_to_float32"] - 1) < 0.1 for r in rows)  # low precision stays close
    assert all(r["decode_ppl"] > 1 and abs(r["decode_ppl_ratio_to_float32"] - 1) < 0.1 for r in rows)
    assert all(r["decode_ppl_ratio_to_float32"] == 1.0 for r in ref)
    assert result["choice"] in ("float32", "bfloat16", "int8")
