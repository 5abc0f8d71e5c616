"""The HTTP server, driven by the official openai client (and httpx for malformed input) on loopback."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from tests.serving.conftest import CONTEXT, MODEL, start_server, tiny_hybrid, wait_until


@pytest.fixture(scope="module")
def server(tokenizer):
    with start_server(tokenizer, ctrl={"policy": "static", "conversion": 0.0}) as srv:
        yield srv


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_completion_usage_and_streaming_agree(client):
    full = client.completions.create(model=MODEL, prompt="The harbour at night", max_tokens=8, temperature=0)
    assert full.usage.completion_tokens == 8 and full.usage.prompt_tokens > 0
    assert full.choices[0].finish_reason == "length" and full.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt="The harbour at night", max_tokens=8,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))  # fmt: skip
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_streaming_and_not(client):
    messages = [{"role": "user", "content": "Say something about boats."}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    assert full.choices[0].message.role == "assistant" and full.usage.completion_tokens <= 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content


def test_seed_reproduces_a_sampled_completion(client):
    a, b = (client.completions.create(model=MODEL, prompt="Once", max_tokens=10, temperature=1.0, seed=7)
            for _ in range(2))  # fmt: skip
    assert a.choices[0].text == b.choices[0].text


def test_stop_string_cuts_the_output(client):
    free = client.completions.create(model=MODEL, prompt="Weather report:", max_tokens=12, temperature=0)
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.completions.create(model=MODEL, prompt="Weather report:", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]


def test_echo_logprobs_equal_the_model_s_own(client, tokenizer):
    """lm-eval's local-completions scoring: echo=True, max_tokens=0, logprobs=1 over token ids."""
    ids = tokenizer("The keeper lit the lamp before the storm", add_special_tokens=False).input_ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) == len(lp.tokens)
    hybrid, _ = tiny_hybrid(tokenizer)
    with torch.no_grad():
        logits, _ = hybrid(torch.tensor([ids]), dsla_layers=[])
    want = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.allclose(torch.tensor(lp.token_logprobs[1:], dtype=torch.float64), want, atol=1e-3)
    assert lp.text_offset[0] == 0 and r.choices[0].text == tokenizer.decode(ids)


HI = [{"role": "user", "content": "x"}]
BAD = [
    ("/v1/completions", b"{not json", 400, "invalid_json"),
    ("/v1/completions", b"[1, 2]", 400, "invalid_json"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -1}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**9}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * (CONTEXT + 10)}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "empty_prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": 5}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 2}, 400, "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "invalid_value"),
    ("/v1/completions", {"model": "gpt-5", "prompt": "x"}, 404, "model_not_found"),
    ("/v1/completions", {"prompt": "x"}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "invalid_value"),  # no coercion
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 1.5}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": 5}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 6}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "invalid_value"),  # only with echo
    ("/v1/completions", {"model": MODEL, "prompt": None}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": [-1]}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": "gpt-5", "messages": HI}, 404, "model_not_found"),
    ("/v1/dsla", {"level": 3}, 400, "invalid_value"),
    ("/v1/dsla", {"levle": 0.5}, 400, "invalid_value"),  # our own API: an unknown field is a typo
    ("/v1/dsla", {"policy": "sometimes"}, 400, "invalid_value"),
    ("/v1/nothing", {}, 404, "not_found"),
]


@pytest.mark.parametrize(("path", "body", "status", "code"), BAD, ids=[f"{p}:{c}:{i}" for i, (p, _, _, c) in
                                                                        enumerate(BAD)])  # fmt: skip
def test_bad_input_gets_an_openai_error_and_disturbs_nothing(server, client, path, body, status, code):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["message"] and err["type"] == "invalid_request_error"
    ok = client.completions.create(model=MODEL, prompt="still fine", max_tokens=2)
    assert ok.usage.completion_tokens == 2
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_error_messages_name_the_field_and_the_fix(server):
    def post(body: dict) -> dict:
        return httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x"} | body).json()["error"]

    err = post({"stop": 5})
    assert err["param"] == "stop" and "valid string" in err["message"] and "valid list" in err["message"]
    assert post({"max_tokens": 10**9})["message"].endswith("shorten the prompt or lower max_tokens")
    assert "GET /v1/models" in post({"model": "gpt-5"})["message"]
    r = httpx.get(server.url + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_null_parameters_and_unknown_fields_are_accepted(server, client):
    """`stop: null` (and null for any optional parameter) is what many clients send; unknown fields
    (lm-eval's extra generation options, a replayed assistant message's tool_calls) are ignored."""
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=2, stop=None)
    assert r.usage.completion_tokens == 2
    nulls = {"n": None, "temperature": None, "logprobs": None, "stream": None, "seed": None, "stream_options": None}
    r = httpx.post(server.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2} | nulls)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2  # null means the default
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "tool_calls": None},
                {"role": "user", "content": "more"}]  # fmt: skip
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stop=None,
                                       extra_body={"top_k": 5, "repetition_penalty": 1.0})  # fmt: skip
    assert r.choices[0].finish_reason == "length"


