"""The FastAPI app: OpenAI-compatible completions and chat (streaming or not), models, health,
Prometheus metrics, and the DSLA controller's state and override.

Run it with ``dsla-serve serve`` (``dsla_serve/serving/cli.py``). The app talks to the engine only
through ``EngineClient`` (serving/client.py). Handlers read the body (bounded), then parse it,
tokenise it and apply the chat template on a small thread pool: a large prompt never stalls the
event loop, which keeps every other stream flowing. Compute runs on the engine's thread.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from starlette.exceptions import HTTPException

from dsla_serve.serving.api.auth import Keys, check_admin, check_api
from dsla_serve.serving.api.protocol import (
    ApiError,
    ChatRequest,
    CompletionRequest,
    Strict,
    TokenText,
    chat_logprobs,
    completion_logprobs,
    error_body,
    parse_body,
    read_body,
    usage,
)
from dsla_serve.serving.client import EngineClient, Job
from dsla_serve.serving.request import EngineError, Output, internal_error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiConfig:
    """Options of the HTTP layer (the ``dsla-serve serve`` flags of the same names)."""

    served_names: tuple[str, ...] = ()  # names clients use for the model (default: its id)
    default_max_tokens: int = 256  # chat, when the request gives none
    drain_timeout_s: float = 300.0
    keys: Keys = field(default_factory=Keys)
    max_body_bytes: int = 4 << 20
    max_prompt_tokens: int | None = None  # None: the model's context
    # NOTE(decisions): two threads: one huge prompt being tokenised does not hold up a small one behind
    # it, and more would only contend for the GIL (chat templates are Python) and the cores.
    tokenizer_threads: int = 2

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(f"max_prompt_tokens must be >= 1, got {self.max_prompt_tokens}")


class DSLAControl(Strict):
    """POST /v1/dsla: set a policy, a level, or both; optionally convert running sequences now."""

    policy: str | None = None
    level: float | None = Field(None, ge=0, le=1)
    convert_running: bool = False


def error_response(e: EngineError) -> JSONResponse:
    headers = dict(getattr(e, "headers", None) or {})
    if e.retry_after:
        headers["Retry-After"] = str(e.retry_after)
    return JSONResponse(error_body(e), status_code=e.status, headers=headers or None)


class ClientGoneError(Exception):
    pass


async def until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


async def watched(request: Request, job: Job, awaitable) -> Any:
    """Await ``awaitable`` unless the client disconnects first: then abort the job (frees its caches)."""
    task, watch = asyncio.ensure_future(awaitable), asyncio.ensure_future(until_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if task not in done:
        task.cancel()
        job.abort()
        raise ClientGoneError
    return task.result()


def dsla_report(out: Output, max_level: float, layers: int) -> dict | None:
    """Per choice, once finished: the layers it ran as DSLA and the max_level it asked for."""
    if out.dsla_layers is None:
        return None
    return {"dsla_layers": out.dsla_layers, "level": round(out.dsla_layers / layers, 4), "max_level": max_level}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(client: EngineClient, config: ApiConfig | None = None) -> FastAPI:
    """The app over a (not yet started) engine; the lifespan starts it and drains it on shutdown."""
    cfg = config or ApiConfig()
    served = client.model
    info, tok = served.info, served.tokenizer
    names = list(cfg.served_names) or list(dict.fromkeys([served.name.split(":")[-1], served.name]))  # short first
    token_text = TokenText(tok)
    prompt_limit = min(cfg.max_prompt_tokens or served.context, served.context)
    pool = ThreadPoolExecutor(cfg.tokenizer_threads, thread_name_prefix="dsla-tokenize")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client.start()
        log.info("serving %s (DSLA weights: %s; order: %s)", names, info.weights or "none, fresh layers",
                 info.order_source)  # fmt: skip
        if info.undistilled:
            log.warning("DSLA layers %s are not distilled (fresh weights): converted output will be poor",
                        info.undistilled)  # fmt: skip
        if cfg.keys.api is None:
            log.warning("no API key (--api-key / DSLA_SERVE_API_KEY): every client may use the API")
        yield
        await client.shutdown(cfg.drain_timeout_s)
        pool.shutdown(wait=False, cancel_futures=True)

    # no /docs, /redoc or /openapi.json: they would be endpoints outside the keys, and bodies are parsed by hand
    app = FastAPI(title="dsla-serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    async def api_key(request: Request) -> None:
        check_api(request, cfg.keys)

    async def admin_key(request: Request) -> None:
        check_admin(request, cfg.keys)

    user, admin = [Depends(api_key)], [Depends(admin_key)]

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code))

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, e: EngineError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, e: Exception) -> JSONResponse:
        error = internal_error()
        log.error("error id %s: unhandled error on %s %s", error.error_id, request.method, request.url.path,
                  exc_info=e)  # fmt: skip
        return error_response(error)

    async def offload(fn: Callable, *args) -> Any:
        """Run CPU-bound request preparation (JSON, tokenizer, chat template) off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)

    def check_model(name: str) -> None:
        if name not in names:
            raise ApiError(404, f"model {name!r} is not served here; use one of {names} (GET /v1/models)",
                           "model_not_found", "model")  # fmt: skip

    def check_prompts(prompts: list[list[int]], param: str) -> None:
        for p in prompts:
            if len(p) > prompt_limit:
                why = "the model's context" if prompt_limit == served.context else "this server's --max-prompt-tokens"
                raise ApiError(400, f"the prompt has {len(p)} tokens, over {why} ({prompt_limit} tokens); shorten it",
                               "context_length_exceeded", param)  # fmt: skip

    def prepare_completion(raw: bytes) -> tuple[CompletionRequest, list[list[int]], list[str]]:
        body: CompletionRequest = parse_body(raw, CompletionRequest)
        body.check_supported()
        check_model(body.model)
        prompts = body.prompts(tok, served.vocab_size)
        check_prompts(prompts, "prompt")
        return body, prompts, body.echo_texts(prompts, tok) if body.echo else []

    def prepare_chat(raw: bytes) -> tuple[ChatRequest, list[int]]:
        body: ChatRequest = parse_body(raw, ChatRequest)
        body.check_supported()
        check_model(body.model)
        ids = body.prompt_ids(tok)
        check_prompts([ids], "messages")
        return body, ids

    async def run(request: Request, job: Job, stream: bool, render_stream, collect) -> Response:
        """Answer a submitted job as SSE or JSON, aborting it if the client goes away."""
        try:
            first = await watched(request, job, job.next())
            if first.error is not None:
                job.abort()
                return error_response(first.error)
            if not stream:
                return JSONResponse(await watched(request, job, collect(first)))
        except ClientGoneError:
            return Response(status_code=499)

        async def events() -> AsyncIterator[str]:
            try:
                out: Output | None = first
                while out is not None:
                    for chunk in render_stream(out):
                        yield sse(chunk)
                    out = await job.next() if not job.done else None
                for chunk in render_stream(None):
                    yield sse(chunk)
                yield "data: [DONE]\n\n"
            finally:
                job.abort()  # a client that disconnects mid-stream lands here: free its sequences

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def gather(job: Job, first: Output) -> dict[int, list[Output]]:
        outs: dict[int, list[Output]] = {r.index: [] for r in job.requests}
        out = first
        while True:
            if out.error is not None:
                job.abort()
                raise out.error
            outs[out.index].append(out)
            if job.done:
                return outs
            out = await job.next()

    @app.post("/v1/completions", dependencies=user)
    async def completions(request: Request) -> Response:
        body, prompts, echo_text = await offload(prepare_completion, await read_body(request, cfg.max_body_bytes))
        job = client.submit(prompts, body.params())
        cid, created = f"cmpl-{job.id}", int(time.time())

        def lp_of(outs: list[Output]) -> dict | None:
            if body.logprobs is None:
                return None
            entries = [e for o in outs for e in ([*(o.prompt_logprobs or [])] if body.echo else [])]
            entries += [e for o in outs for e in o.logprobs]
            return completion_logprobs(entries, token_text)

        async def collect(first: Output) -> dict:
            outs = await gather(job, first)
            choices, p_tok, c_tok = [], 0, 0
            for i, o in sorted(outs.items()):
                text = "".join(x.text for x in o)
                end = o[-1]
                choices.append({"index": i, "text": (echo_text[i] if body.echo else "") + text,
                                "logprobs": lp_of(o), "finish_reason": end.finish_reason,
                                "dsla": dsla_report(end, body.dsla_max_level, len(info.order))})  # fmt: skip
                p_tok, c_tok = p_tok + end.prompt_tokens, c_tok + end.completion_tokens
            return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": choices, "usage": usage(p_tok, c_tok)}  # fmt: skip

        started: set[int] = set()
        totals = [0, 0]

        def render(out: Output | None) -> list[dict]:
            base = {"id": cid, "object": "text_completion", "created": created, "model": body.model}
            if out is None:
                return [base | {"choices": [], "usage": usage(*totals)}] if body.include_usage else []
            if out.error is not None:
                return [error_body(out.error)]
            if out.admitted and not out.text and out.finish_reason is None:
                return []
            text = out.text
            if body.echo and out.index not in started:
                text = echo_text[out.index] + text
            started.add(out.index)
            totals[0] += out.prompt_tokens
            totals[1] += out.completion_tokens
            choice = {"index": out.index, "text": text, "logprobs": lp_of([out]),
                      "finish_reason": out.finish_reason}  # fmt: skip
            if out.finish_reason is not None:
                choice["dsla"] = dsla_report(out, body.dsla_max_level, len(info.order))
            return [base | {"choices": [choice]}]

        return await run(request, job, body.stream, render, collect)

    @app.post("/v1/chat/completions", dependencies=user)
    async def chat(request: Request) -> Response:
        body, ids = await offload(prepare_chat, await read_body(request, cfg.max_body_bytes))
        room = served.context - len(ids)
        job = client.submit([ids], body.params(max(1, min(cfg.default_max_tokens, room))))
        cid, created = f"chatcmpl-{job.id}", int(time.time())
        base = {"id": cid, "created": created, "model": body.model}

        async def collect(first: Output) -> dict:
            o = (await gather(job, first))[0]
            end = o[-1]
            lp = chat_logprobs([e for x in o for e in x.logprobs], token_text) if body.logprobs else None
            message = {"role": "assistant", "content": "".join(x.text for x in o)}
            return base | {"object": "chat.completion",
                           "choices": [{"index": 0, "message": message, "logprobs": lp,
                                        "finish_reason": end.finish_reason,
                                        "dsla": dsla_report(end, body.dsla_max_level, len(info.order))}],
                           "usage": usage(end.prompt_tokens, end.completion_tokens)}  # fmt: skip

        state = {"role_sent": False, "usage": (0, 0)}

        def render(out: Output | None) -> list[dict]:
            chunk = base | {"object": "chat.completion.chunk"}
            if out is None:
                return [chunk | {"choices": [], "usage": usage(*state["usage"])}] if body.include_usage else []
            if out.error is not None:
                return [error_body(out.error)]
            chunks = []
            if not state["role_sent"]:
                state["role_sent"] = True
                chunks.append(chunk | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                    "logprobs": None, "finish_reason": None}]})  # fmt: skip
            if out.text or out.finish_reason is not None:
                delta = {"content": out.text} if out.text else {}
                lp = chat_logprobs(out.logprobs, token_text) if body.logprobs else None
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}
                if out.finish_reason is not None:
                    choice["dsla"] = dsla_report(out, body.dsla_max_level, len(info.order))
                chunks.append(chunk | {"choices": [choice]})
            if out.finish_reason is not None:
                state["usage"] = (out.prompt_tokens, out.completion_tokens)
            return chunks

        return await run(request, job, body.stream, render, collect)

    @app.get("/v1/models", dependencies=user)
    async def models() -> dict:
        note = (
            f"DSLA layers {info.undistilled} have no distilled weights (fresh, calibrated only): "
            "conversion of those layers degrades output"
            if info.undistilled
            else None
        )
        dsla = {"weights": info.weights, "distilled_layers": info.distilled, "undistilled_layers": info.undistilled,
                "order": info.order, "order_source": info.order_source, "note": note}  # fmt: skip
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "dsla-serve", "max_model_len": served.context,
                 "dsla": dsla} for n in names]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> JSONResponse:
        status, snap = client.health(), client.snapshot()
        return JSONResponse({"status": status, "running": snap.running, "waiting": snap.waiting},
                            status_code=200 if status == "ok" else 503)  # fmt: skip

    @app.get("/metrics", dependencies=user)
    async def metrics() -> Response:
        return Response(client.metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/dsla", dependencies=user)
    async def dsla_state() -> dict:
        return client.snapshot().state

    @app.post("/v1/dsla", dependencies=admin)
    async def dsla_control(request: Request) -> dict:
        body: DSLAControl = parse_body(await read_body(request, cfg.max_body_bytes), DSLAControl)
        try:
            decision, snap = await asyncio.wait_for(
                client.control(policy=body.policy, level=body.level, convert_running=body.convert_running), 120
            )
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_value") from e
        return snap.state | {"decision": decision.to_dict()}

    return app
