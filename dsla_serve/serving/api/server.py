"""The FastAPI app: OpenAI-compatible completions and chat (streaming or not), models, health,
Prometheus metrics, and the DSLA controller's state and override.

Run it with ``dsla-serve serve`` (``dsla_serve/serving/cli.py``). Compute runs on the engine's
thread; handlers only validate, submit, and turn engine outputs into JSON or server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field
from starlette.exceptions import HTTPException

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
    usage,
)
from dsla_serve.serving.engine import AsyncEngine, Job
from dsla_serve.serving.request import EngineError, Output

log = logging.getLogger(__name__)


class DSLAControl(Strict):
    """POST /v1/dsla: set a policy, a level, or both; optionally convert running sequences now."""

    policy: str | None = None
    level: float | None = Field(None, ge=0, le=1)
    convert_running: bool = False


def error_response(e: EngineError) -> JSONResponse:
    headers = {"Retry-After": str(e.retry_after)} if e.retry_after else None
    return JSONResponse(error_body(e), status_code=e.status, headers=headers)


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


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: AsyncEngine, served_names: list[str] | None = None, default_max_tokens: int = 256,
               drain_timeout_s: float = 300.0) -> FastAPI:  # fmt: skip
    """The app over a (not yet started) engine; the lifespan starts it and drains it on shutdown."""
    core = engine.core
    info, tok = core.info, core.tokenizer
    names = served_names or list(dict.fromkeys([info.model.split(":")[-1], info.model]))  # short name first
    token_text = TokenText(tok)
    vocab = core.model.config.vocab_size

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("serving %s (DSLA weights: %s; order: %s)", names, info.weights or "none, fresh layers",
                 info.order_source)  # fmt: skip
        if info.undistilled:
            log.warning("DSLA layers %s are not distilled (fresh weights): converted output will be poor",
                        info.undistilled)  # fmt: skip
        yield
        await engine.shutdown(drain_timeout_s)

    app = FastAPI(title="dsla-serve", lifespan=lifespan)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code, "http_error")
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", code))

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, e: EngineError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(EngineError(500, f"internal error: {type(e).__name__}: {e}", "internal_error"))

    def check_model(name: str) -> None:
        if name not in names:
            raise ApiError(404, f"model {name!r} is not served here; use one of {names} (GET /v1/models)",
                           "model_not_found", "model")  # fmt: skip

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

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body: CompletionRequest = parse_body(await request.body(), CompletionRequest)
        body.check_supported()
        check_model(body.model)
        prompts = body.prompts(tok, vocab)
        params = body.params()
        job = engine.submit(prompts, params)
        cid, created = f"cmpl-{job.id}", int(time.time())
        echo_text = [body.prompt if isinstance(body.prompt, str) else tok.decode(p) for p in prompts]
        if isinstance(body.prompt, list) and all(isinstance(x, str) for x in body.prompt):
            echo_text = list(body.prompt)

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
                                "logprobs": lp_of(o), "finish_reason": end.finish_reason})  # fmt: skip
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
            return [base | {"choices": [choice]}]

        return await run(request, job, body.stream, render, collect)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body: ChatRequest = parse_body(await request.body(), ChatRequest)
        body.check_supported()
        check_model(body.model)
        ids = body.prompt_ids(tok)
        room = core.context - len(ids)
        params = body.params(max(1, min(default_max_tokens, room)))
        job = engine.submit([ids], params)
        cid, created = f"chatcmpl-{job.id}", int(time.time())
        base = {"id": cid, "created": created, "model": body.model}

        async def collect(first: Output) -> dict:
            o = (await gather(job, first))[0]
            end = o[-1]
            lp = chat_logprobs([e for x in o for e in x.logprobs], token_text) if body.logprobs else None
            message = {"role": "assistant", "content": "".join(x.text for x in o)}
            return base | {"object": "chat.completion",
                           "choices": [{"index": 0, "message": message, "logprobs": lp,
                                        "finish_reason": end.finish_reason}],
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
                chunks.append(chunk | {"choices": [{"index": 0, "delta": delta, "logprobs": lp,
                                                    "finish_reason": out.finish_reason}]})  # fmt: skip
            if out.finish_reason is not None:
                state["usage"] = (out.prompt_tokens, out.completion_tokens)
            return chunks

        return await run(request, job, body.stream, render, collect)

    @app.get("/v1/models")
    async def models() -> dict:
        note = (
            f"DSLA layers {info.undistilled} have no distilled weights (fresh, calibrated only): "
            "conversion of those layers degrades output"
            if info.undistilled
            else None
        )
        dsla = {"weights": info.weights, "distilled_layers": info.distilled, "undistilled_layers": info.undistilled,
                "order": info.order, "order_source": info.order_source, "note": note}  # fmt: skip
        data = [{"id": n, "object": "model", "created": 0, "owned_by": "dsla-serve", "max_model_len": core.context,
                 "dsla": dsla} for n in names]  # fmt: skip
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive and engine.accepting
        status = "ok" if ok else ("draining" if engine.alive else "engine stopped")
        return JSONResponse({"status": status, "running": len(core.scheduler.running),
                             "waiting": len(core.scheduler.waiting)}, status_code=200 if ok else 503)  # fmt: skip

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(core.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/dsla")
    async def dsla_state() -> dict:
        return core.snapshot()

    @app.post("/v1/dsla")
    async def dsla_control(request: Request) -> dict:
        body: DSLAControl = parse_body(await request.body(), DSLAControl)
        try:
            decision = await asyncio.wait_for(
                engine.control(policy=body.policy, level=body.level, convert_running=body.convert_running), 120
            )
        except ValueError as e:
            raise ApiError(400, str(e), "invalid_value") from e
        return core.snapshot() | {"decision": decision.to_dict()}

    return app
