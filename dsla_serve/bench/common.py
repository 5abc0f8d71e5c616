"""Timing helpers shared by the benchmark suites: medians of repeated runs, ratios within one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable


def time_median(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict[str, float | list[float]]:
    """Run fn warmup + repeats times; median and all times in seconds."""
    return time_interleaved({0: fn}, repeats, warmup)[0]


def time_interleaved(
    fns: dict[Hashable, Callable[[], object]], repeats: int = 3, warmup: int = 0
) -> dict[Hashable, dict[str, float | list[float]]]:
    """Run every fn once per round, round after round; median and all times in seconds per key.

    Interleaving is what keeps ratios honest on a shared machine: a spell of outside load lands
    on one run of each candidate instead of on every run of one of them.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[Hashable, list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return {key: {"median_s": statistics.median(ts), "times_s": ts} for key, ts in times.items()}
