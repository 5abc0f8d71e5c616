"""The serving engine: ``EngineCore.step()`` (synchronous, one scheduling round) and ``AsyncEngine``
(a thread running steps; it implements ``EngineClient``, the asyncio HTTP layer's only way in).

One step: the controller reads the load and may move the level (folding running sequences' KV
caches when it says so), the scheduler picks the work, the runner decodes every running sequence
in one batched call and reads a chunk of each new prompt, and outputs go to each request's sink.
Plan changes therefore happen only between steps: no forward ever sees a half-converted cache.

Isolation: everything done for one request on the engine thread (cache allocation, its prefill,
sampling, detokenisation, stop strings) runs under ``_guard``, so a request that fails (non-finite
logits, a bug on its path) fails alone with a 500 that carries an error id, never exception text;
the log has the traceback under that id. A batched decode that raises fails the requests in it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable

import torch

from dsla_serve.model import HybridModel
from dsla_serve.model.pretrained import HybridInfo
from dsla_serve.serving.client import EngineClient, EngineSnapshot, Job, ServedModel
from dsla_serve.serving.controller import Controller, ControllerConfig, Decision, SignalMeter, Signals, load_of
from dsla_serve.serving.metrics import EngineMetrics
from dsla_serve.serving.request import (
    EngineError,
    Output,
    Request,
    RequestParams,
    Status,
    TokenLogprob,
    internal_error,
)
from dsla_serve.serving.runner import ModelRunner
from dsla_serve.serving.scheduler import Scheduler, SchedulerConfig
from dsla_serve.serving.text import backend_of

log = logging.getLogger(__name__)


def eos_ids(model: HybridModel, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    gen = getattr(model.base, "generation_config", None)
    extra = getattr(gen, "eos_token_id", None)
    ids |= set(extra) if isinstance(extra, list) else {extra}
    return {i for i in ids if i is not None}


class EngineCore:
    """Scheduler + controller + runner over one model; every method runs on the engine's thread."""

    def __init__(
        self, model: HybridModel, tokenizer, info: HybridInfo,
        scheduler: SchedulerConfig | None = None, controller: ControllerConfig | None = None,
    ):  # fmt: skip
        self.model, self.tokenizer, self.info = model, tokenizer, info
        self.backend = backend_of(tokenizer)  # incremental detokenisation needs the tokenizers backend
        self.runner = ModelRunner(model, info.order)
        scheduler = scheduler or SchedulerConfig()
        self.controller = Controller(model.num_layers, controller, scheduler.prefill_chunk)
        # a new sequence's plan is the controller's, made as it is admitted (behind it: the rest of the queue)
        plan = lambda r: self.controller.plan_request(r, len(self.scheduler.waiting) - 1)  # noqa: E731
        self.scheduler = Scheduler(scheduler, plan, self.runner.cache_bytes)
        self.metrics = EngineMetrics()
        self.metrics.budget.set(self.scheduler.config.memory_budget)
        self.metrics.level.set(self.controller.level)
        self.eos = eos_ids(model, tokenizer)
        self.context = model.config.max_position_embeddings
        self.meter = SignalMeter(self.controller.config.window_s)  # timings the controller reads, expiring
        self.latencies: deque[float] = deque(maxlen=32)  # recent request latencies (s), for Retry-After
        self.conversions = 0  # layers folded in flight

    # ---- admission checks (read-only: safe from the API thread)
    def check(self, prompt_len: int, params: RequestParams) -> None:
        """Raise EngineError (400) for a request that can never be served, with what to change."""
        if prompt_len == 0:
            raise EngineError(400, "the prompt is empty: send at least one token", "empty_prompt")
        if prompt_len + params.max_tokens > self.context:
            raise EngineError(
                400,
                f"the prompt has {prompt_len} tokens and max_tokens is {params.max_tokens}: together they exceed "
                f"the model's context of {self.context} tokens; shorten the prompt or lower max_tokens",
                "context_length_exceeded",
            )
        c = self.controller
        most = c.max_level_for(prompt_len, params.dsla_max_level)
        need = self.runner.cache_bytes(c.layers_at(most), prompt_len + params.max_tokens)
        budget = self.scheduler.config.memory_budget
        if need > budget:
            raise EngineError(
                400,
                f"this request needs {need / 2**20:.1f} MiB of cache but the server's memory budget is "
                f"{budget / 2**20:.1f} MiB: shorten the prompt or lower max_tokens",
                "request_too_large",
            )

    def retry_after(self) -> int:
        """Seconds a rejected client should wait: recent request latency times the queue's rounds."""
        per = statistics.median(self.latencies) if self.latencies else 5.0
        rounds = 1 + len(self.scheduler.waiting) // self.scheduler.config.max_num_seqs
        return int(min(max(math.ceil(per * rounds), 1), 60))

    # ---- commands
    def add(self, req: Request) -> None:
        self.scheduler.add(req)

    def abort(self, req: Request) -> None:
        if req.status != Status.FINISHED:
            self._release(req, "aborted")
            log.info("request %s aborted (client gone) after %d tokens", req.id, len(req.output_ids))

    def control(self, policy: str | None = None, level: float | None = None, convert_running: bool = False) -> Decision:
        decision = self.controller.set(policy, level, convert_running, [load_of(r) for r in self.scheduler.running])
        with torch.inference_mode():  # folds touch caches made in the step's inference mode
            self._apply(decision)
        return decision

    # ---- the step
    def signals(self, now: float | None = None) -> Signals:
        return self.meter.signals(time.monotonic() if now is None else now, self.scheduler)

    def step(self) -> bool:
        """One scheduling round; returns whether any work was done."""
        with torch.inference_mode():
            now = time.monotonic()
            decision = self.controller.update(self.signals(now), now, [load_of(r) for r in self.scheduler.running])
            if decision is not None:
                self._apply(decision)
            out = self.scheduler.schedule(now)
            for req in out.expired:
                self._fail(req, EngineError(
                    503, f"the request waited {now - req.arrival:.0f} s without being admitted (server overloaded)",
                    "queue_timeout", self.retry_after(),
                ), "timeout")  # fmt: skip
            for req in out.admitted:
                self._guard([req], lambda r=req: self.runner.allocate(r))
                if req.status == Status.RUNNING:
                    req.sink(Output(req.index, admitted=True))
            generated, decode_s = 0, None
            if out.decode:
                t = time.perf_counter()
                logits = self._guard(out.decode, lambda: self.runner.decode(out.decode))
                if logits is not None:
                    sampled = self._guard(out.decode, lambda: self.runner.sample_batch(out.decode, logits)) or []
                    for req, one in zip(out.decode, sampled, strict=False):
                        generated += self._guard([req], lambda r=req, x=one: self._emit_token(r, x)) or 0
                decode_s = time.perf_counter() - t  # decoding alone; the prefill chunks below are timed apart
            prompt, t = 0, time.perf_counter()
            for req, n in out.prefill:
                if req.status != Status.RUNNING:
                    continue
                result = self._guard([req], lambda r=req, n=n: self.runner.prefill(r, n))
                if result is None:
                    continue
                prompt += n
                generated += self._guard([req], lambda r=req, res=result: self._prefilled(r, *res)) or 0
            self.meter.record_step(now, decode_s, time.perf_counter() - t, prompt)
            self._update_gauges(prompt, generated, now)
            return bool(out.admitted or out.decode or out.prefill or out.expired)

    def _prefilled(self, req: Request, logits: torch.Tensor, entries: list[TokenLogprob] | None) -> int:
        """After a prefill chunk: collect prompt logprobs; at the prompt's end, the first token (or finish)."""
        if entries is not None:
            req.prompt_lp = (req.prompt_lp or []) + entries
        if not req.prefilled:
            return 0
        if req.params.max_tokens == 0:
            self._finish(req, "length", Output(req.index, prompt_logprobs=req.prompt_lp))
            return 0
        return self._emit_token(req, self.runner.sample_batch([req], logits[None])[0], req.prompt_lp)

    def _emit_token(
        self, req: Request, sampled: tuple[int, TokenLogprob | None, bool], prompt_lp: list[TokenLogprob] | None = None
    ) -> int:
        """Hand one sampled token (token, logprob entry, logits finite) to its request."""
        token, lp, finite = sampled
        if not finite:  # NaN/inf logits: this request fails alone
            raise FloatingPointError(f"request {req.id}: the model produced non-finite logits")
        now = time.monotonic()
        if req.first_token_time is None:
            req.first_token_time = now
            self.metrics.ttft.observe(now - req.arrival)
            self.meter.record_ttft(now, now - req.arrival)
        else:
            self.metrics.tpot.observe(now - req.last_token_time)
        req.last_token_time = now
        out = Output(req.index, prompt_logprobs=prompt_lp)
        if token in self.eos and not req.params.ignore_eos:
            req.output_ids.append(token)  # fed to nothing: the sequence ends here
            self._finish(req, "stop", out)
            return 1
        out.text, stopped = req.add_token(token, self.backend)
        out.token_ids, out.logprobs = [token], [lp] if lp is not None else []
        if stopped or len(req.output_ids) >= req.params.max_tokens:
            self._finish(req, "stop" if stopped else "length", out)
        else:
            req.sink(out)
        return 1

    def _finish(self, req: Request, reason: str, out: Output) -> None:
        out.text += req.flush()
        out.finish_reason = reason
        out.prompt_tokens, out.completion_tokens = req.prompt_len, len(req.output_ids)
        out.dsla_layers = req.dsla_count  # reported in the response, beside the request's max_level
        self.latencies.append(time.monotonic() - req.arrival)
        self.metrics.e2e.observe(time.monotonic() - req.arrival)
        self._release(req, "finished")
        req.sink(out)

    def _fail(self, req: Request, error: EngineError, outcome: str) -> None:
        self._release(req, outcome)
        req.sink(Output(req.index, error=error))

    def _release(self, req: Request, outcome: str) -> None:
        self.scheduler.remove(req)
        if req.cache is not None:
            req.cache.release()  # DSLA slots back to their pools now, not at garbage collection
        req.cache, req.reserved = None, 0
        if not self.scheduler.running:
            self.runner.model.trim_pools()  # idle: give back the pools' free slots
        self.metrics.requests.labels(outcome).inc()

    def _guard(self, reqs: list[Request], fn: Callable):
        """Run fn; if it raises, fail these requests (500 with an error id) and keep serving the others."""
        try:
            return fn()
        except Exception:  # the server never dies on a request
            error = internal_error()
            log.exception("error id %s: engine error on requests %s", error.error_id, [r.id for r in reqs])
            for r in reqs:
                if r.status != Status.FINISHED:
                    self._fail(r, error, "failed")
            return None

    def _apply(self, d: Decision) -> None:
        """Make a controller decision effective now (between steps)."""
        moved = "up" if d.to_level > d.from_level else "down" if d.to_level < d.from_level else "convert"
        self.metrics.decisions.labels("set" if d.trigger == "manual" else moved, d.trigger).inc()
        self.metrics.level.set(d.to_level)
        for req in list(self.scheduler.running):  # the decision's own targets: no asking back per request
            target = d.targets.get(req.id, 0)
            if target > req.dsla_count:
                folded = self._guard([req], lambda r=req, t=target: self.runner.fold(r, t))
                if folded:
                    self.conversions += len(folded)
                    self.metrics.conversions.inc(len(folded))
                    log.info("request %s: layers %s folded from KV cache to DSLA state", req.id, folded)

    def _update_gauges(self, prompt: int, generated: int, now: float) -> None:
        m, s = self.metrics, self.scheduler
        m.count_tokens(prompt, generated, now)
        m.queue_depth.set(len(s.waiting))
        m.waiting_tokens.set(s.waiting_tokens())
        m.running.set(len(s.running))
        m.pressure.set(s.memory_pressure())
        caches = [r.cache for r in s.running if r.cache is not None]
        m.kv_bytes.set(sum(c.kv_bytes() for c in caches))
        m.state_bytes.set(sum(c.state_bytes() for c in caches))
        m.state_pool_bytes.set(self.runner.model.pool_bytes())

    # ---- introspection: built on the engine thread and published whole (AsyncEngine.snapshot)
    def publish(self) -> EngineSnapshot:
        s = self.scheduler
        return EngineSnapshot(time.monotonic(), len(s.running), len(s.waiting), self.retry_after(), self.snapshot())

    def snapshot(self) -> dict:
        """The GET /v1/dsla body. Engine thread only: it iterates the scheduler's and controller's containers."""
        running = list(self.scheduler.running)
        level_count = self.controller.layers_at(self.controller.admission_ceiling())
        new_plan = set(self.info.order[:level_count])
        layers = []
        for i in range(self.model.num_layers):
            rank = self.info.order.index(i)
            dsla = sum(1 for r in running if rank < r.dsla_count)
            layers.append({
                "layer": i, "rank": rank, "distilled": i in self.info.distilled,
                "new_sequences": "dsla" if i in new_plan else "attention",
                "running_dsla": dsla, "running_attention": len(running) - dsla,
            })  # fmt: skip
        seqs = [
            {"id": r.id, "prompt_tokens": r.prompt_len, "generated_tokens": len(r.output_ids),
             "prefilled": r.prefilled, "dsla_layers": r.dsla_count, "cache_bytes": r.reserved}
            for r in running
        ]  # fmt: skip
        return {
            "model": self.info.model,
            "policy": self.controller.policy,
            "level": self.controller.level,
            "order": self.info.order,
            "order_source": self.info.order_source,
            "controller": self.controller.snapshot(),
            "layers": layers,
            "sequences": seqs,
            "queue_depth": len(self.scheduler.waiting),
            "memory": {
                "budget_bytes": self.scheduler.config.memory_budget,
                "used_bytes": sum(r.reserved for r in running),
                "pressure": self.scheduler.memory_pressure(),
            },
            "conversions": self.conversions,
        }


