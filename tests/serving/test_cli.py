"""``dsla-serve serve`` as a real process on a tiny local checkpoint: it serves, ``dsla-serve control``
reaches it, and SIGINT lets the stream in flight finish before the process exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from dsla_serve.serving.launch import free_port
from tests.conftest import tiny_llama
from tests.serving.conftest import CONTEXT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-serve-model")
    tiny_llama(0, vocab_size=len(tokenizer), max_position_embeddings=CONTEXT).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from dsla_serve.cli import app; app()", *args]


def test_serve_answers_is_controlled_and_drains_on_sigint(model_dir, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    log = (tmp_path / "serve.log").open("w+")  # a file, not a pipe: a full pipe would block the server
    proc = subprocess.Popen(
        cli("serve", "--model", str(model_dir), "--weights", "none", "--port", str(port), "--policy", "static",
            "--conversion", "0.5", "--threads", "1"),
        env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        assert httpx.get(url + "/v1/models").json()["data"][0]["dsla"]["note"]  # fresh DSLA layers: said so
        shown = subprocess.run(cli("control", "--url", url), capture_output=True, text=True, env=env, timeout=120)
        assert json.loads(shown.stdout)["level"] == 0.5 and json.loads(shown.stdout)["layers_for_new_sequences"] == 2
        set_ = subprocess.run(cli("control", "--url", url, "--level", "0.25"), capture_output=True, text=True, env=env,
                              timeout=120)  # fmt: skip
        assert json.loads(set_.stdout)["last_decision"]["reason"] == "manual: policy static, level 0.25"

        lines: list[str] = []

        def stream() -> None:
            body = {
                "model": name,
                "prompt": "drain me",
                "max_tokens": 60,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
                lines.extend(line for line in r.iter_lines() if line.startswith("data:"))

        t = threading.Thread(target=stream)
        t.start()
        while not httpx.get(url + "/v1/dsla").json()["sequences"]:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)  # Ctrl-C: stop accepting, finish the stream, exit
        t.join(120)
        assert proc.wait(120) == 0
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(x[5:]) for x in lines[:-1]]
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 60
        assert "Finished server process" in (tmp_path / "serve.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
