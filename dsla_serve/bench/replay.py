"""Trace replay against a running dsla-serve server over its OpenAI API, and policy comparison.

dsla-serve replay --trace ../shared/traces/AzureLLMInferenceTrace_conv.csv --limit 40 --time-scale 4 \
    --compare off,static:0.25,adaptive --out runs/replay

Each request is sent at its trace arrival time (bounded concurrency: beyond ``concurrency`` in flight
a request waits client-side, and that wait counts in its latency), streamed, and timed: time to first
token (TTFT), time per output token after the first (TPOT) and end-to-end latency, all from its
arrival. A sampler polls /metrics and /v1/dsla meanwhile, for queue depth and conversion level over
time. ``compare`` starts a server per policy (or switches a given server's policy through /v1/dsla)
and replays the same requests under each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from dsla_serve.bench.trace import Trace, all_at_once, scale_time, utilization_scale
from dsla_serve.serving.profile import ProfileError, read_ppl

if TYPE_CHECKING:
    from dsla_serve.bench.peer import VllmPeer


class ReplayError(RuntimeError):
    """The server could not be started or reached; the message says what happened."""


@dataclass(frozen=True)
class Policy:
    """A server conversion policy: ``off``, ``static:LEVEL`` or ``adaptive``; or ``vllm``, the outside
    baseline (vLLM's CPU backend on the same model, all attention: dsla_serve/bench/peer.py)."""

    name: str
    level: float | None = None
    url: str | None = None  # url:LABEL=URL: a server already running elsewhere (any OpenAI-compatible peer)
    tag: str | None = None

    @classmethod
    def parse(cls, text: str) -> Policy:
        name, _, arg = text.strip().partition(":")
        if name in ("off", "adaptive", "vllm") and not arg:
            return cls(name)
        if name == "url":
            tag, _, url = arg.partition("=")
            if not tag or not url.startswith(("http://", "https://")):
                raise ValueError(f"an outside server is url:LABEL=http://HOST:PORT, got {text!r}")
            return cls(name, url=url.rstrip("/"), tag=tag)
        if name == "static":
            try:
                level = float(arg)
            except ValueError:
                raise ValueError(f"static policy needs a level like static:0.25, got {text!r}") from None
            if not 0 <= level <= 1:
                raise ValueError(f"conversion level must be in [0, 1], got {text!r}")
            return cls(name, level)
        raise ValueError(f"unknown policy {text!r}: expected off, static:LEVEL, adaptive, vllm or url:LABEL=URL")

    @property
    def label(self) -> str:
        return f"static:{self.level:g}" if self.name == "static" else self.tag or self.name

    def serve_args(self) -> list[str]:
        args = ["--policy", self.name]
        return [*args, "--conversion", str(self.level)] if self.level is not None else args

    def dsla_body(self) -> dict:
        """POST /v1/dsla body; adaptive restarts from level 0, its calm state, so replays start alike."""
        level = 0.0 if self.name == "adaptive" else self.level
        return {"policy": self.name} | ({"level": level} if level is not None else {})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ManagedServer:
    """``dsla-serve serve`` as a subprocess on a free loopback port, up once /health answers 200."""

    def __init__(self, args: list[str], log_path: Path, startup_timeout_s: float = 600.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "dsla_serve.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)]
        self.cmd += args
        self.log_path = log_path
        self.startup_timeout_s = startup_timeout_s
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> ManagedServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("w")
        self.proc = self.spawn()
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise ReplayError(f"server exited with {self.proc.returncode} during start-up:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.25)
        self.__exit__(None, None, None)
        raise ReplayError(f"server not healthy after {self.startup_timeout_s:.0f} s:\n{self.log_tail()}")

    def spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=os.environ.copy())

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # graceful: uvicorn drains and exits
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def log_tail(self, n: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])


@dataclass
class RequestRecord:
    """One replayed request. Times are seconds; ttft/e2e count from the scheduled arrival."""

    index: int
    arrival_s: float
    prompt_tokens: int  # as the client's tokenizer counts the prompt it built
    max_tokens: int
    server_prompt_tokens: int | None = None  # as the server counted it (streamed usage)
    sent_s: float | None = None  # when it left the client (after waiting for a concurrency slot)
    ttft_s: float | None = None
    e2e_s: float | None = None
    output_tokens: int = 0
    tpot_s: float | None = None  # (e2e - ttft) / (output_tokens - 1)
    status: str = "pending"  # ok | http <code>: <message> | error: <what> | cancelled

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def request_body(endpoint: str, prompt: str, max_tokens: int, model: str | None) -> dict:
    """Greedy, and forced to generate exactly max_tokens (ignore_eos) so lengths follow the trace."""
    body: dict = {"max_tokens": max_tokens, "temperature": 0.0, "stream": True, "ignore_eos": True}
    body["stream_options"] = {"include_usage": True}
    if model:
        body["model"] = model
    if endpoint == "chat":
        return body | {"messages": [{"role": "user", "content": prompt}]}
    return body | {"prompt": prompt}


async def send(
    client: httpx.AsyncClient, rec: RequestRecord, body: dict, endpoint: str, t0: float
) -> None:  # fmt: skip
    """Stream one request and fill in rec; never raises (a failure is a status)."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    loop = asyncio.get_running_loop()
    rec.sent_s = loop.time() - t0
    chunks, usage_tokens = 0, None
    try:
        async with client.stream("POST", path, json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    text = json.loads(text)["error"]["message"]
                rec.status = f"http {resp.status_code}: {text[:200]}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                    rec.server_prompt_tokens = event["usage"].get("prompt_tokens")
                if event.get("error"):
                    rec.status = f"error: {event['error'].get('message', event['error'])}"
                    return
                for choice in event.get("choices") or []:
                    piece = choice.get("text") if endpoint != "chat" else (choice.get("delta") or {}).get("content")
                    if piece:  # one chunk per token; the finish chunk carries no text
                        chunks += 1
                        if rec.ttft_s is None:
                            rec.ttft_s = loop.time() - t0 - rec.arrival_s
        rec.e2e_s = loop.time() - t0 - rec.arrival_s
        rec.output_tokens = usage_tokens if usage_tokens is not None else chunks
        rec.status = "ok" if rec.output_tokens > 0 else "error: no tokens streamed"
        if rec.ttft_s is not None and rec.output_tokens > 1:
            rec.tpot_s = (rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1)
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.status = f"error: {type(e).__name__}: {e}"[:200]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {'name' or 'name{k=v}': value} for gauges and counters (histograms dropped)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("gauge", "counter"):
            continue
        for s in family.samples:
            if s.name.endswith("_created"):  # creation timestamps of counters, not measurements
                continue
            key = s.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def vllm_gauge(metrics: dict[str, float], what: str) -> float | None:
    """vLLM's ``vllm:num_requests_{what}`` summed over its label sets (engine, model), or None."""
    values = [v for k, v in metrics.items() if k.startswith(f"vllm:num_requests_{what}{{")]
    return sum(values) if values else None


def compact_sample(t: float, metrics: dict[str, float], dsla: dict | None) -> dict:
    """What the report needs from one poll: controller level, queue, memory, and each running
    sequence's own level (its DSLA layers / all layers: adaptive caps make these differ)."""
    dsla = dsla or {}
    n = max(len(dsla.get("layers") or []), 1)
    return {
        "t": t,
        "level": metrics.get("dsla_conversion_level", dsla.get("level")),
        "queue_depth": metrics.get("dsla_queue_depth", dsla.get("queue_depth", vllm_gauge(metrics, "waiting"))),
        "running": metrics.get("dsla_running_sequences", vllm_gauge(metrics, "running")),
        "kv_bytes": metrics.get("dsla_kv_cache_bytes"),
        "state_bytes": metrics.get("dsla_state_bytes"),
        "seq_levels": [round(q["dsla_layers"] / n, 4) for q in dsla.get("sequences") or [] if "dsla_layers" in q],
    }


async def sample_loop(client: httpx.AsyncClient, t0: float, every_s: float, samples: list[dict]) -> None:
    """Poll /metrics and /v1/dsla until cancelled; a failed poll leaves its fields empty."""
    loop = asyncio.get_running_loop()
    while True:
        t, metrics, dsla = loop.time() - t0, {}, None
        with contextlib.suppress(httpx.HTTPError, ValueError):
            metrics = parse_metrics((await client.get("/metrics")).text)
        with contextlib.suppress(httpx.HTTPError, ValueError):
            r = await client.get("/v1/dsla")
            if r.status_code == 200:
                dsla = r.json()
        samples.append(compact_sample(t, metrics, dsla))
        await asyncio.sleep(every_s)


async def replay_async(
    url: str, trace: Trace, prompts: list[str], prompt_tokens: list[int], *, endpoint: str = "completions",
    concurrency: int = 16, timeout_s: float = 600.0, sample_every_s: float = 0.5, model: str | None = None,
) -> tuple[list[RequestRecord], list[dict], float]:  # fmt: skip
    """Replay the trace once; returns (records, samples, wall seconds). Stops by itself: a request
    still unfinished ``timeout_s`` after the last arrival is cancelled and recorded as such."""
    records = [
        RequestRecord(i, r.arrival_s, n, r.output_tokens)
        for i, (r, n) in enumerate(zip(trace.requests, prompt_tokens, strict=True))
    ]
    limits = httpx.Limits(max_connections=concurrency + 2, max_keepalive_connections=concurrency + 2)
    timeout = httpx.Timeout(timeout_s, connect=10.0)
    samples: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        loop = asyncio.get_running_loop()
        gate = asyncio.Semaphore(concurrency)
        t0 = loop.time()

        async def one(rec: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, t0 + rec.arrival_s - loop.time()))
            async with gate:
                await send(client, rec, request_body(endpoint, prompts[rec.index], rec.max_tokens, model), endpoint, t0)

        sampler = asyncio.create_task(sample_loop(client, t0, sample_every_s, samples))
        tasks = [asyncio.create_task(one(rec)) for rec in records]
        _, pending = await asyncio.wait(tasks, timeout=trace.duration_s + timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        wall = loop.time() - t0
    for rec in records:
        if rec.status == "pending":
            rec.status = "cancelled"
    return records, samples, wall


def pct(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "p50": None, "p95": None, "p99": None}
    a = np.asarray(values)
    return {"mean": float(a.mean())} | {f"p{q}": float(np.percentile(a, q)) for q in (50, 95, 99)}


def summarize(records: list[RequestRecord], wall_s: float, slo_ttft_s: float, slo_tpot_s: float) -> dict:
    """Latency percentiles over completed requests; throughput and SLO attainment over all of them
    (a failed request misses the SLO)."""
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    meets = [r for r in ok if r.ttft_s <= slo_ttft_s and (r.tpot_s is None or r.tpot_s <= slo_tpot_s)]
    e2e_per_token = [r.e2e_s / r.output_tokens for r in ok]
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "statuses": sorted({r.status for r in records if not r.ok}),
        "ttft_s": pct([r.ttft_s for r in ok]),
        "tpot_s": pct([r.tpot_s for r in ok if r.tpot_s is not None]),
        "e2e_s": pct([r.e2e_s for r in ok]),
        "e2e_per_output_token_s": pct(e2e_per_token),
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "wall_s": wall_s,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "slo": {"ttft_s": slo_ttft_s, "tpot_s": slo_tpot_s, "attainment": len(meets) / max(len(records), 1)},
    }


