"""Timing helpers: interleaved runs take turns and report every time."""

from __future__ import annotations

from dsla_serve.bench.common import time_interleaved, time_median


def test_interleaved_runs_take_turns():
    calls: list[str] = []
    timed = time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4  # warm-up round, then three timed rounds
    assert all(len(t["times_s"]) == 3 and t["median_s"] >= 0 for t in timed.values())
    assert len(time_median(lambda: None, repeats=5, warmup=0)["times_s"]) == 5
