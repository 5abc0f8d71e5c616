"""Building an engine + app from options, and running the server in the foreground or on a thread.

The thread form (``ServerThread``) serves the benchmark and the tests: a real uvicorn server on a
loopback port, stopped by setting ``should_exit`` (the same path as SIGTERM: drain, then stop).
"""

from __future__ import annotations

import re
import socket
import threading
import time

import uvicorn

from dsla_serve.serving.api.server import ApiConfig, create_app
from dsla_serve.serving.controller import ControllerConfig
from dsla_serve.serving.engine import AsyncEngine, EngineCore
from dsla_serve.serving.scheduler import SchedulerConfig

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'4GiB', '512MB', '1000000' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise ValueError(f"expected a size like 4GiB, 512MiB or a number of bytes, got {text!r}")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def build_app(model, tokenizer, info, scheduler: SchedulerConfig, controller: ControllerConfig,
              api: ApiConfig | None = None):  # fmt: skip
    """(app, engine) over a loaded hybrid model; the engine starts with the app's lifespan."""
    engine = AsyncEngine(EngineCore(model, tokenizer, info, scheduler, controller))
    return create_app(engine, api), engine


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerThread:
    """A real uvicorn server for ``app`` on a free loopback port, on a background thread.

    with ServerThread(app) as server: httpx.get(server.url + "/health")
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int | None = None, start_timeout_s: float = 60):
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(app, host=self.host, port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.start_timeout_s = start_timeout_s

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=120)