def test_lm_eval_batched_loglikelihood_payload(client, tokenizer):
    """What lm-eval's local-completions sends for log-likelihood: token-id lists, echo, logprobs=1,
    max_tokens=1 (it drops the generated entry with [ctxlen:-1]) and compares each token's logprob
    with the best of its top_logprobs (is_greedy)."""
    a = tokenizer("The keeper lit the lamp", add_special_tokens=False).input_ids
    b = tokenizer("Ships came in after the storm had passed", add_special_tokens=False).input_ids
    r = client.completions.create(model=MODEL, prompt=[a, b], max_tokens=1, echo=True, logprobs=1, temperature=0,
                                  seed=1234)  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1]
    for ids, choice in zip((a, b), r.choices, strict=True):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(lp.text_offset) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(len(top) == 1 for top in lp.top_logprobs[1:])
        greedy = lp.token_logprobs[-1]  # the generated token, sampled greedily: equal to its top-1 value
        assert greedy == max(lp.top_logprobs[-1].values())
        assert lp.text_offset == sorted(lp.text_offset)
    assert r.usage.prompt_tokens == len(a) + len(b) and r.usage.completion_tokens == 2


def test_models_health_and_metrics_parse(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(server.url + "/v1/models").json()["data"][0]["dsla"]["undistilled_layers"] == [0, 1, 2, 3]
    client.completions.create(model=MODEL, prompt="count me", max_tokens=3)
    text = httpx.get(server.url + "/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("dsla_queue_depth", "dsla_running_sequences", "dsla_conversion_level", "dsla_kv_cache_bytes",
                 "dsla_state_bytes", "dsla_time_to_first_token_seconds", "dsla_time_per_output_token_seconds",
                 "dsla_layer_conversions", "dsla_generation_tokens_per_second"):  # fmt: skip
        assert name in families, sorted(families)
    ttft = {s.name: s.value for s in families["dsla_time_to_first_token_seconds"].samples}
    assert ttft["dsla_time_to_first_token_seconds_count"] >= 1


def test_dsla_state_and_manual_override(server):
    state = httpx.get(server.url + "/v1/dsla").json()
    assert state["order"] == [3, 2, 1, 0] and len(state["layers"]) == 4
    r = httpx.post(server.url + "/v1/dsla", json={"level": 0.5}).json()
    assert r["level"] == 0.5 and r["decision"]["trigger"] == "manual"
    modes = {x["layer"]: x["new_sequences"] for x in r["layers"]}
    assert modes == {0: "attention", 1: "attention", 2: "dsla", 3: "dsla"}
    level = {s.name: s.value for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)
             for s in f.samples if s.name == "dsla_conversion_level"}  # fmt: skip
    assert level == {"dsla_conversion_level": 0.5}
    r = httpx.post(server.url + "/v1/dsla", json={"level": 0.0}).json()
    assert r["level"] == 0.0 and r["controller"]["decisions"][0]["reason"].startswith("manual")
    assert (
        'dsla_controller_decisions_total{direction="set",trigger="manual"}' in httpx.get(server.url + "/metrics").text
    )