def series(samples: list[dict]) -> dict[str, list]:
    """Columns of the samples, for plots: t, level, queue_depth, running, kv_bytes, state_bytes."""
    keys = ("t", "level", "queue_depth", "running", "kv_bytes", "state_bytes")
    return {k: [smp.get(k) for smp in samples] for k in keys}


def level_shares(samples: list[dict]) -> dict[str, float]:
    """Share of sequence-time at each conversion level: every running sequence in every sample
    counts once at its own level; with no sequence ever sampled, the controller's level over time."""
    levels = [lv for smp in samples for lv in smp["seq_levels"]]
    if not levels:
        levels = [smp["level"] for smp in samples if smp["level"] is not None]
    if not levels:
        return {}
    values, counts = np.unique(np.round(levels, 4), return_counts=True)
    return {f"{v:g}": float(c / len(levels)) for v, c in zip(values, counts, strict=True)}


def read_quality(path: str | Path) -> dict[float, float]:
    """{level: perplexity} from quality.json of `dsla-serve eval quality` or `dsla-serve eval ppl --json`."""
    try:
        return read_ppl(path)
    except ProfileError as e:
        raise ReplayError(str(e)) from None


def quality_cost(shares: dict[str, float], ppl: dict[float, float] | None) -> dict | None:
    """Perplexity ratio to level 0 at each level used (linear between measured levels) and its
    sequence-time-weighted mean: the quality the replay paid for its speed."""
    if not ppl or 0.0 not in ppl or not shares:
        return None
    xs = sorted(ppl)
    ratios = {k: float(np.interp(float(k), xs, [ppl[x] for x in xs])) / ppl[0.0] for k in shares}
    mean = sum(shares[k] * r for k, r in ratios.items())
    return {"ppl_ratio_by_level": ratios, "weighted_ppl_ratio": mean, "ppl_levels_measured": xs}


