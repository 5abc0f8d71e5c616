"""One request's failure fails only that request; clients that vanish free everything; the HTTP layer
needs nothing of an engine but ``EngineClient``.

The failing request is genuine: the tiny model's embedding row of one token is NaN (a corrupted
weight), so any prompt holding that token gets NaN logits through the real forward and sampler.
"""

from __future__ import annotations

import json
import logging
import random
import re
import threading

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families

from dsla_serve.model.pretrained import HybridInfo
from dsla_serve.serving.api.server import create_app
from dsla_serve.serving.client import EngineClient, EngineSnapshot, Job, ServedModel
from dsla_serve.serving.engine import EngineCore
from dsla_serve.serving.launch import ServerThread
from dsla_serve.serving.request import Output, Request, RequestParams, Status
from tests.serving.conftest import MODEL, start_server, tiny_hybrid, wait_until

POISON = 4321  # the token whose embedding is NaN


def poisoned(tokenizer):
    hybrid, info = tiny_hybrid(tokenizer)
    assert hybrid.embed_tokens.weight.data_ptr() != hybrid.lm_head.weight.data_ptr()  # untied: logits stay finite
    with torch.no_grad():
        hybrid.embed_tokens.weight[POISON] = float("nan")
    return hybrid, info


def counter(url: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def test_engine_fails_the_nan_request_alone(tokenizer):
    """Sampling NaN logits at temperature > 0 raises inside torch.multinomial: only that request fails."""
    from dsla_serve.serving.controller import ControllerConfig
    from dsla_serve.serving.scheduler import SchedulerConfig

    hybrid, info = poisoned(tokenizer)
    core = EngineCore(hybrid, tokenizer, info, SchedulerConfig(), ControllerConfig(policy="off"))
    outs: dict[str, list[Output]] = {"ok": [], "bad": []}
    ok = Request("ok", [11, 12, 13], RequestParams(max_tokens=20, ignore_eos=True), outs["ok"].append)
    bad = Request("bad", [11, POISON, 13], RequestParams(max_tokens=20, temperature=1.0), outs["bad"].append)
    core.add(ok)
    core.add(bad)
    for _ in range(100):
        if ok.status == bad.status == Status.FINISHED:
            break
        core.step()
    error = outs["bad"][-1].error
    assert error is not None and error.status == 500 and error.code == "internal_error"
    assert error.error_id and error.error_id in error.message and "nan" not in error.message.lower()
    assert outs["ok"][-1].finish_reason == "length" and outs["ok"][-1].completion_tokens == 20
    assert core.scheduler.used == 0 and bad.cache is None


def test_a_nan_request_beside_healthy_streams_fails_alone_with_an_error_id(tokenizer, caplog):
    caplog.set_level(logging.ERROR, logger="dsla_serve")
    with start_server(tokenizer, hybrid=poisoned(tokenizer)) as srv:
        results: dict[str, httpx.Response | list[str]] = {}

        def healthy(i: int) -> None:
            body = {"model": MODEL, "prompt": f"Story {i} of the sea", "max_tokens": 40, "ignore_eos": True,
                    "stream": True, "temperature": 0}  # fmt: skip
            with httpx.stream("POST", srv.url + "/v1/completions", json=body, timeout=120) as r:
                results[f"ok{i}"] = [line for line in r.iter_lines() if line.startswith("data:")]

        def sick(name: str, temperature: float, stream: bool) -> None:
            body = {"model": MODEL, "prompt": [11, POISON, 13], "max_tokens": 10, "temperature": temperature,
                    "stream": stream}  # fmt: skip
            results[name] = httpx.post(srv.url + "/v1/completions", json=body, timeout=120)

        threads = [threading.Thread(target=healthy, args=(i,)) for i in range(3)]
        threads += [threading.Thread(target=sick, args=a) for a in (("greedy", 0.0, False), ("sampled", 1.0, True))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        for i in range(3):
            lines = results[f"ok{i}"]
            assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]
        ids = []
        r = results["greedy"]  # fails before its first output: an HTTP error
        assert r.status_code == 500, r.text
        errors = [r.json()["error"]]
        r = results["sampled"]  # streamed and admitted first: the error arrives in the stream
        events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data: {")]
        assert r.status_code == 200 and len(events) == 1 and r.text.rstrip().endswith("data: [DONE]")
        errors.append(events[0]["error"])
        for err in errors:
            assert err["type"] == "server_error" and err["code"] == "internal_error"
            assert not re.search(r"nan|finite|Error|Traceback|torch", err["message"])  # nothing internal leaks
            ids.append(re.search(r"error id ([0-9a-f]+)", err["message"]).group(1))
        logged = [r for r in caplog.records if any(i in r.getMessage() for i in ids)]
        assert len(logged) == 2 and all(r.exc_info for r in logged)  # the log has the traceback under the id
        assert counter(srv.url, "dsla_requests_total", outcome="failed") == 2
        assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_a_disconnect_storm_with_level_changes_leaves_nothing_behind(tokenizer):
    """Clients that vanish mid-stream or give up on a slow answer, while healthy streams run, the level
    moves with in-flight folds and /v1/dsla is polled: every vanished client's sequence is aborted and
    freed, every healthy stream completes, and no poll or control call fails."""
    with start_server(tokenizer, ctrl={"policy": "static", "conversion": 0.0}) as srv:
        rng, done = random.Random(0), threading.Event()
        gone, completed, failures = [], [], []
        long = {"model": MODEL, "max_tokens": 300, "ignore_eos": True}

        def vanish(i: int) -> None:
            with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                              json=long | {"prompt": f"tale {i}", "stream": True}) as r:  # fmt: skip
                events = 0
                for line in r.iter_lines():
                    events += line.startswith("data:")
                    if events >= 1 + i % 3:
                        break
            gone.append(i)

        def give_up(i: int) -> None:
            try:
                httpx.post(srv.url + "/v1/completions", json=long | {"prompt": f"slow {i}"},
                           timeout=httpx.Timeout(30, read=0.2))  # fmt: skip
                failures.append(f"give_up {i} was answered")
            except httpx.ReadTimeout:
                gone.append(100 + i)

        def healthy(i: int) -> None:
            r = httpx.post(srv.url + "/v1/completions", timeout=120,
                           json={"model": MODEL, "prompt": f"calm {i}", "max_tokens": 120, "ignore_eos": True})  # fmt: skip
            completed.append(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 120)

        def operator() -> None:
            up = True
            while not done.is_set():
                body = {"level": rng.choice([0.5, 1.0]), "convert_running": True} if up else {"level": 0.0}
                up = not up
                for r in (httpx.post(srv.url + "/v1/dsla", json=body, timeout=60), httpx.get(srv.url + "/v1/dsla")):
                    if r.status_code != 200:
                        failures.append(f"{r.request.method} /v1/dsla: {r.status_code}")
                done.wait(0.05)

        threads = [threading.Thread(target=healthy, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        wait_until(lambda: srv.engine.snapshot().running == 3, what="healthy sequences admitted at level 0")
        ctl = threading.Thread(target=operator)  # its first move folds them in flight
        ctl.start()
        threads += [threading.Thread(target=vanish, args=(i,)) for i in range(12)]
        threads += [threading.Thread(target=give_up, args=(i,)) for i in range(4)]
        for t in threads[3:]:
            t.start()
        for t in threads:
            t.join(120)
        done.set()
        ctl.join(60)
        assert not failures and completed == [True] * 3 and len(gone) == 16
        wait_until(lambda: srv.engine.snapshot().running == 0 and srv.engine.snapshot().waiting == 0, what="idle")
        state = httpx.get(srv.url + "/v1/dsla").json()
        assert state["sequences"] == [] and state["memory"]["used_bytes"] == 0 and state["conversions"] > 0
        assert counter(srv.url, "dsla_requests_total", outcome="aborted") == 16
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}


class ReplayClient(EngineClient):
    """An engine without a model: each prompt comes back as its own tokens, one output per token."""

    def __init__(self, tokenizer):
        self.model = ServedModel("replay", 256, len(tokenizer), tokenizer, HybridInfo("replay", None, [0], "none"))
        self.tokenizer, self.aborted = tokenizer, 0

    def start(self) -> None:
        pass

    async def shutdown(self, timeout_s: float) -> None:
        pass

    def health(self) -> str:
        return "ok"

    def submit(self, prompts: list[list[int]], params: RequestParams) -> Job:
        job = Job(prompts, params, self.abort)
        for req in job.requests:
            ids = req.prompt_ids[: params.max_tokens]
            for n, t in enumerate(ids, 1):
                last = n == len(ids)
                job._put(Output(req.index, text=self.tokenizer.decode([t]), token_ids=[t],
                                finish_reason="length" if last else None, prompt_tokens=req.prompt_len,
                                completion_tokens=n if last else 0))  # fmt: skip
        return job

    def abort(self, job: Job) -> None:
        self.aborted += 1

    async def control(self, policy=None, level=None, convert_running=False):
        raise ValueError("this engine has no conversion to control")

    def snapshot(self) -> EngineSnapshot:
        return EngineSnapshot(0.0, 0, 0, 1, {"engine": "replay"})

    def metrics(self) -> bytes:
        return b"# no metrics\n"


def test_the_http_layer_needs_only_the_engine_client_interface(tokenizer):
    client = ReplayClient(tokenizer)
    with ServerThread(create_app(client)) as srv:
        r = httpx.post(
            srv.url + "/v1/completions", json={"model": "replay", "prompt": "one two three", "max_tokens": 8}
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "one two three"
        assert httpx.get(srv.url + "/v1/dsla").json() == {"engine": "replay"}
        r = httpx.post(srv.url + "/v1/dsla", json={"level": 0.5})
        assert r.status_code == 400 and "no conversion" in r.json()["error"]["message"]
        assert httpx.get(srv.url + "/health").json() == {"status": "ok", "running": 0, "waiting": 0}
