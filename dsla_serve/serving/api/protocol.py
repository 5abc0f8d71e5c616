"""OpenAI-compatible request models, their validation, and the pieces of responses built from engine outputs.

Known fields are validated strictly: a wrong type (no coercion: "5" is not an integer, "yes" not a
boolean), a value out of range or an unsupported option (n > 1, penalties, logit_bias, tools) is a
400 whose message names the field and what to do. Unknown fields are ignored and logged, as vLLM
does: clients such as lm-eval forward generation options this server has no use for.

Limits keep one request from costing the server more than its share: the body size (413, checked
before it is read), at most ``MAX_STOP`` stop strings of at most ``MAX_STOP_CHARS`` characters,
n = 1, logprobs <= 5 (chat: top_logprobs <= 20); prompt tokens and max_tokens are checked against
the context (and ``--max-prompt-tokens``) by the server.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from typing import Any, Literal

from fastapi import Request
from jinja2 import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsla_serve.serving.request import EngineError, RequestParams, TokenLogprob

log = logging.getLogger(__name__)

MAX_STOP = 4
MAX_STOP_CHARS = 256
TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}  # pydantic's names of union members


class ApiError(EngineError):
    """An error answered before the engine sees the request; ``param`` names the offending field."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None,
                 headers: dict[str, str] | None = None):  # fmt: skip
        super().__init__(status, message, code)
        self.param, self.headers = param, headers


def error_body(e: EngineError) -> dict:
    kind = "rate_limit_error" if e.status == 429 else "invalid_request_error" if e.status < 500 else "server_error"
    return {
        "error": {
            "message": e.message,
            "type": kind,
            "param": getattr(e, "param", None),
            "code": e.code,
        }
    }


class Body(BaseModel):
    """An OpenAI request body (or part of one): strict types, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI's parameters are nullable and clients send null for unset ones (``"stop": null``)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


class Strict(BaseModel):
    """A body of this server's own API (/v1/dsla): strict types, and an unknown field is a typo (400)."""

    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(Body):
    include_usage: bool = False


class DSLAOptions(Strict):
    """Extension ``"dsla": {"max_level": 0}``: the most conversion this request accepts (a quality floor)."""

    max_level: float = Field(1.0, ge=0, le=1)


