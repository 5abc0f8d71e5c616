"""Plain data between the API layer and the engine: a request, its parameters, its outputs, its errors.

A request is one prompt (one choice of an HTTP call). The engine thread owns it once submitted and
hands back ``Output`` objects through ``sink``: one per step in which something happened to it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from dsla_serve.generate import find_stop
from dsla_serve.model import SequenceCache


class EngineError(Exception):
    """A request the engine cannot serve; ``status`` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str, code: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after


@dataclass
class RequestParams:
    """Sampling and output options of one request (validated by the API layer)."""

    max_tokens: int = 16  # 0 only with prompt_logprobs/echo: score the prompt, generate nothing
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks, trace replay)
    logprobs: int | None = None  # top-k alternatives per generated token; None: no logprobs
    prompt_logprobs: int | None = None  # same for each prompt token (completions with echo)


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float | None  # None for the first prompt token (nothing predicts it)
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


@dataclass
class Output:
    """What happened to one request in one engine step."""

    index: int  # the request's choice index within its HTTP call
    text: str = ""  # new text since the last output
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] | None = None  # once, when the prompt is done
    admitted: bool = False  # the request left the queue (sent once)
    finish_reason: str | None = None  # "stop" | "length" once finished
    error: EngineError | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """One sequence: its prompt, parameters, cache, generated tokens and incremental text."""

    def __init__(
        self, request_id: str, prompt_ids: list[int], params: RequestParams,
        sink: Callable[[Output], None], index: int = 0,
    ):  # fmt: skip
        self.id, self.index, self.prompt_ids, self.params, self.sink = request_id, index, prompt_ids, params, sink
        self.arrival = time.monotonic()
        self.status = Status.WAITING
        self.dsla_count = 0  # runs DSLA at order[:dsla_count]
        self.cache: SequenceCache | None = None
        self.reserved = 0  # cache bytes held (as allocated)
        self.num_computed = 0  # prompt tokens prefilled
        self.prompt_lp: list[TokenLogprob] | None = None  # with prompt_logprobs, filled chunk by chunk
        self.output_ids: list[int] = []
        self.text = ""  # decoded output, stop string cut off
        self.sent = 0  # characters of text already sent
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def capacity(self) -> int:
        """Most tokens the cache will hold: KV buffers are preallocated to this."""
        return self.prompt_len + self.params.max_tokens

    @property
    def prefilled(self) -> bool:
        return self.num_computed >= self.prompt_len

    def add_token(self, token: int, tokenizer) -> tuple[str, bool]:
        """Append a generated token; return (new text that is safe to send, stopped by a stop string)."""
        self.output_ids.append(token)
        text = tokenizer.decode(self.output_ids, skip_special_tokens=True)
        cut = find_stop(text, self.params.stop)
        stopped = cut >= 0
        self.text = text[:cut] if stopped else text
        safe = len(self.text) if stopped else len(self.text) - holdback(self.text, self.params.stop)
        delta = self.text[self.sent : safe] if safe > self.sent else ""
        self.sent = max(self.sent, safe)
        return delta, stopped

    def flush(self) -> str:
        """Text held back so far (a partial stop string or character that never completed)."""
        delta = self.text[self.sent :]
        self.sent = len(self.text)
        return delta


def holdback(text: str, stop: list[str]) -> int:
    """Characters at the end of text not to send yet: an incomplete UTF-8 character, or a prefix of a stop string."""
    n = len(text) - len(text.rstrip("\ufffd"))
    for s in stop:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                n = max(n, k)
                break
    return n
