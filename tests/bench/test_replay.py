"""Trace replay: summaries and quality cost on known records, then a tiny trace replayed over loopback
HTTP against a real server: the tiny random model in-thread (library API, ``replay --url``), and
``replay --compare`` starting ``dsla-serve serve`` subprocesses itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from transformers import AutoTokenizer

from dsla_serve.bench import report
from dsla_serve.bench.prompts import PromptBuilder, load_text
from dsla_serve.bench.replay import (
    ManagedServer,
    Policy,
    ReplayError,
    RequestRecord,
    capacity,
    compact_sample,
    compare,
    level_shares,
    parse_metrics,
    quality_cost,
    read_quality,
    summarize,
)
from dsla_serve.bench.trace import Trace, TraceError, TraceRequest, scale_time, utilization_scale
from dsla_serve.model.loader import resolve
from tests.serving.conftest import start_server


def test_policy_parsing():
    assert Policy.parse("off").serve_args() == ["--policy", "off"]
    assert Policy.parse("static:0.25").serve_args() == ["--policy", "static", "--conversion", "0.25"]
    assert Policy.parse("static:0.5").dsla_body() == {"policy": "static", "level": 0.5}
    assert Policy.parse("adaptive").dsla_body() == {"policy": "adaptive", "level": 0.0}
    peer = Policy.parse("url:vllm-gpu=http://10.0.0.2:8000/")  # a server already running elsewhere
    assert (peer.label, peer.url) == ("vllm-gpu", "http://10.0.0.2:8000")
    for bad, msg in (("static", "needs a level"), ("static:2", r"\[0, 1\]"), ("fast", "unknown policy"),
                     ("url:x=ftp://h", "url:LABEL=http")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            Policy.parse(bad)


def record(i: int, ttft: float, e2e: float, tokens: int, status: str = "ok") -> RequestRecord:
    tpot = (e2e - ttft) / (tokens - 1) if status == "ok" and tokens > 1 else None
    return RequestRecord(i, float(i), 10, tokens, None, 0.0, ttft, e2e, tokens, tpot, status)


def test_summarize_counts_failures_against_the_slo():
    recs = [
        record(0, 0.5, 2.5, 5),
        record(1, 1.0, 9.0, 5),
        record(2, 3.0, 4.0, 2),
        record(3, 0, 0, 0, "http 429: busy"),
    ]
    s = summarize(recs, wall_s=10.0, slo_ttft_s=1.0, slo_tpot_s=1.0)
    assert (s["completed"], s["failed"], s["statuses"]) == (3, 1, ["http 429: busy"])
    assert s["ttft_s"]["mean"] == pytest.approx(1.5) and s["ttft_s"]["p50"] == pytest.approx(1.0)
    assert s["e2e_s"]["mean"] == pytest.approx((2.5 + 9.0 + 4.0) / 3)
    assert s["tpot_s"]["mean"] == pytest.approx((0.5 + 2.0 + 1.0) / 3)
    # only request 0 meets both (request 1: TPOT 2 s; request 2: TTFT 3 s; request 3 failed) -> 1 of 4
    assert s["slo"]["attainment"] == pytest.approx(0.25)
    assert s["output_tokens"] == 12 and s["output_tokens_per_s"] == pytest.approx(1.2)


def test_target_utilization_scale_from_a_servers_measured_throughput():
    # a capacity run: 4 requests sent at once, the last done after 8 s (one failed: it does not count)
    recs = [record(i, 0.5, e2e, 4) for i, e2e in enumerate((2.0, 4.0, 6.0, 8.0))] + [record(4, 0, 0, 0, "http 500")]
    rps = capacity(recs)
    assert rps == pytest.approx(0.5)
    trace = Trace([TraceRequest(t, 100, 10) for t in (0.0, 2.0, 5.0, 7.0, 10.0)], "test")  # 0.4 requests/s
    factor = utilization_scale(trace, rps, 0.5)  # to arrive at half the capacity: 0.25 requests/s
    assert factor == pytest.approx(1.6)
    assert scale_time(trace, factor).stats()["rate_per_s"] == pytest.approx(0.25)
    with pytest.raises(TraceError, match="two requests"):
        utilization_scale(Trace([TraceRequest(0.0, 100, 10)], "one"), rps, 0.5)
    with pytest.raises(ReplayError, match="no request"):
        capacity([record(0, 0, 0, 0, "http 500")])


def test_level_shares_and_quality_cost():
    samples = [compact_sample(0.0, {"dsla_conversion_level": 0.5}, None)]
    assert level_shares(samples) == {"0.5": 1.0}  # no sequence seen: the controller's level
    n30 = [{}] * 30
    dsla = {"layers": n30, "sequences": [{"dsla_layers": 15}, {"dsla_layers": 0}, {"dsla_layers": 15}]}
    samples.append(compact_sample(0.5, {}, dsla))
    assert level_shares(samples) == {"0": pytest.approx(1 / 3), "0.5": pytest.approx(2 / 3)}
    q = quality_cost(level_shares(samples), {0.0: 10.0, 0.25: 11.0, 1.0: 20.0})
    assert q["ppl_ratio_by_level"]["0.5"] == pytest.approx(1.4)  # between 0.25 (1.1x) and 1.0 (2.0x)
    assert q["weighted_ppl_ratio"] == pytest.approx(1 / 3 + 2 / 3 * 1.4)
    assert quality_cost({"0.5": 1.0}, None) is None


def test_replay_targets_judge_the_load_the_run_was_scaled_to():
    fast = {
        "e2e_mean_speedup_vs_first": 3.1,
        "per_token_speedup_vs_first": 2.4,
        "quality": {"weighted_ppl_ratio": 1.07},
    }
    assert report.replay_targets(fast, 0.9).endswith("at a perplexity ratio of 1.07 — met.")
    assert report.replay_targets(fast, report.HIGH_LOAD).endswith("— met.")  # the high-load target from here up
    costly = fast | {"quality": {"weighted_ppl_ratio": 1.2}}
    assert report.replay_targets(costly, 0.9).endswith("— NOT met.")  # the gain must stay within the perplexity bound
    unmeasured = fast | {"quality": None}
    assert report.replay_targets(unmeasured, 0.9).endswith("— NOT met.")  # no perplexity, no claim
    one_sided = fast | {"per_token_speedup_vs_first": 1.6}
    assert report.replay_targets(one_sided, 0.9).endswith("— NOT met.")  # both latencies must gain 2.3x
    calm = {"e2e_mean_speedup_vs_first": 0.96, "per_token_speedup_vs_first": 1.01, "quality": None}
    assert "no slower than 0.95×" in report.replay_targets(calm, 0.3)
    assert report.replay_targets(calm, 0.3).endswith("— met.")
    assert report.replay_targets(calm, 0.59).endswith("— met.")  # below HIGH_LOAD: the low-load target
    slower = calm | {"e2e_mean_speedup_vs_first": 0.9}
    assert report.replay_targets(slower, 0.3).endswith("— NOT met.")  # more than 5 % slower than all-attention
    by_hand = report.replay_targets(fast, None)  # --time-scale: the load it stands for is not known
    assert "not judged" in by_hand and "met" not in by_hand.replace("not judged", "")


def test_parse_metrics_keeps_gauges_and_counters():
    r = CollectorRegistry()
    Gauge("dsla_queue_depth", "q", registry=r).set(3)
    Counter("dsla_requests", "n", ["outcome"], registry=r).labels("ok").inc(7)
    Histogram("lat", "l", registry=r).observe(0.5)
    text = generate_latest(r).decode()
    assert parse_metrics(text) == {"dsla_queue_depth": 3.0, "dsla_requests_total{outcome=ok}": 7.0}


def test_server_that_fails_to_start_is_reported(tmp_path):
    with (
        pytest.raises(ReplayError, match="exited with 2") as e,
        ManagedServer(["--policy", "sometimes"], tmp_path / "s.log"),
    ):
        pass
    assert "policy" in str(e.value)  # the server's own message comes along


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve(None)[0])


@pytest.fixture(scope="module")
def server(tok):
    with start_server(tok, sched={"max_num_seqs": 4}) as s:
        yield s


@pytest.fixture(scope="module")
def tiny_trace(tok):
    reqs = [TraceRequest(0.0, 40, 4), TraceRequest(0.2, 90, 6), TraceRequest(0.3, 25, 3)]
    trace = Trace(reqs, "test")
    builder = PromptBuilder(tok, load_text(), seed=0)
    built = [builder.build(r.prompt_tokens, i) for i, r in enumerate(reqs)]
    return trace, [p for p, _ in built], [n for _, n in built]


def test_replay_against_real_server_under_two_policies(server, tiny_trace, tmp_path):
    trace, prompts, counts = tiny_trace
    result = compare(
        [Policy.parse("off"), Policy.parse("static:0.5")], trace, prompts, counts, url=server.url, serve_args=[],
        log_dir=tmp_path, slo_ttft_s=60.0, slo_tpot_s=60.0, concurrency=2, timeout_s=120, sample_every_s=0.1,
    )  # fmt: skip
    for run, level in zip(result["runs"], (0.0, 0.5), strict=True):
        recs = run["records"]
        assert [r["status"] for r in recs] == ["ok"] * 3, recs
        assert [r["output_tokens"] for r in recs] == [4, 6, 3]  # ignore_eos: lengths follow the trace
        assert [r["server_prompt_tokens"] for r in recs] == counts == [40, 90, 25]
        for r in recs:
            assert 0 < r["ttft_s"] <= r["e2e_s"] and r["tpot_s"] > 0 and r["sent_s"] >= r["arrival_s"]
        s = run["summary"]
        assert s["completed"] == 3 and s["slo"]["attainment"] == 1.0 and s["output_tokens"] == 13
        levels = {smp["level"] for smp in run["samples"]}
        assert levels == {level}  # the policy was switched through POST /v1/dsla before the replay
        assert set(run["level_shares"]) <= {f"{level:g}"}
    assert result["baseline"] == "off" and result["runs"][0]["e2e_mean_speedup_vs_first"] == 1.0
    assert result["runs"][0]["per_token_speedup_vs_first"] == 1.0
    assert result["runs"][1]["controller"]["policy"] == "static"  # what the server ran with, and its decisions
    assert result["runs"][1]["controller"]["decisions"][-1]["trigger"] == "manual"
    result |= {"trace": trace.describe(), "machine": {"cpu": "x", "cores": 2, "torch_threads": 2, "torch": "t",
               "platform": "p"}, "settings": {"endpoint": "completions", "concurrency": 2, "prompt_text": "shipped",
               "slo_ttft_s": 60.0, "slo_tpot_s": 60.0}}  # fmt: skip
    md = report.write_replay(result, tmp_path / "report")
    text = md.read_text()
    assert "| off | static:0.5 |" in text and "SLO attainment | 100 % | 100 %" in text
    assert "per output token (end-to-end ÷ tokens) p99 (ms)" in text
    for png in ("latency_cdf.png", "timeline.png"):
        assert (tmp_path / "report" / png).stat().st_size > 5000
    assert json.loads((tmp_path / "report" / "replay.json").read_text())["runs"][1]["policy"] == "static:0.5"


def test_replay_command_on_a_synthetic_trace(server, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "dsla_serve.cli", "replay", "--synthetic", "3", "--rate", "5", "--arrival", "bursty",
         "--max-prompt", "48", "--max-output", "3", "--url", server.url, "--out", str(out), "--json",
         "--save-trace", str(tmp_path / "t.csv"), "--target-utilization", "0.5"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)["server default"]
    assert summary["completed"] == 3 and summary["output_tokens"] <= 9
    assert (out / "REPLAY.md").is_file() and (out / "latency_cdf.png").is_file()
    saved = json.loads((out / "replay.json").read_text())
    load = saved["settings"]["utilization"]  # the capacity run, then the trace scaled to half of it
    assert load["capacity_run"]["completed"] == 3 and load["capacity_requests_per_s"] > 0
    assert saved["trace"]["rate_per_s"] == pytest.approx(0.5 * load["capacity_requests_per_s"])
    assert "utilisation 0.5" in (out / "REPLAY.md").read_text()
    assert (tmp_path / "t.csv").read_text().startswith("TIMESTAMP,ContextTokens,GeneratedTokens")
    (out / "REPLAY.md").unlink()
    again = subprocess.run([sys.executable, "-m", "dsla_serve.cli", "replay", "--render", "--out", str(out)],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    rendered = (out / "REPLAY.md").read_text()  # from replay.json alone: the load paragraph and the runs
    assert again.returncode == 0 and "time-scaled ×" in rendered and "| completed / failed | 3 / 0 |" in rendered
    assert json.loads((out / "replay.json").read_text()) == saved
    (tmp_path / "bad").mkdir()
    for content in (None, "{not json", '{"runs": []}'):  # missing, malformed, not a replay's
        if content is not None:
            (tmp_path / "bad" / "replay.json").write_text(content)
        bad_render = subprocess.run(
            [sys.executable, "-m", "dsla_serve.cli", "replay", "--render", "--out", str(tmp_path / "bad")],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert bad_render.returncode == 2 and "--render needs a replay.json" in bad_render.stderr, content
    mixed = subprocess.run([sys.executable, "-m", "dsla_serve.cli", "replay", "--render", "--synthetic", "3",
                            "--out", str(out)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert mixed.returncode == 2 and "--render replays nothing" in mixed.stderr
    bad = subprocess.run([sys.executable, "-m", "dsla_serve.cli", "replay", "--trace", str(tmp_path / "t.csv"),
                          "--synthetic", "3"], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "either --trace FILE or --synthetic N" in bad.stderr


def test_read_quality_takes_eval_quality_and_eval_ppl_json(tmp_path):
    rows = [{"conversion": 0.0, "ppl": 10.0}, {"conversion": 0.5, "ppl": 12.0}]
    (tmp_path / "quality.json").write_text(json.dumps({"ppl_dsla": rows, "ppl_gla": [], "levels": [0.0, 0.5]}))
    (tmp_path / "ppl.json").write_text(json.dumps({"levels": rows}))
    for name in ("quality.json", "ppl.json"):
        assert read_quality(tmp_path / name) == {0.0: 10.0, 0.5: 12.0}
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ReplayError, match=r"bad\.json: expected quality\.json"):
        read_quality(tmp_path / "bad.json")


def test_replay_compare_starts_a_server_per_policy(tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    quality = tmp_path / "quality.json"
    quality.write_text(json.dumps({"ppl_dsla": [{"conversion": 0.0, "ppl": 10.0}, {"conversion": 1.0, "ppl": 15.0}]}))
    proc = subprocess.run(
        [sys.executable, "-m", "dsla_serve.cli", "replay", "--synthetic", "2", "--rate", "10", "--max-prompt", "24",
         "--max-output", "2", "--compare", "off,static:1", "--model", str(tiny_model_dir), "--serve-arg=--weights=none", "--quality", str(quality),
         "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    summaries = json.loads(proc.stdout)
    assert [summaries[p]["completed"] for p in ("off", "static:1")] == [2, 2]
    assert summaries["static:1"]["level_shares"] == {"1": 1.0}
    saved = json.loads((out / "replay.json").read_text())
    assert saved["runs"][1]["quality"]["weighted_ppl_ratio"] == pytest.approx(1.5)
    assert "| off | static:1 |" in (out / "REPLAY.md").read_text()
    assert {p.name for p in out.glob("server-*.log")} == {"server-off.log", "server-static-1.log"}