class Common(Body):
    """Fields shared by completions and chat completions."""

    model: str
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = Field(None, validate_default=True)  # always a list once validated
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch.Generator.manual_seed takes
    user: str | None = None
    ignore_eos: bool = False  # extension (vLLM has it too): generate exactly max_tokens
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    dsla: DSLAOptions | None = None  # extension (OpenAI clients: extra_body={"dsla": {...}})

    @property
    def dsla_max_level(self) -> float:
        return self.dsla.max_level if self.dsla is not None else 1.0

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences, got {len(stops)}")
        longest = max(map(len, stops), default=0)
        if longest > MAX_STOP_CHARS:
            raise ValueError(f"a stop sequence has at most {MAX_STOP_CHARS} characters, got one of {longest}")
        return [s for s in stops if s]

    def check_supported(self) -> None:
        for name, ok, what in (
            ("n", self.n == 1, f"only n=1 is served (got n={self.n}): send one request per completion"),
            ("presence_penalty", self.presence_penalty == 0, "presence_penalty is not supported; leave it at 0"),
            ("frequency_penalty", self.frequency_penalty == 0, "frequency_penalty is not supported; leave it at 0"),
            ("logit_bias", not self.logit_bias, "logit_bias is not supported"),
        ):
            if not ok:
                raise ApiError(400, what, "unsupported_parameter", name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(Common):
    prompt: Any  # str | list[str] | list[int] | list[list[int]]: checked by ``prompts`` for a clear message
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.best_of not in (None, 1):
            raise ApiError(400, "only best_of=1 is supported", "unsupported_parameter", "best_of")
        if self.suffix:
            raise ApiError(400, "suffix (insertion) is not supported", "unsupported_parameter", "suffix")
        if self.max_tokens == 0 and not self.echo:
            raise ApiError(400, "max_tokens=0 is allowed only with echo=true (scoring the prompt)", "invalid_value",
                           "max_tokens")  # fmt: skip

    def params(self) -> RequestParams:
        return RequestParams(
            max_tokens=16 if self.max_tokens is None else self.max_tokens,
            temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop,
            ignore_eos=self.ignore_eos, logprobs=self.logprobs,
            prompt_logprobs=self.logprobs if self.echo else None, dsla_max_level=self.dsla_max_level,
        )  # fmt: skip

    def echo_texts(self, prompts: list[list[int]], tokenizer) -> list[str]:
        """The prompts as text, for echo: as sent when they were text, decoded when they were token ids."""
        items = zip(self.prompt_items, prompts, strict=True)
        return [p if isinstance(p, str) else tokenizer.decode(ids) for p, ids in items]

    @property
    def prompt_items(self) -> list:
        p = self.prompt
        return [p] if isinstance(p, str) or (isinstance(p, list) and p and all(is_token(t) for t in p)) else p

    def prompts(self, tokenizer, vocab_size: int) -> list[list[int]]:
        """The prompt(s) as token-id lists (lm-eval sends token ids; others send text)."""
        p = self.prompt_items
        shape = "a string, a list of strings, a list of token ids, or a list of token-id lists"
        if not isinstance(p, list) or not p:
            raise ApiError(400, f"prompt must be {shape}", "invalid_value", "prompt")
        out = []
        for item in p:
            if isinstance(item, str):
                out.append(tokenizer(item, add_special_tokens=False).input_ids)
            elif isinstance(item, list) and all(is_token(t) for t in item):
                bad = [t for t in item if not 0 <= t < vocab_size]
                if bad:
                    raise ApiError(400, f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                                   "invalid_value", "prompt")  # fmt: skip
                out.append(list(item))
            else:
                raise ApiError(400, f"prompt must be {shape}", "invalid_value", "prompt")
        return out


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(Common):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict] | None = None
    tool_choice: Any = None
    response_format: dict | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools or self.tool_choice not in (None, "none"):
            raise ApiError(400, "tool calling is not supported", "unsupported_parameter", "tools")
        if self.response_format and self.response_format.get("type") != "text":
            raise ApiError(400, "only response_format {'type': 'text'} is supported", "unsupported_parameter",
                           "response_format")  # fmt: skip
        if self.top_logprobs is not None and not self.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "invalid_value", "top_logprobs")

    def params(self, default_max_tokens: int) -> RequestParams:
        max_tokens = self.max_completion_tokens or self.max_tokens or default_max_tokens
        return RequestParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p, seed=self.seed, stop=self.stop,
            ignore_eos=self.ignore_eos, logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            dsla_max_level=self.dsla_max_level,
        )  # fmt: skip

    def prompt_ids(self, tokenizer) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, "this model has no chat template: use /v1/completions", "no_chat_template", "messages")
        messages = [{"role": m.role, "content": m.text()} for m in self.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:  # the template's own raise_exception (e.g. roles must alternate)
            raise ApiError(400, f"the chat template rejected these messages: {e}", "invalid_value", "messages") from e
        return tokenizer(text, add_special_tokens=False).input_ids


def field_path(loc: tuple) -> str:
    """'messages.0.content' from a pydantic error location, cut before a union member's type tag
    ('stop.str', 'stop.list[str]' -> 'stop'), so a union's failed alternatives read as one field."""
    keep = []
    for x in loc:
        if not (isinstance(x, int) or (re.fullmatch(r"[a-z_]+", x) and x not in TYPE_TAGS)):
            break
        keep.append(str(x))
    return ".".join(keep) or (str(loc[0]) if loc else "body")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or a 413 once it exceeds ``limit`` bytes (by its Content-Length, before reading it)."""
    declared = request.headers.get("content-length", "")
    too_large = ApiError(413, f"the request body exceeds this server's limit of {limit} bytes (--max-body-size)",
                         "request_too_large")  # fmt: skip
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def is_token(t: object) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """JSON body -> request model, or an ApiError naming what is wrong (one part per offending field)."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object", "invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", "invalid_json")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        fields: dict[str, list[str]] = {}  # field path -> what is wrong (several for a union: one per type tried)
        for err in e.errors():
            loc = field_path(err["loc"])
            if err["type"] == "extra_forbidden":
                msg = "unrecognized request argument"
            elif err["type"] == "missing":
                msg = "is required"
            else:
                msg = f"{err['msg']} (got {json.dumps(err.get('input'))[:80]})"
            fields.setdefault(loc, []).append(msg)
        parts = [f"{loc}: {' or '.join(dict.fromkeys(msgs))}" for loc, msgs in fields.items()]
        raise ApiError(400, "; ".join(parts), "invalid_value", next(iter(fields))) from e
    ignored = sorted(set(data) - set(model.model_fields))
    if ignored:
        log.info("ignoring unknown request fields %s", ignored)
    return body


class TokenText:
    """Token id -> its text, cached (logprob tables name tokens by text, as OpenAI does)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.cache = tokenizer, {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self.tokenizer.decode([token_id])
        return self.cache[token_id]


def completion_logprobs(entries: list[TokenLogprob], text: Callable[[int], str], offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(text(e.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    tops: list[dict | None] = []
    for e in entries:
        if e.logprob is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for t, lp in e.top:
            top.setdefault(text(t), lp)  # two ids with one text: keep the likelier
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": offsets}  # fmt: skip


def chat_logprobs(entries: list[TokenLogprob], text: Callable[[int], str]) -> dict:
    def item(t: int, lp: float) -> dict:
        s = text(t)
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    return {"content": [item(e.token_id, e.logprob) | {"top_logprobs": [item(t, lp) for t, lp in e.top]}
                        for e in entries]}  # fmt: skip


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
