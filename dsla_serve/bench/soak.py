"""``dsla-serve bench soak``: everything at once against a real server for M minutes, then a verdict.

dsla-serve bench soak --minutes 10 --json                   # starts `dsla-serve serve` on loopback
dsla-serve bench soak --minutes 2 --url http://127.0.0.1:8000 --api-key K --admin-key A

Workers send a mix without pause: prompts of mixed lengths (real text), streaming and not, chat and
completions, prompt scoring (echo + logprobs), clients that disconnect mid-stream or give up on a
slow answer, and bad requests (malformed JSON, wrong types, unknown model, oversized body, missing
key, too many or too long stop strings, n > 1, over-long prompt, the admin endpoint with the API
key). Meanwhile an operator task moves the conversion level through POST /v1/dsla with the admin
key, alternately folding running sequences up (``convert_running``) and lowering the level for new
ones, and a poller reads /v1/dsla, /metrics and /health.

A request is *lost* when its client did not drop it and it neither completed nor got a 4xx, or a
429/503 with Retry-After. The server's resident memory (RSS, from /metrics) is read after a
warm-up at the largest shapes (the allocator keeps freed memory, so the peak is reached first) and
again once the server is idle after the soak. Targets: 0 lost, 0 5xx, RSS growth <= 5 %, and
nothing left running (no sequence, no queue, no reserved cache; a started server exits with 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import typer
from rich.console import Console

from dsla_serve.bench.prompts import load_text
from dsla_serve.bench.replay import ManagedServer, parse_metrics

RSS = "process_resident_memory_bytes"
TARGET_RSS_GROWTH = 0.05
err = Console(stderr=True, soft_wrap=True)


@dataclass
class Tally:
    """Outcomes of one soak. ``latencies``: seconds from send to the complete answer of completed requests."""

    sent: int = 0
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # a valid request answered with an error: status -> n
    dropped_by_client: int = 0
    lost: list[str] = field(default_factory=list)  # what happened to each lost request
    server_errors: int = 0  # 5xx other than 503 with Retry-After
    bad_sent: int = 0
    bad_rejected: int = 0  # bad requests answered with the expected 4xx
    bad_unexpected: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    control_ok: int = 0
    control_failed: list[str] = field(default_factory=list)
    polls: int = 0
    polls_failed: list[str] = field(default_factory=list)

    def error(self, r: httpx.Response) -> None:
        """A valid request got an error status: acceptable (4xx, 429/503 with Retry-After) or lost."""
        if r.status_code >= 500 and not (r.status_code == 503 and r.headers.get("retry-after")):
            self.server_errors += 1
            self.lost.append(f"http {r.status_code}: {r.text[:160]}")
        elif r.status_code == 429 and not r.headers.get("retry-after"):
            self.lost.append("429 without Retry-After")
        else:
            self.failed[str(r.status_code)] = self.failed.get(str(r.status_code), 0) + 1


class Mix:
    """Request bodies: prompts cut from real text at three lengths, sized to the served model's context."""

    def __init__(self, model: str, context: int, rng: random.Random, body_limit: int, words: list[str]):
        self.model, self.context, self.rng, self.body_limit, self.words = model, context, rng, body_limit, words
        top = max(16, context // 4)  # words: prose is 1-2 tokens a word, so long prompts stay inside the context
        self.lengths = [(4, 40), (min(150, top // 2), min(400, top // 2)), (top // 2, top)]

    def prompt(self, longest: bool = False) -> str:
        lo, hi = self.lengths[-1] if longest else self.rng.choice(self.lengths)
        n = hi if longest else self.rng.randint(lo, hi)
        start = self.rng.randrange(0, len(self.words) - n)
        return " ".join(self.words[start : start + n])

    def valid(self, stream: bool, longest: bool = False) -> tuple[str, dict]:
        max_tokens = 64 if longest else self.rng.choice([1, 8, 16, 32, 64])
        body = {"model": self.model, "max_tokens": max_tokens, "stream": stream,
                "temperature": self.rng.choice([0.0, 0.7]), "seed": self.rng.randrange(1 << 30)}  # fmt: skip
        if self.rng.random() < 0.3:
            body["stop"] = [self.rng.choice(["\n\n", ".", "the end"])]
        if self.rng.random() < 0.4:
            return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": self.prompt(longest)}]}
        return "/v1/completions", body | {"prompt": self.prompt(longest)}

    def scoring(self, longest: bool = False) -> tuple[str, dict]:
        """lm-eval's log-likelihood request: prompt logprobs (the (chunk × vocab) logits path)."""
        return "/v1/completions", {"model": self.model, "prompt": self.prompt(longest), "max_tokens": 0, "echo": True,
                                   "logprobs": 1}  # fmt: skip

    def bad(self, keyed: bool, admin_keyed: bool) -> tuple[str, str, bytes, int, bool]:
        """(method, path, raw body, expected status, send without the key)."""
        ok = {"model": self.model, "prompt": "x", "max_tokens": 2}
        cases = [  # bodies are built only when chosen: the oversized one is twice the body limit
            ("/v1/completions", lambda: b"{not json", 400),
            ("/v1/completions", lambda: ok | {"max_tokens": "many"}, 400),
            ("/v1/completions", lambda: ok | {"model": "no-such-model"}, 404),
            ("/v1/completions", lambda: ok | {"prompt": "x" * (2 * self.body_limit)}, 413),
            ("/v1/completions", lambda: ok | {"stop": ["a", "b", "c", "d", "e"]}, 400),
            ("/v1/completions", lambda: ok | {"stop": ["s" * 300]}, 400),
            ("/v1/completions", lambda: ok | {"n": 2}, 400),
            ("/v1/completions", lambda: ok | {"prompt": "word " * (self.context + 16)}, 400),
            ("/v1/chat/completions", lambda: {"model": self.model, "messages": []}, 400),
        ]
        if keyed:
            cases.append(("/v1/completions", lambda: ok, 401))
        if admin_keyed and keyed:
            cases.append(("/v1/dsla", lambda: {"level": 0.5}, 403))  # the API key is not the admin key
        path, make, status = self.rng.choice(cases)
        body = make()
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return "POST", path, raw, status, status == 401


async def worker(client: httpx.AsyncClient, mix: Mix, tally: Tally, deadline: float, keyed: bool,
                 admin_keyed: bool, timeout_s: float) -> None:  # fmt: skip
    rng = mix.rng
    while time.monotonic() < deadline:
        kind = rng.choices(["stream", "plain", "disconnect", "give_up", "bad", "score"], [30, 22, 14, 6, 16, 12])[0]
        tally.sent += 1
        t0 = time.monotonic()
        try:
            if kind == "bad":
                await bad_request(client, mix, tally, keyed, admin_keyed)
            elif kind in ("stream", "disconnect"):
                path, body = mix.valid(stream=True)
                await stream(client, path, body, tally, t0, rng.randint(1, 3) if kind == "disconnect" else None)
            else:
                path, body = mix.scoring() if kind == "score" else mix.valid(stream=False)
                read_s = rng.uniform(0.05, 0.3) if kind == "give_up" else timeout_s
                try:
                    r = await client.post(path, json=body, timeout=httpx.Timeout(timeout_s, read=read_s))
                except httpx.ReadTimeout:
                    if kind != "give_up":
                        raise
                    tally.dropped_by_client += 1
                    continue
                if r.status_code == 200 and r.json().get("choices"):
                    tally.completed += 1
                    tally.latencies.append(time.monotonic() - t0)
                elif r.status_code == 200:
                    tally.lost.append(f"200 without choices: {r.text[:160]}")
                else:
                    tally.error(r)
        except (httpx.HTTPError, json.JSONDecodeError) as e:
            tally.lost.append(f"{kind}: {type(e).__name__}: {e}"[:200])


async def stream(client: httpx.AsyncClient, path: str, body: dict, tally: Tally, t0: float, drop_after: int | None):
    """Read an SSE stream to [DONE] (completed), or close it after ``drop_after`` events (dropped by client)."""
    events = 0
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            tally.error(r)
            return
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            if line[5:].strip() == "[DONE]":
                tally.completed += 1
                tally.latencies.append(time.monotonic() - t0)
                return
            event = json.loads(line[5:])
            if "error" in event:
                err = event["error"]
                tally.lost.append(f"error in stream: {err.get('code')}: {err.get('message')}"[:200])
                tally.server_errors += 1
                return
            events += 1
            if drop_after is not None and events >= drop_after:
                tally.dropped_by_client += 1
                return  # leaving the context closes the connection mid-stream
    tally.lost.append("stream ended without [DONE]")


async def bad_request(client: httpx.AsyncClient, mix: Mix, tally: Tally, keyed: bool, admin_keyed: bool) -> None:
    method, path, raw, status, no_key = mix.bad(keyed, admin_keyed)
    headers = {"content-type": "application/json"} | ({"authorization": "Bearer wrong-key"} if no_key else {})
    tally.bad_sent += 1
    r = await client.request(method, path, content=raw, headers=headers)
    try:
        err = r.json()["error"]
        well_formed = {"message", "type", "param", "code"} <= set(err)
    except (ValueError, KeyError, TypeError):
        well_formed = False
    if r.status_code == status and well_formed:
        tally.bad_rejected += 1
    else:
        tally.bad_unexpected.append(f"{path} expected {status}, got {r.status_code}: {r.text[:120]}")
        if r.status_code >= 500:
            tally.server_errors += 1


async def operator(admin: httpx.AsyncClient, tally: Tally, deadline: float, every_s: float, rng: random.Random):
    """Level changes with the admin key: up with in-flight folds, then down (new sequences only), and so on."""
    up = True
    while time.monotonic() < deadline:
        await asyncio.sleep(every_s)
        if rng.random() < 0.15:
            body = {"policy": "adaptive"}
        else:
            level = rng.choice([0.5, 0.75, 1.0]) if up else rng.choice([0.0, 0.125, 0.25])
            body = {"level": level, "convert_running": up}
            up = not up
        try:
            r = await admin.post("/v1/dsla", json=body)
            if r.status_code == 200:
                tally.control_ok += 1
            else:
                tally.control_failed.append(f"{body}: {r.status_code} {r.text[:120]}")
                tally.server_errors += int(r.status_code >= 500)
        except httpx.HTTPError as e:
            tally.control_failed.append(f"{body}: {type(e).__name__}: {e}"[:160])


async def poller(client: httpx.AsyncClient, tally: Tally, deadline: float) -> None:
    while time.monotonic() < deadline:
        for path in ("/v1/dsla", "/metrics", "/health"):
            tally.polls += 1
            try:
                r = await client.get(path)
                if r.status_code != 200:
                    tally.polls_failed.append(f"{path}: {r.status_code}")
            except httpx.HTTPError as e:
                tally.polls_failed.append(f"{path}: {type(e).__name__}")
        await asyncio.sleep(0.5)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def idle_state(client: httpx.AsyncClient, timeout_s: float) -> dict:
    """Wait until nothing runs, is queued or holds cache (or timeout_s); the last /v1/dsla state."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = (await client.get("/v1/dsla")).json()
        if (not state["sequences"] and not state["queue_depth"] and not state["memory"]["used_bytes"]) or (
            time.monotonic() > deadline
        ):
            return state
        await asyncio.sleep(0.25)


async def rss(client: httpx.AsyncClient) -> float | None:
    return parse_metrics((await client.get("/metrics")).text).get(RSS)


async def run_soak(url: str, *, minutes: float, api_key: str | None = None, admin_key: str | None = None,
                   concurrency: int = 8, control_every_s: float = 3.0, body_limit: int = 4 << 20, seed: int = 0,
                   timeout_s: float = 600.0) -> dict:  # fmt: skip
    """Soak a running server; returns the report (see the module docstring)."""
    rng = random.Random(seed)
    key = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    timeout = httpx.Timeout(timeout_s, connect=30.0)
    async with (
        httpx.AsyncClient(base_url=url, headers=key, timeout=timeout, limits=limits) as client,
        httpx.AsyncClient(base_url=url, timeout=timeout,
                          headers={"authorization": f"Bearer {admin_key}"} if admin_key else {}) as admin,
    ):  # fmt: skip
        models = (await client.get("/v1/models")).json()["data"][0]
        words = load_text().split()
        mix = Mix(models["id"], models["max_model_len"], rng, body_limit, words)
        first = (await client.get("/v1/dsla")).json()
        rss_launch = await rss(client)
        warm = Tally()  # the largest shapes at full concurrency, so the allocator reaches its peak first
        t0 = time.monotonic()
        path, body = mix.scoring(longest=True)
        await asyncio.gather(*(stream(client, *mix.valid(True, longest=True), warm, t0, None)
                               for _ in range(concurrency)), client.post(path, json=body))  # fmt: skip
        await idle_state(client, 120)
        rss_start = await rss(client)
        tally = Tally()
        start = time.monotonic()
        deadline = start + 60 * minutes
        tasks = [worker(client, Mix(mix.model, mix.context, random.Random(rng.random()), body_limit, words), tally,
                        deadline, api_key is not None, admin_key is not None, timeout_s)
                 for _ in range(concurrency)]  # fmt: skip
        tasks += [operator(admin, tally, deadline, control_every_s, rng), poller(client, tally, deadline)]
        await asyncio.gather(*tasks)
        wall = time.monotonic() - start
        restore = {"policy": first["policy"]} | ({"level": first["level"]} if first["policy"] == "static" else {})
        with contextlib.suppress(httpx.HTTPError):
            await admin.post("/v1/dsla", json=restore)
        final = await idle_state(client, 120)
        rss_end = await rss(client)
    growth = (rss_end / rss_start - 1) if rss_start and rss_end else None
    left = {"sequences": len(final["sequences"]), "queue_depth": final["queue_depth"],
            "used_bytes": final["memory"]["used_bytes"]}  # fmt: skip
    report = {
        "url": url, "minutes": minutes, "wall_s": round(wall, 1), "concurrency": concurrency, "seed": seed,
        "requests": {
            "sent": tally.sent, "completed": tally.completed, "failed": sum(tally.failed.values()),
            "failed_by_status": tally.failed, "dropped_by_client": tally.dropped_by_client,
            "lost": len(tally.lost), "server_errors": tally.server_errors,
            "bad": {"sent": tally.bad_sent, "rejected_as_expected": tally.bad_rejected,
                    "unexpected": tally.bad_unexpected[:10]},
            "lost_examples": tally.lost[:10],
            "warm_up": {"completed": warm.completed, "lost": warm.lost[:5]},
        },
        "latency_s": {"p50": pct(tally.latencies, 0.5), "p99": pct(tally.latencies, 0.99),
                      "max": max(tally.latencies, default=None)},
        "control": {"level_changes": tally.control_ok, "failed": tally.control_failed[:10],
                    "layers_folded": final["conversions"] - first["conversions"]},
        "polls": {"sent": tally.polls, "failed": tally.polls_failed[:10]},
        "rss_bytes": {"launch": rss_launch, "start": rss_start, "end": rss_end, "growth": growth},
        "left_running": left,
        "targets": {"lost": 0, "server_errors": 0, "rss_growth_max": TARGET_RSS_GROWTH, "left_running": 0},
    }  # fmt: skip
    report["ok"] = (
        not tally.lost and not tally.server_errors and not tally.bad_unexpected and not any(left.values())
        and growth is not None and growth <= TARGET_RSS_GROWTH and not tally.control_failed
        and not tally.polls_failed and not warm.lost
    )  # fmt: skip
    return report


def soak(minutes: float, *, url: str | None = None, serve_args: list[str] | None = None,
         out: Path = Path("runs/soak"), **kw) -> dict:  # fmt: skip
    """Soak ``url``, or a `dsla-serve serve` started here on loopback with fresh random keys."""
    if url is not None:
        return asyncio.run(run_soak(url.rstrip("/"), minutes=minutes, **kw))
    kw.setdefault("api_key", secrets.token_urlsafe(16))
    kw.setdefault("admin_key", secrets.token_urlsafe(16))
    args = [*(serve_args or []), "--api-key", kw["api_key"], "--admin-key", kw["admin_key"],
            "--max-body-size", str(kw.get("body_limit", 4 << 20))]  # fmt: skip
    server = ManagedServer(args, out / "server.log")
    with server:
        report = asyncio.run(run_soak(server.url, minutes=minutes, **kw))
    report["server_exit_code"] = server.proc.returncode if server.proc else None
    report["server_log"] = str(out / "server.log")
    report["ok"] = report["ok"] and report["server_exit_code"] == 0
    return report


def bench_soak(
    minutes: float = typer.Option(10.0, min=0.01, help="How long the mixed load runs."),
    url: str = typer.Option(None, help="Soak this running server instead of starting one on loopback."),
    api_key: str = typer.Option(None, envvar="DSLA_SERVE_API_KEY", show_default=False, help="With --url: its key."),
    admin_key: str = typer.Option(
        None, envvar="DSLA_SERVE_ADMIN_KEY", show_default=False, help="With --url: its admin key (level changes)."
    ),
    concurrency: int = typer.Option(8, min=1, help="Clients sending at once."),
    control_every: float = typer.Option(3.0, min=0.1, help="Seconds between level changes."),
    body_limit: str = typer.Option("4MiB", help="The server's --max-body-size (the oversized request doubles it)."),
    model: str = typer.Option(None, help="Started server: base model (default: the embedded one)."),
    serve_arg: list[str] = typer.Option(None, help="Started server: extra `dsla-serve serve` option (repeat)."),
    seed: int = typer.Option(0, help="Seed of the request mix."),
    out: Path = typer.Option(Path("runs/soak"), help="Directory for soak.json and the started server's log."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as one JSON object."),
) -> None:
    """Mixed load, disconnects, bad requests and level changes at once for M minutes; exits 1 on a missed target."""
    from dsla_serve.bench.replay import ReplayError
    from dsla_serve.serving.launch import parse_bytes

    try:
        limit = parse_bytes(body_limit)
        serve_args = ([] if model is None else ["--model", model]) + list(serve_arg or [])
        keys = {k: v for k, v in (("api_key", api_key), ("admin_key", admin_key)) if v}
        report = soak(minutes, url=url, serve_args=serve_args, out=out, concurrency=concurrency,
                      control_every_s=control_every, body_limit=limit, seed=seed, **keys)  # fmt: skip
    except (ReplayError, ValueError, httpx.HTTPError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(2) from None
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2))
    if as_json:
        print(json.dumps(report))
    else:
        q, rss = report["requests"], report["rss_bytes"]
        print(f"{q['sent']} sent: {q['completed']} completed, {q['failed']} failed (4xx/429/503), "
              f"{q['dropped_by_client']} dropped by their client, {q['lost']} lost, {q['server_errors']} 5xx; "
              f"p99 {report['latency_s']['p99']} s; RSS {rss['start']} -> {rss['end']} B; "
              f"left running {report['left_running']}; {'OK' if report['ok'] else 'TARGETS MISSED'}")  # fmt: skip
    if not report["ok"]:
        raise typer.Exit(1)