def set_policy(url: str, policy: Policy) -> None:
    r = httpx.post(url + "/v1/dsla", json=policy.dsla_body(), timeout=30)
    if r.status_code != 200:
        raise ReplayError(f"POST /v1/dsla {policy.dsla_body()} answered {r.status_code}: {r.text[:300]}")


def served_model(url: str) -> str:
    r = httpx.get(url + "/v1/models", timeout=30)
    if r.status_code != 200 or not r.json().get("data"):
        raise ReplayError(f"GET /v1/models answered {r.status_code}: {r.text[:300]}")
    return r.json()["data"][0]["id"]


def warm_up(url: str, endpoint: str, model: str) -> None:
    """One short request first, so one-off start-up costs do not land on the replay's first request."""
    body = request_body(endpoint, "Hello", 2, model) | {"stream": False}
    body.pop("stream_options")
    r = httpx.post(url + ("/v1/chat/completions" if endpoint == "chat" else "/v1/completions"), json=body, timeout=300)
    if r.status_code != 200:
        raise ReplayError(f"warm-up request answered {r.status_code}: {r.text[:300]}")


def run_policy(
    policy: Policy | None, trace: Trace, prompts: list[str], prompt_tokens: list[int], *, url: str | None,
    serve_args: list[str], log_dir: Path, slo_ttft_s: float, slo_tpot_s: float, peer: VllmPeer | None = None, **kw,
) -> dict:  # fmt: skip
    """Replay under one policy: on the given server (policy set through /v1/dsla) or a fresh one.
    ``policy`` None leaves the server's own policy (its flags, or the state it is in); ``vllm``
    starts ``peer`` (a peer.VllmPeer) and records its versions and settings."""
    label = policy.label if policy else "server default"
    peer_info = None
    with contextlib.ExitStack() as stack:
        if policy is not None and policy.name == "vllm":
            if url is not None:
                raise ReplayError("the vllm policy needs its own server: drop --url and let the replay start it")
            if peer is None:
                raise ReplayError("the vllm policy needs peer settings (dsla_serve.bench.peer.VllmPeer)")
            server = stack.enter_context(peer.server(log_dir / "server-vllm.log"))
            url, peer_info = server.url, server.info
        elif policy is not None and policy.url is not None:
            url, peer_info = policy.url, {"url": policy.url}  # as it runs: its policy is its own
        elif url is None:
            log = log_dir / f"server-{label.replace(':', '-').replace(' ', '-')}.log"
            url = stack.enter_context(ManagedServer((policy.serve_args() if policy else []) + serve_args, log)).url
        elif policy is not None:
            set_policy(url, policy)
        kw["model"] = kw.get("model") or served_model(url)
        warm_up(url, kw.get("endpoint", "completions"), kw["model"])
        records, samples, wall = asyncio.run(replay_async(url, trace, prompts, prompt_tokens, **kw))
        controller = None if peer_info else controller_state(url)
    return {
        "policy": label,
        **({"peer": peer_info} if peer_info else {}),
        **({"controller": controller} if controller else {}),
        "summary": summarize(records, wall, slo_ttft_s, slo_tpot_s),
        "level_shares": level_shares(samples),
        "samples": samples,
        "records": [asdict(r) for r in records],
    }


