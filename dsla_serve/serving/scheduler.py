"""Continuous-batching scheduler: who joins, who decodes, how many prompt tokens each prefill gets.

It sees token counts and byte counts only (no tensors), so it is tested with fake requests and a
fake runner (tests/serving/test_scheduler.py). Every
step: expire requests that waited too long, admit waiting requests first come first served while
the memory budget and the sequence limit allow, decode every running sequence whose prompt is done,
and share a prefill token budget among the sequences still reading their prompt, so a long prompt
is read in chunks between decode steps instead of stalling everyone. A request that asks for
prompt logprobs gets logits for every prompt position of its chunk, (chunk × vocab) floats: its
chunks are capped at ``logprobs_chunk`` tokens so that buffer stays small whatever the prefill chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from dsla_serve.serving.request import Request, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16  # running sequences (the decode batch)
    max_waiting: int = 64  # queued requests beyond which new ones get 429
    memory_budget: int = 4 << 30  # bytes of KV cache + DSLA state across running sequences
    prefill_chunk: int = 512  # prompt tokens per step while others decode
    idle_prefill_chunk: int = 2048  # ... and while nobody decodes (nobody to stall)
    logprobs_chunk: int = (
        128  # prompt tokens per step with prompt logprobs (their logits are now built in 64-row blocks)
    )
    queue_timeout_s: float = 120.0  # a request not admitted by then gets 503

    def __post_init__(self) -> None:
        for name in (
            "max_num_seqs",
            "max_waiting",
            "memory_budget",
            "prefill_chunk",
            "idle_prefill_chunk",
            "logprobs_chunk",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.queue_timeout_s <= 0:
            raise ValueError(f"queue_timeout_s must be > 0, got {self.queue_timeout_s}")


@dataclass
class SchedulerOutput:
    """One step's work; the engine allocates caches for ``admitted`` before running it."""

    admitted: list[Request] = field(default_factory=list)
    decode: list[Request] = field(default_factory=list)  # one token each, one batched call
    prefill: list[tuple[Request, int]] = field(default_factory=list)  # (request, prompt tokens to read now)
    expired: list[Request] = field(default_factory=list)  # waited longer than queue_timeout_s

    @property
    def empty(self) -> bool:
        return not (self.decode or self.prefill or self.expired)


class Scheduler:
    """Holds the waiting queue and the running set.

    ``plan_size(request)`` is the controller's choice of DSLA layer count for a new sequence;
    ``bytes_for(dsla_count, capacity)`` what its cache will take.
    """

    def __init__(
        self, config: SchedulerConfig, plan_size: Callable[[Request], int], bytes_for: Callable[[int, int], int]
    ):
        self.config, self.plan_size, self.bytes_for = config, plan_size, bytes_for
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.blocked_need = 0  # bytes the queue head needs while it does not fit, else 0

    @property
    def used(self) -> int:
        return sum(r.reserved for r in self.running)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def remove(self, req: Request) -> None:
        if req.status == Status.WAITING and req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        req.status = Status.FINISHED

    def schedule(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput()
        c = self.config
        for req in list(self.waiting):
            if now - req.arrival > c.queue_timeout_s:
                self.waiting.remove(req)
                out.expired.append(req)
        used, self.blocked_need = self.used, 0
        while self.waiting and len(self.running) < c.max_num_seqs:
            req = self.waiting[0]
            count = self.plan_size(req)
            need = self.bytes_for(count, req.capacity)
            if used + need > c.memory_budget:
                self.blocked_need = need  # first come first served: no overtaking, so no starvation
                break
            self.waiting.popleft()
            req.status, req.dsla_count, req.reserved = Status.RUNNING, count, need
            used += need
            self.running.append(req)
            out.admitted.append(req)
        out.decode = [r for r in self.running if r.prefilled]
        budget = c.prefill_chunk if out.decode else c.idle_prefill_chunk
        for req in self.running:
            if budget <= 0:
                break
            if not req.prefilled:
                n = min(req.prompt_len - req.num_computed, budget)
                if req.params.prompt_logprobs is not None:
                    n = min(n, c.logprobs_chunk)
                out.prefill.append((req, n))
                budget -= n
        return out

    def memory_pressure(self) -> float:
        """Reserved bytes over the budget; counts the blocked queue head, so >= 1 means 'cannot admit'."""
        return (self.used + self.blocked_need) / self.config.memory_budget

    def waiting_tokens(self) -> int:
        return sum(r.prompt_len for r in self.waiting)