class AsyncEngine(EngineClient):
    """Runs ``EngineCore.step`` on a dedicated thread; the asyncio side submits, aborts and controls."""

    IDLE_TICK_S = 0.5  # an idle engine still wakes this often: the controller steps down when load falls
    # NOTE(decisions): building a snapshot takes ~1.5 ms (mostly the controller's 50 decisions as dicts;
    # measured on the test model's core), a large share of a small model's step: while busy the engine
    # publishes at most this often; after a command or when it goes idle, at once.
    SNAPSHOT_EVERY_S = 0.05

    def __init__(self, core: EngineCore):
        self.core = core
        self.model = ServedModel(core.info.model, core.context, core.model.config.vocab_size, core.tokenizer,
                                 core.info)  # fmt: skip
        self._inbox: deque[Callable[[], object]] = deque()
        self._wake = threading.Event()
        self._stop = False
        self.accepting = True
        self._snapshot = core.publish()  # replaced, never mutated, by the engine thread
        self._thread = threading.Thread(target=self._run, name="dsla-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def health(self) -> str:
        if not self.alive:
            return "engine stopped"
        return "ok" if self.accepting else "draining"

    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    def metrics(self) -> bytes:
        return self.core.metrics.render()  # prometheus_client's collectors lock for themselves

    def post(self, fn: Callable[[], object]) -> None:
        self._inbox.append(fn)
        self._wake.set()

    def queued(self) -> int:
        """Requests waiting for admission, counting those still in the inbox (called from the API thread)."""
        # NOTE(race): list() copies the deque in one C call, under the GIL; iterating it directly could
        # raise "deque mutated during iteration" while the engine thread pops commands.
        inbox = list(self._inbox)
        return len(self.core.scheduler.waiting) + sum(len(f.requests) for f in inbox if isinstance(f, _Admit))

    def submit(self, prompts: list[list[int]], params: RequestParams) -> Job:
        """Queue one request per prompt; raises EngineError for invalid input (400), overload (429), shutdown (503)."""
        if not self.accepting or not self.alive:
            raise EngineError(503, "the server is shutting down", "unavailable", retry_after=5)
        limit = self.core.scheduler.config.max_waiting
        if len(prompts) > limit:
            raise EngineError(400, f"{len(prompts)} prompts in one request: this server queues at most {limit}; "
                                   "send them in several requests", "too_many_prompts")  # fmt: skip
        for p in prompts:
            self.core.check(len(p), params)  # reads config and plain numbers only: safe off the engine thread
        if self.queued() + len(prompts) > limit:
            raise EngineError(
                429, f"the server's queue is full ({limit} requests waiting); retry later", "overloaded",
                retry_after=self._snapshot.retry_after_s,
            )  # fmt: skip
        job = Job(prompts, params, self.abort)
        self.post(_Admit(self.core, job.requests))
        return job

    def abort(self, job: Job) -> None:
        self.post(lambda: [self.core.abort(r) for r in job.requests])

    async def control(
        self, policy: str | None = None, level: float | None = None, convert_running: bool = False
    ) -> tuple[Decision, EngineSnapshot]:
        fut: concurrent.futures.Future = concurrent.futures.Future()

        def run() -> None:
            try:
                decision = self.core.control(policy, level, convert_running)
                self._snapshot = self.core.publish()
                fut.set_result((decision, self._snapshot))
            except Exception as e:
                fut.set_exception(e)

        self.post(run)
        return await asyncio.wrap_future(fut)

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            self._wake.clear()
            commands = bool(self._inbox)
            while self._inbox:
                fn = self._inbox.popleft()
                try:
                    with torch.inference_mode():  # commands (admit, abort, control) touch the step's tensors
                        fn()
                except Exception:
                    log.exception("engine command failed")
            if self._stop and not self.core.scheduler.running and not self.core.scheduler.waiting:
                self._snapshot = self.core.publish()
                return
            try:
                busy = self.core.step()
            except Exception:  # a bug outside the per-request guards: fail the running requests, keep serving
                error = internal_error()
                log.exception("error id %s: engine step failed", error.error_id)
                for req in list(self.core.scheduler.running):
                    self.core._fail(req, error, "failed")
                busy = False
            if commands or not busy or time.monotonic() - self._snapshot.time >= self.SNAPSHOT_EVERY_S:
                self._snapshot = self.core.publish()
            if not busy:
                self._wake.wait(self.IDLE_TICK_S)

    async def shutdown(self, timeout_s: float = 300.0) -> None:
        """Stop accepting, let running and queued requests finish (up to timeout_s), stop the thread."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        s = self.core.scheduler
        while (s.running or s.waiting or self._inbox) and time.monotonic() < deadline and self.alive:
            await asyncio.sleep(0.05)
        if s.running or s.waiting:
            log.warning("shutdown: %d requests still unfinished after %.0f s, aborting them",
                        len(s.running) + len(s.waiting), timeout_s)  # fmt: skip
            error = EngineError(503, f"the server shut down before this request finished ({timeout_s:.0f} s drain)",
                                "unavailable", retry_after=30)  # fmt: skip
            self.post(lambda: [self.core._fail(r, error, "aborted") for r in [*s.running, *s.waiting]])
        self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 30)


class _Admit:
    """Inbox command that queues requests (counted by ``AsyncEngine.queued`` before it runs)."""

    def __init__(self, core: EngineCore, requests: list[Request]):
        self.core, self.requests = core, requests

    def __call__(self) -> None:
        for r in self.requests:
            self.core.add(r)
