"""Timing helpers shared by the benchmark suites: medians of repeated runs, ratios within one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable

# NOTE(decisions): decoding before any timing, split between levels 0 and 1. With one step per level,
# the first point of two decode benches on the 2-core AMD machine (right after loading ours, Hugging
# Face's and llama.cpp's models) measured steps of 7.3-25 ms where the next point's took 7.3-17
# (medians: 0 % 11.1 vs 9.0 ms at twice the context); with 6 s, 6.6-12 ms at 512 tokens (median 7.4)
# but for one step of each level at 24-25 ms (an interruption that the levels' taking turns shares out).
WARM_UP_S = 6.0


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
