"""API and admin keys, the admin endpoint's loopback rule, and request limits, on real servers on loopback."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from typer.testing import CliRunner

from dsla_serve.cli import app as cli_app
from dsla_serve.serving.api.auth import Keys, is_loopback
from dsla_serve.serving.api.protocol import MAX_STOP_CHARS
from tests.serving.conftest import MODEL, start_server

API, ADMIN = "api-key-for-tests", "admin-key-for-tests"
BODY_LIMIT = 64 << 10


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(tokenizer):
    api = {"keys": Keys(API, ADMIN), "max_body_bytes": BODY_LIMIT, "max_prompt_tokens": 64}
    with start_server(tokenizer, ctrl={"policy": "static", "conversion": 0.0}, sched={"max_waiting": 4},
                      api=api) as srv:  # fmt: skip
        yield srv


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code and err["message"]
    return err


def test_every_endpoint_but_health_needs_the_api_key(keyed):
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2}
    calls = [("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/v1/dsla", None),
             ("POST", "/v1/completions", body),
             ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})]  # fmt: skip
    for method, path, payload in calls:
        for headers in ({}, bearer("wrong"), {"Authorization": f"Basic {API}"}):
            r = httpx.request(method, keyed.url + path, json=payload, headers=headers, timeout=30)
            assert_error(r, 401, "invalid_api_key")
            assert r.headers["www-authenticate"] == "Bearer"
        for key in (API, ADMIN):  # the admin key opens everything
            assert (
                httpx.request(method, keyed.url + path, json=payload, headers=bearer(key), timeout=60).status_code
                == 200
            )
    assert httpx.get(keyed.url + "/health").json()["status"] == "ok"  # load balancers probe without a key
    for path in ("/docs", "/openapi.json", "/redoc"):  # no unauthenticated extras
        assert httpx.get(keyed.url + path).status_code in (401, 404)


def test_openai_client_with_and_without_the_key(keyed):
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=API, max_retries=0, timeout=60)
    assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens == 2
    bad = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_the_admin_endpoint_needs_the_admin_key(keyed):
    url = keyed.url + "/v1/dsla"
    assert_error(httpx.post(url, json={"level": 0.5}), 401, "invalid_api_key")
    assert_error(httpx.post(url, json={"level": 0.5}, headers=bearer("wrong")), 401, "invalid_api_key")
    err = assert_error(httpx.post(url, json={"level": 0.5}, headers=bearer(API)), 403, "permission_denied")
    assert "admin key" in err["message"]
    assert httpx.get(url, headers=bearer(API)).json()["level"] == 0.0  # refused: nothing changed
    r = httpx.post(url, json={"level": 0.5}, headers=bearer(ADMIN), timeout=60)
    assert r.status_code == 200 and r.json()["level"] == 0.5
    httpx.post(url, json={"level": 0.0}, headers=bearer(ADMIN), timeout=60)


def test_control_command_takes_the_keys_from_flags_and_environment(keyed):
    runner = CliRunner()
    shown = runner.invoke(cli_app, ["control", "--url", keyed.url], env={"DSLA_SERVE_API_KEY": API})
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["level"] == 0.0
    refused = runner.invoke(
        cli_app, ["control", "--url", keyed.url, "--level", "0.25"], env={"DSLA_SERVE_API_KEY": API}
    )
    assert refused.exit_code == 2 and "403" in refused.output and "admin key" in refused.output
    done = runner.invoke(cli_app, ["control", "--url", keyed.url, "--level", "0.25", "--admin-key", ADMIN])
    assert done.exit_code == 0 and json.loads(done.stdout)["level"] == 0.25
    runner.invoke(cli_app, ["control", "--url", keyed.url, "--level", "0"], env={"DSLA_SERVE_ADMIN_KEY": ADMIN})
    assert httpx.get(keyed.url + "/v1/dsla", headers=bearer(API)).json()["level"] == 0.0


def test_without_an_admin_key_the_admin_endpoint_answers_loopback_clients_only(tokenizer):
    """uvicorn takes the client address from X-Forwarded-For when a loopback proxy sends it (its default
    trust): a remote client behind a local proxy is refused, a local one served."""
    with start_server(tokenizer) as srv:
        url = srv.url + "/v1/dsla"
        err = assert_error(
            httpx.post(url, json={"level": 0.5}, headers={"X-Forwarded-For": "203.0.113.7"}), 403, "permission_denied"
        )
        assert "loopback" in err["message"] and "--admin-key" in err["message"]
        assert httpx.post(url, json={"level": 0.5}, timeout=60).json()["level"] == 0.5
        assert httpx.get(url, headers={"X-Forwarded-For": "203.0.113.7"}).status_code == 200  # reading is open


def test_loopback_addresses():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"))
    assert not any(is_loopback(h) for h in ("203.0.113.7", "10.0.0.1", "::ffff:10.0.0.1", "", None, "host"))
    with pytest.raises(ValueError, match="empty"):
        Keys(api=" ")


def test_oversized_bodies_get_413_before_they_are_read(keyed):
    big = json.dumps({"model": MODEL, "prompt": "x" * BODY_LIMIT}).encode()
    err = assert_error(httpx.post(keyed.url + "/v1/completions", content=big, headers=bearer(API), timeout=30), 413,
                       "request_too_large")  # fmt: skip
    assert str(BODY_LIMIT) in err["message"] and "--max-body-size" in err["message"]

    def chunks():  # no Content-Length: the limit applies while reading
        for _ in range(4):
            yield b" " * (BODY_LIMIT // 2)

    r = httpx.post(keyed.url + "/v1/chat/completions", content=chunks(), headers=bearer(API), timeout=30)
    assert_error(r, 413, "request_too_large")
    ok = httpx.post(keyed.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                    headers=bearer(API), timeout=60)  # fmt: skip
    assert ok.status_code == 200


LIMITS = [
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4 stop"),
    ({"stop": ["s" * (MAX_STOP_CHARS + 1)]}, "stop", f"at most {MAX_STOP_CHARS} characters"),
    ({"n": 3}, "n", "only n=1"),
    ({"logprobs": 6}, "logprobs", "less than or equal to 5"),
    ({"max_tokens": 5000}, None, "exceed the model's context"),
    ({"prompt": "word " * 70}, "prompt", "--max-prompt-tokens (64 tokens)"),
    ({"prompt": [[1, 2]] * 5}, None, "queues at most 4"),
]


@pytest.mark.parametrize(("extra", "param", "says"), LIMITS, ids=[x[2].split()[-1] for x in LIMITS])
def test_limits_answer_a_clear_400(keyed, extra, param, says):
    r = httpx.post(keyed.url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2} | extra,
                   headers=bearer(API), timeout=30)  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert says in err["message"] and (param is None or err["param"] == param), err


def test_a_huge_prompt_is_tokenised_off_the_event_loop(tokenizer):
    """Tokenising an 860 kB prompt takes most of a second; /health, answered on the event loop, stays fast
    meanwhile (the tokenizer runs on a worker thread and releases the GIL)."""
    text = "The lighthouse keeper wrote a letter about the storm. " * 16000
    t = time.perf_counter()
    tokenizer(text, add_special_tokens=False)
    tokenise_s = time.perf_counter() - t
    with start_server(tokenizer, api={"max_body_bytes": 1 << 20}) as srv:
        result = {}
        sender = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
            srv.url + "/v1/completions", json={"model": MODEL, "prompt": text}, timeout=60)))  # fmt: skip
        sender.start()
        probes = []
        while sender.is_alive():
            t0 = time.perf_counter()
            assert httpx.get(srv.url + "/health", timeout=30).status_code == 200
            probes.append(time.perf_counter() - t0)
        sender.join()
    assert_error(result["r"], 400, "context_length_exceeded")  # tokenised, then refused for its length
    assert len(probes) >= 3 and max(probes) < 0.5 * tokenise_s, (probes, tokenise_s)