def compare(
    policies: list[Policy | None], trace: Trace, prompts: list[str], prompt_tokens: list[int], *,
    ppl: dict[float, float] | None = None, **kw,
) -> dict:  # fmt: skip
    """Replay the same requests under each policy in turn; ratios against the first policy."""
    runs = [run_policy(p, trace, prompts, prompt_tokens, **kw) for p in policies]
    for key, name in (("e2e_s", "e2e_mean_speedup_vs_first"), ("e2e_per_output_token_s", "per_token_speedup_vs_first")):
        base = runs[0]["summary"][key]["mean"]
        for run in runs:
            mean = run["summary"][key]["mean"]
            run[name] = base / mean if base and mean else None
    for run in runs:
        run["quality"] = quality_cost(run["level_shares"], ppl)
    return {"runs": runs, "baseline": runs[0]["policy"]}


def controller_state(url: str) -> dict | None:
    """What the server's controller ran with (policy, profile, SLO targets, quality budget) and decided."""
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        c = httpx.get(url + "/v1/dsla", timeout=30).json()["controller"]
        keep = ("policy", "max_conversion", "quality_budget", "quality_level", "slo", "caps", "profile", "cooldown_s")
        return {k: c.get(k) for k in keep} | {"decisions": list(reversed(c.get("decisions") or []))}
    return None


