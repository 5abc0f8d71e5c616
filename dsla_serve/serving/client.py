"""The one interface between the HTTP layer and an engine (vLLM's ``EngineClient`` is the model).

The API handlers use only what is here: the served model's card, ``submit`` (a ``Job`` whose
outputs arrive on an asyncio queue), ``abort``, ``control`` of the conversion level, the latest
``snapshot`` and the metrics. The engine's live structures (scheduler queues, controller history)
are touched only by the engine's own thread: a snapshot is built there and published whole, so the
event loop never iterates a container another thread is changing.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsla_serve.model.pretrained import HybridInfo
from dsla_serve.serving.controller import Decision
from dsla_serve.serving.request import Output, Request, RequestParams


@dataclass(frozen=True)
class ServedModel:
    """What the HTTP layer needs to know of the model: names, limits, and the tokenizer it encodes with."""

    name: str
    context: int  # prompt + generated tokens, at most
    vocab_size: int
    tokenizer: Any  # a transformers tokenizer; the API layer encodes with it off the event loop
    info: HybridInfo


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state as its thread last published it (after a step or a command); never mutated."""

    time: float  # time.monotonic() when built
    running: int
    waiting: int
    retry_after_s: int  # what a rejected client should wait, from recent request latency and the queue
    state: dict = field(default_factory=dict)  # the GET /v1/dsla body


class Job:
    """The engine requests of one HTTP call (one per prompt); outputs arrive on an asyncio queue."""

    def __init__(self, prompts: list[list[int]], params: RequestParams, abort: Callable[[Job], None]):
        self.id = uuid.uuid4().hex[:24]
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.requests = [Request(f"{self.id}-{i}", p, params, self._put, i) for i, p in enumerate(prompts)]
        self.open = set(range(len(prompts)))  # choices not finished yet
        self._abort = abort

    def _put(self, out: Output) -> None:  # called on the engine thread
        with contextlib.suppress(RuntimeError):  # RuntimeError: the event loop is gone, nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    async def next(self) -> Output:
        out = await self.queue.get()
        if out.finish_reason is not None or out.error is not None:
            self.open.discard(out.index)
        return out

    @property
    def done(self) -> bool:
        return not self.open

    def abort(self) -> None:
        """Stop what is left of this job and free its caches (a client that went away)."""
        if self.open:
            self._abort(self)
            self.open.clear()


class EngineClient(ABC):
    """What the HTTP layer may do with an engine. ``AsyncEngine`` (engine.py) implements it."""

    model: ServedModel

    @abstractmethod
    def start(self) -> None:
        """Start serving; the app's lifespan calls it before the first request."""

    @abstractmethod
    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting, let what runs finish (up to timeout_s, then fail it with 503), stop."""

    @abstractmethod
    def health(self) -> str:
        """'ok', 'draining' (shutting down) or 'engine stopped'."""

    @abstractmethod
    def submit(self, prompts: list[list[int]], params: RequestParams) -> Job:
        """Queue one request per prompt. Raises EngineError: 400 (can never be served), 429 (queue full,
        with Retry-After), 503 (shutting down)."""

    @abstractmethod
    def abort(self, job: Job) -> None:
        """Abort the job's unfinished requests at the next step boundary (frees their caches)."""

    @abstractmethod
    async def control(
        self, policy: str | None = None, level: float | None = None, convert_running: bool = False
    ) -> tuple[Decision, EngineSnapshot]:
        """Apply a manual override at the next step boundary; the decision and the state right after it.
        Raises ValueError for an invalid policy or level."""

    @abstractmethod
    def snapshot(self) -> EngineSnapshot:
        """The latest published state (GET /v1/dsla, /health)."""

    @abstractmethod
    def metrics(self) -> bytes:
        """Prometheus text exposition."""
