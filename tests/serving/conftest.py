"""Serving fixtures: a tiny random Llama with the embedded model's tokenizer, engines and real servers on loopback."""

from __future__ import annotations

import time

import pytest
from transformers import AutoTokenizer

from dsla_serve.model import HybridModel, convert
from dsla_serve.model.loader import resolve
from dsla_serve.model.pretrained import HybridInfo
from dsla_serve.serving.api.server import ApiConfig
from dsla_serve.serving.controller import ControllerConfig
from dsla_serve.serving.engine import EngineCore
from dsla_serve.serving.launch import ServerThread, build_app
from dsla_serve.serving.scheduler import SchedulerConfig
from tests.conftest import randomize_gates, tiny_llama

CONTEXT = 1024
MODEL = "tiny-llama"


@pytest.fixture(scope="session")
def tokenizer():
    path, _ = resolve(None)
    return AutoTokenizer.from_pretrained(path)


def tiny_hybrid(tokenizer, seed: int = 0) -> tuple[HybridModel, HybridInfo]:
    """4-layer random Llama over the real 49k vocabulary, every layer convertible, order [3, 2, 1, 0]."""
    model = tiny_llama(seed, vocab_size=len(tokenizer), max_position_embeddings=CONTEXT)
    randomize_gates(convert(model, range(4)).values(), seed=seed)
    info = HybridInfo(MODEL, None, [3, 2, 1, 0], "test order", [], [0, 1, 2, 3])
    return HybridModel(model), info


def make_core(tokenizer, sched: dict | None = None, ctrl: dict | None = None) -> EngineCore:
    hybrid, info = tiny_hybrid(tokenizer)
    return EngineCore(hybrid, tokenizer, info, SchedulerConfig(**(sched or {})),
                      ControllerConfig(**({"policy": "off"} | (ctrl or {}))))  # fmt: skip


def start_server(tokenizer, sched: dict | None = None, ctrl: dict | None = None, api: dict | None = None,
                 hybrid: tuple[HybridModel, HybridInfo] | None = None) -> ServerThread:  # fmt: skip
    """A real server on a loopback port over the tiny model (or ``hybrid``); ``api``: ApiConfig fields."""
    hybrid, info = hybrid or tiny_hybrid(tokenizer)
    app, engine = build_app(hybrid, tokenizer, info, SchedulerConfig(**(sched or {})),
                            ControllerConfig(**({"policy": "off"} | (ctrl or {}))),
                            ApiConfig(**({"default_max_tokens": 32} | (api or {}))))  # fmt: skip
    server = ServerThread(app)
    server.engine = engine  # tests read the engine's published snapshot
    return server


def wait_until(condition, timeout_s: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition()`` every 20 ms until it is true; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