def capacity(records: list[RequestRecord]) -> float:
    """Requests per second a server completed with every request sent at once: completed over the
    time of the last completion (the sampler's wind-down does not count)."""
    ok = [r for r in records if r.ok]
    if not ok:
        raise ReplayError(f"the capacity run completed no request: {sorted({r.status for r in records})}")
    return len(ok) / max(r.e2e_s for r in ok)


def scale_to_utilization(
    trace: Trace, prompts: list[str], prompt_tokens: list[int], utilization: float, **kw
) -> tuple[Trace, dict]:  # fmt: skip
    """The trace time-scaled so that its arrival rate is ``utilization`` times the all-attention
    server's capacity on these same requests (measured: all sent at once, the replay's concurrency).
    Near 1 a modest speed-up cuts latency most; far below or above it, speed matters less."""
    url = kw.get("url")
    before = httpx.get(url + "/v1/dsla", timeout=30).json() if url else None
    run = run_policy(Policy("off"), all_at_once(trace), prompts, prompt_tokens, **kw)
    if before is not None:  # a given server goes back to the policy it had
        level = before["level"] if before["policy"] == "static" else None
        set_policy(url, Policy(before["policy"], level))
    rps = capacity([RequestRecord(**r) for r in run["records"]])
    factor = utilization_scale(trace, rps, utilization)
    info = {"target": utilization, "capacity_requests_per_s": rps, "time_scale": factor, "capacity_run": run["summary"]}
    return scale_time(trace, factor), info