def test_conversion_while_requests_run_loses_nothing(tokenizer):
    """Eight concurrent streams with different plans; layers fold into DSLA state mid-generation."""
    with start_server(tokenizer, ctrl={"policy": "static", "conversion": 0.0}) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        results: dict[int, tuple[str, int, str]] = {}
        plans_seen: set[int] = set()

        def worker(i: int) -> None:
            stream = client.completions.create(model=MODEL, prompt=f"Story {i}: the sea", max_tokens=120,
                                               stream=True, stream_options={"include_usage": True},
                                               extra_body={"ignore_eos": True})  # fmt: skip
            chunks = list(stream)
            text = "".join(c.choices[0].text for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            results[i] = (text, chunks[-1].usage.completion_tokens, finish)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        httpx.post(srv.url + "/v1/dsla", json={"level": 0.5}, timeout=60)  # new sequences: 2 DSLA layers
        threads += [threading.Thread(target=worker, args=(i,)) for i in range(4, 8)]
        for t in threads[4:]:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(plans_seen) < 2:
            plans_seen |= {s["dsla_layers"] for s in httpx.get(srv.url + "/v1/dsla").json()["sequences"]}
            time.sleep(0.02)
        r = httpx.post(srv.url + "/v1/dsla", json={"level": 1.0, "convert_running": True}, timeout=60).json()
        for t in threads:
            t.join(120)
        assert len(plans_seen) >= 2, plans_seen  # one batch held sequences with different plans
        assert r["conversions"] > 0  # running sequences were folded in flight
        assert sorted(results) == list(range(8))
        assert all(n == 120 and finish == "length" and text for text, n, finish in results.values())
        state = httpx.get(srv.url + "/v1/dsla").json()
        assert state["sequences"] == [] and state["memory"]["used_bytes"] == 0


def test_disconnect_cancels_the_sequence_and_frees_its_cache(tokenizer):
    with start_server(tokenizer) as srv:
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "An endless tale", "max_tokens": 900, "stream": True, "ignore_eos": True,
        }) as r:  # fmt: skip
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
            wait_until(lambda: srv.engine.snapshot().running == 1, what="the stream to run")
        wait_until(lambda: srv.engine.snapshot().running == 0, what="the aborted sequence to leave")
        assert srv.engine.snapshot().state["memory"]["used_bytes"] == 0
        aborted = httpx.get(srv.url + "/metrics").text
        assert 'dsla_requests_total{outcome="aborted"} 1.0' in aborted


def test_non_streaming_client_that_gives_up_frees_its_cache(tokenizer):
    with start_server(tokenizer) as srv:
        body = {"model": MODEL, "prompt": "An endless tale", "max_tokens": 900, "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(srv.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.5))
        wait_until(lambda: srv.engine.snapshot().running == 0, what="the abandoned sequence to leave")
        assert httpx.get(srv.url + "/v1/dsla").json()["memory"]["used_bytes"] == 0


def test_queue_timeout_answers_503_with_retry_after(tokenizer):
    with start_server(tokenizer, sched={"max_num_seqs": 1, "queue_timeout_s": 0.2}) as srv:
        long = threading.Thread(target=httpx.post, args=(srv.url + "/v1/completions",), kwargs={"timeout": 60, "json": {
            "model": MODEL, "prompt": "hold the slot", "max_tokens": 300, "ignore_eos": True}})  # fmt: skip
        long.start()
        wait_until(lambda: srv.engine.snapshot().running, what="the long request to run")
        r = httpx.post(
            srv.url + "/v1/completions", json={"model": MODEL, "prompt": "late", "max_tokens": 2}, timeout=30
        )
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_timeout" and r.json()["error"]["type"] == "server_error"
        long.join(60)


def test_overload_answers_429_with_retry_after_never_hangs(tokenizer):
    with start_server(tokenizer, sched={"max_num_seqs": 1, "max_waiting": 1}) as srv:
        statuses: list[tuple[int, str | None]] = []

        def fire() -> None:
            r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
                "model": MODEL, "prompt": "busy", "max_tokens": 60, "ignore_eos": True})  # fmt: skip
            statuses.append((r.status_code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=fire) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        codes = sorted(s for s, _ in statuses)
        assert len(codes) == 6 and codes[0] == 200 and 429 in codes, codes
        assert all(int(ra) >= 1 for s, ra in statuses if s == 429)


def test_shutdown_drains_running_requests(tokenizer):
    srv = start_server(tokenizer)
    srv.__enter__()
    result = {}

    def long_request() -> None:
        r = httpx.post(srv.url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "drain me", "max_tokens": 80, "ignore_eos": True})  # fmt: skip
        result["r"] = r

    t = threading.Thread(target=long_request)
    t.start()
    wait_until(lambda: srv.engine.snapshot().running, what="the request to run")
    srv.__exit__(None, None, None)  # the same path as SIGTERM: stop accepting, finish what runs
    t.join(60)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 80
