"""Timing helpers shared by the benchmark suites: medians of repeated runs, ratios within one run."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def time_median(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> dict[str, float | list[float]]:
    """Run fn warmup + repeats times; median and all times in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "times_s": times}
