"""Prometheus metrics of one engine (its own registry, so several servers can live in one process).

The registry also carries the process's own metrics (``process_resident_memory_bytes``, CPU time,
open files): ``dsla-serve bench soak`` reads the server's memory from them.
"""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
RATE_WINDOW_S = 10.0  # tokens-per-second gauges average over this many seconds


class EngineMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)
        self.queue_depth = Gauge("dsla_queue_depth", "Requests waiting for admission.", registry=r)
        self.waiting_tokens = Gauge("dsla_waiting_prompt_tokens", "Prompt tokens of waiting requests.", registry=r)
        self.running = Gauge("dsla_running_sequences", "Sequences admitted and not finished.", registry=r)
        self.prompt_tokens = Counter("dsla_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("dsla_generation_tokens", "Tokens generated.", registry=r)
        self.prompt_tps = Gauge(
            "dsla_prompt_tokens_per_second", f"Prompt tokens prefilled per second over {RATE_WINDOW_S:.0f} s.",
            registry=r,
        )  # fmt: skip
        self.generation_tps = Gauge(
            "dsla_generation_tokens_per_second", f"Tokens generated per second over {RATE_WINDOW_S:.0f} s.",
            registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "dsla_time_to_first_token_seconds", "Arrival to first generated token.", buckets=LATENCY_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.tpot = Histogram(
            "dsla_time_per_output_token_seconds", "Time between consecutive tokens of a sequence.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.e2e = Histogram(
            "dsla_request_latency_seconds", "Arrival to finish of a request.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.level = Gauge(
            "dsla_conversion_level",
            "The controller's level: without a speed profile the most layers new sequences run as DSLA; with one "
            "its load state (each new sequence is planned on its own).",
            registry=r,
        )
        self.kv_bytes = Gauge("dsla_kv_cache_bytes", "KV-cache bytes held by running sequences.", registry=r)
        self.state_bytes = Gauge("dsla_state_bytes", "DSLA state bytes held by running sequences.", registry=r)
        self.state_pool_bytes = Gauge(
            "dsla_state_pool_bytes", "Bytes the DSLA state pools hold, free slots included.", registry=r
        )
        self.budget = Gauge("dsla_memory_budget_bytes", "Cache memory budget.", registry=r)
        self.pressure = Gauge("dsla_memory_pressure", "Reserved cache bytes (and the queue head) / budget.", registry=r)
        self.conversions = Counter(
            "dsla_layer_conversions", "Layers of running sequences folded from KV cache to DSLA state.", registry=r
        )
        self.decisions = Counter(
            "dsla_controller_decisions", "Conversion level changes.", ["direction", "trigger"], registry=r
        )
        self.requests = Counter("dsla_requests", "Requests by outcome.", ["outcome"], registry=r)
        self._window: deque[tuple[float, int, int]] = deque()  # (time, prompt tokens, generated tokens)

    def count_tokens(self, prompt: int, generated: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.prompt_tokens.inc(prompt)
        self.generation_tokens.inc(generated)
        self._window.append((now, prompt, generated))
        while self._window and now - self._window[0][0] > RATE_WINDOW_S:
            self._window.popleft()
        self.prompt_tps.set(sum(p for _, p, _ in self._window) / RATE_WINDOW_S)
        self.generation_tps.set(sum(g for _, _, g in self._window) / RATE_WINDOW_S)

    def render(self) -> bytes:
        return generate_latest(self.registry)
