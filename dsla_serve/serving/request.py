"""Plain data between the API layer and the engine: a request, its parameters, its outputs, its errors.

A request is one prompt (one choice of an HTTP call). The engine thread owns it once submitted and
hands back ``Output`` objects through ``sink``: one per step in which something happened to it.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer

from dsla_serve.model import SequenceCache
from dsla_serve.serving.text import TextStream


class EngineError(Exception):
    """A request the engine cannot serve; ``status`` is the HTTP status the API answers with."""

    def __init__(
        self, status: int, message: str, code: str, retry_after: int | None = None, error_id: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.code, self.retry_after = status, message, code, retry_after
        self.error_id = error_id  # set on internal errors: the id the log line carries, for the client to quote


def internal_error() -> EngineError:
    """A 500 that tells the client nothing of the server's internals, only an id to quote; the caller logs
    the exception with its traceback under the same id."""
    eid = uuid.uuid4().hex[:16]
    return EngineError(
        500, f"internal server error (error id {eid}); other requests are unaffected, quote the id when reporting it",
        "internal_error", error_id=eid,
    )  # fmt: skip


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
    dsla_max_level: float = 1.0  # most conversion this request accepts (body "dsla": {"max_level": ...})


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
    dsla_layers: int | None = None  # once finished: the layers it ran as DSLA at the end


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
        self.text_stream: TextStream | None = None  # made on the engine thread at the first token
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

    def add_token(self, token: int, backend: Tokenizer) -> tuple[str, bool]:
        """Append a generated token; return (new text that is safe to send, stopped by a stop string).
        ``backend``: the tokenizers ``Tokenizer`` (``text.backend_of``)."""
        self.output_ids.append(token)
        if self.text_stream is None:
            self.text_stream = TextStream(backend, self.params.stop)
        return self.text_stream.push(token)

    def flush(self) -> str:
        """Text held back so far (a partial stop string or character that never completed)."""
        return self.text_stream.flush() if self.text_stream is not None else ""
