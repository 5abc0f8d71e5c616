"""The adaptive controller: signals that expire, hysteresis and cooldown, per-sequence levels from a
speed profile under SLO targets and a quality budget, per-request floors (engine and HTTP), reasons."""

from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from dsla_serve.serving.controller import (
    PAPER_CAPS,
    Controller,
    ControllerConfig,
    SeqLoad,
    SignalMeter,
    Signals,
    parse_caps,
)
from dsla_serve.serving.profile import Profile
from dsla_serve.serving.request import Request, RequestParams, Status
from dsla_serve.serving.scheduler import Scheduler, SchedulerConfig
from tests.serving.conftest import make_core, start_server, wait_until

BUSY = Signals(queue_depth=6)
CALM = Signals()
LEVELS = (0.0, 0.25, 0.5)


def synthetic_profile(prefill, decode, shared: float = 0.05, quality: dict | None = None) -> Profile:
    """prefill(level, tokens) -> s; decode(level, context) -> one sequence's own part of a step (s)."""
    pre = [{"level": lv, "tokens": n, "s": prefill(lv, n)} for lv in LEVELS for n in (1000, 4000)]
    dec = [{"level": lv, "context": c, "batch": 1, "s": shared + decode(lv, c)} for lv in LEVELS for c in (100, 8000)]
    dec += [{"level": lv, "context": 8000, "batch": 4, "s": shared + 4 * decode(lv, 8000)} for lv in LEVELS]
    return Profile(pre, dec, quality or {})


def dsla_pays(lv: float, n: int) -> float:  # conversion cuts prefill in proportion
    return n * 1e-3 * (1 - lv)


def dsla_costs(lv: float, n: int) -> float:  # conversion slows prefill down (short prompts on a small model)
    return n * 1e-3 * (1 + lv)


def own_decode(lv: float, c: int) -> float:  # decode gains at long context only; at 100 tokens DSLA is slower
    return 1e-5 * c * (1 - lv) if c > 100 else 1e-3 * (1 + lv)


QUALITY = {0.0: 1.0, 0.25: 1.1, 0.5: 1.5}


def adaptive(profile: Profile | None = None, **kw) -> Controller:
    cfg = ControllerConfig(**({"profile": profile, "max_conversion": 0.5, "cooldown_s": 0} | kw))
    return Controller(32, cfg)  # level 0: with a profile, each new sequence's level is the profile's choice


def test_paper_caps_preset_by_prompt_length():
    c = Controller(32, ControllerConfig(max_conversion=1.0, caps=parse_caps("paper")))
    c.level = 1.0
    assert [c.plan(n, 8) for n in (100, 2047, 2048, 4095, 4096, 8191, 8192, 30000)] == [4, 4, 8, 8, 12, 12, 16, 16]
    assert Controller(32, ControllerConfig()).config.active_caps == PAPER_CAPS  # no profile: the paper's caps
    assert adaptive(synthetic_profile(dsla_pays, own_decode)).config.active_caps == ()  # a profile decides instead
    c.set(policy="static", level=0.75)  # static and manual levels are what the operator asked for: no caps
    assert c.plan(100, 8) == 24


def test_steps_up_under_load_holds_for_the_cooldown_and_stops_at_the_ceiling():
    c = Controller(30, ControllerConfig(cooldown_s=10, max_conversion=0.25))
    d = c.update(BUSY, now=0)
    assert d is not None and (d.from_level, d.to_level, d.trigger) == (0.0, 0.125, "queue")
    assert "queue depth 6 >= 4" in d.reason and not d.convert_running  # a queue alone spares running sequences
    assert c.update(BUSY, now=5) is None  # cooldown
    assert c.update(BUSY, now=11).to_level == 0.25
    assert c.update(BUSY, now=30) is None  # at max_conversion


def test_hysteresis_goes_down_only_after_calm_for_a_whole_cooldown():
    c = Controller(30, ControllerConfig(cooldown_s=10))
    c.update(BUSY, now=0)
    assert c.update(Signals(queue_depth=2), now=20) is None  # between the thresholds: hold
    assert c.update(CALM, now=21) is None  # calm starts now
    assert c.update(Signals(queue_depth=1), now=25) is None  # not calm (queue_low=0): the clock restarts
    assert c.update(CALM, now=26) is None
    d = c.update(CALM, now=36.5)
    assert d is not None and (d.to_level, d.trigger, d.convert_running) == (0.0, "load_fell", False)
    assert c.update(CALM, now=100) is None  # already at 0
    assert [x["trigger"] for x in c.snapshot()["decisions"]] == ["load_fell", "queue"]


def seq(rid: str, prompt: int, computed: int | None = None, made: int = 0, max_tokens: int = 10) -> Request:
    """A request as the engine holds it; ``computed`` prompt tokens read (default: all)."""
    r = Request(rid, [1] * prompt, RequestParams(max_tokens=max_tokens), lambda out: None)
    r.status, r.num_computed, r.output_ids = Status.RUNNING, prompt if computed is None else computed, [2] * made
    return r


def scheduler(**kw) -> Scheduler:
    return Scheduler(SchedulerConfig(**kw), lambda r: 0, lambda count, capacity: 1000)


def test_a_stale_high_latency_expires_and_the_level_steps_down():
    meter, sched = SignalMeter(window_s=5), scheduler()
    sched.running.append(seq("a", 20))
    c = Controller(32, ControllerConfig(cooldown_s=10, caps=()))
    meter.record_step(0.0, decode_s=0.4, prefill_s=0.0, prefill_tokens=0)  # one slow decode step
    s = meter.signals(0.1, sched)
    assert (s.decode_s, s.step_s, s.decoding) == (0.4, 0.4, 1)
    d = c.update(s, 0.1, [SeqLoad("a", 20, 20, 10, 0, 0)])
    assert (d.trigger, d.convert_running, d.targets) == ("latency", True, {"a": 4}) and "400 ms" in d.reason
    # no decode since: the value expires, even though the sequence is still running ...
    s = meter.signals(11.0, sched)
    assert s.decode_s is None and s.step_s is None
    assert c.update(s, 11.0, [SeqLoad("a", 20, 20, 10, 0, 4)]) is None  # ... so nothing converts again
    d = c.update(meter.signals(21.5, sched), 21.5)
    assert d is not None and (d.trigger, d.from_level, d.to_level) == ("load_fell", 0.125, 0.0)
    assert "no recent decode" in d.reason
    sched.running.clear()
    meter.record_step(22.0, decode_s=0.4, prefill_s=0.0, prefill_tokens=0)
    assert meter.signals(22.1, sched).decode_s is None  # no latency signal while nothing decodes


def test_prefill_interference_raises_the_level_for_new_sequences_only():
    meter, sched = SignalMeter(window_s=5), scheduler()
    sched.running.append(seq("a", 20))
    meter.record_step(1.0, decode_s=0.05, prefill_s=0.5, prefill_tokens=512)  # someone's prompt chunk in the step
    s = meter.signals(1.0, sched)
    assert s.decode_s == 0.05 and s.step_s == pytest.approx(0.55) and s.prefill_tps == pytest.approx(1024)
    d = Controller(32, ControllerConfig(cooldown_s=0)).update(s, 1.0, [SeqLoad("a", 20, 20, 10, 0, 0)])
    assert d.trigger == "interference" and "decode alone 50 ms" in d.reason
    assert not d.convert_running and d.targets == {}  # folding the decoders would not shorten others' prompts


def test_queue_head_wait_is_measured_and_predicted():
    meter, sched = SignalMeter(window_s=5), scheduler(max_num_seqs=1)
    sched.running.append(seq("a", 20, max_tokens=10))  # 10 tokens to go before it frees the only slot
    head = seq("b", 100, computed=0)
    head.status = Status.WAITING
    sched.waiting = deque([head])
    now = head.arrival + 3.0
    meter.record_step(now - 0.1, decode_s=0.1, prefill_s=0.0, prefill_tokens=0)
    meter.record_step(now - 0.1, decode_s=None, prefill_s=0.5, prefill_tokens=200)  # prefill at 400 tokens/s
    s = meter.signals(now, sched)
    assert s.queue_wait_s == pytest.approx(3.0)
    assert s.head_ttft_s == pytest.approx(3.0 + 10 * 0.1 + 100 / 400)  # waited + until a slot + its prompt
    c = Controller(32, ControllerConfig(cooldown_s=0, ttft_target_s=4.0))
    d = c.update(s, now)
    assert d.trigger == "wait" and "queue head's predicted time to first token" in d.reason


def test_profile_picks_the_lowest_level_that_meets_the_slos():
    c = adaptive(synthetic_profile(dsla_pays, own_decode))
    assert c.plan(1000, 100) == 0  # 1 s to first token at level 0 already meets the 2 s target
    assert c.plan(3000, 100) == 12  # 3 s at 0, 2.25 s at 0.25, 1.875 s at 0.375: the lowest that meets it
    assert "lowest level predicted to meet" in c.last_plan[1]
    assert c.plan(3000, 100, request_max=0.0) == 0  # the request's own floor wins
    assert c.level == 0.0 and c.snapshot()["layers_for_new_sequences"] == 16  # planned up to the top, not the level
    no_profile = adaptive()
    assert no_profile.plan(3000, 100) == 0  # without a profile the load-driven level is the ceiling
    no_profile.level = 0.25
    assert no_profile.plan(3000, 100) == 8
    c.set(policy="static", level=0.25)
    assert c.plan(3000, 100) == 8 and c.snapshot()["layers_for_new_sequences"] == 8  # static: the level, profile or not


def test_quality_budget_bounds_the_profile_choice():
    c = adaptive(synthetic_profile(dsla_pays, own_decode, quality=QUALITY), quality_budget=1.2)
    assert c.quality_level == 0.25 and c.top == 0.25  # 0.375 would cost a 1.3x perplexity ratio
    assert c.plan(3000, 100) == 8  # none meets the SLO within budget: the nearest, at the budget's level
    assert "no level under 0.25" in c.last_plan[1]


def test_under_load_with_requests_queued_behind_the_fastest_service_wins_unless_dsla_is_slower():
    c = adaptive(synthetic_profile(dsla_pays, own_decode))
    assert c.plan(1000, 100, behind=2) == 0  # calm (level 0): the lowest level that meets the SLOs
    assert "lowest level predicted to meet" in c.last_plan[1]
    c.level = 0.125  # a load signal raised it
    assert c.plan(1000, 100, behind=2) == 16  # its service time is what the queue waits for
    assert "under load, 2 queued behind it" in c.last_plan[1]
    assert c.plan(1000, 100) == 0  # nobody behind it: the SLOs decide, at any load
    slow = adaptive(synthetic_profile(dsla_costs, own_decode))
    slow.level = 0.5
    assert slow.plan(1000, 10, behind=2) == 0  # conversion would only slow it down


def test_measured_speed_scales_the_prediction():
    c = adaptive(synthetic_profile(dsla_pays, own_decode))
    running = [SeqLoad("a", 900, 1000, 50, 0, 0)]
    profiled = c.profile.step_s([(0.0, 1000)])
    c.update(Signals(decode_s=profiled), now=0, running=running)  # as fast as profiled
    assert c.speed == pytest.approx(1.0) and c.plan(900, 100) == 0  # 0.9 s prefill + 2 chunks of decode steps
    c.update(Signals(decode_s=2 * profiled), now=1, running=running)  # the machine runs 2x slower now
    assert c.speed == pytest.approx(2.0) and c.plan(900, 100) == 4


def test_decode_pressure_folds_only_sequences_whose_decode_gets_faster():
    c = Controller(32, ControllerConfig(profile=synthetic_profile(dsla_pays, own_decode), cooldown_s=0))
    running = [SeqLoad("long", 7000, 8000, 50, 0, 0), SeqLoad("short", 90, 100, 50, 0, 0)]
    d = c.update(Signals(decode_s=0.5, decoding=2), now=0, running=running)
    assert d.trigger == "latency" and d.to_level == 0.5  # with a profile, the ceiling rises to the top at once
    assert d.targets == {"long": 16}  # at 100 tokens DSLA decodes slower: that one keeps its KV cache


def test_decision_targets_honour_each_requests_max_level():
    c = Controller(8, ControllerConfig(caps=(), max_conversion=1.0, step=0.5, cooldown_s=0))
    running = [SeqLoad("a", 100, 120, 10, 0, 0), SeqLoad("b", 100, 120, 10, 0, 0, 0.25), SeqLoad("c", 100, 120, 10, 0, 0, 0.0)]  # fmt: skip
    d = c.update(Signals(memory_pressure=0.9), now=0, running=running)
    assert (d.trigger, d.to_level, d.targets) == ("memory", 0.5, {"a": 4, "b": 2})
    d = c.set(level=1.0, convert_running=True, running=running)
    assert (d.policy, d.targets) == ("static", {"a": 8, "b": 2})
    assert c.plan(100, 8, request_max=0.25) == 2 and c.max_level_for(100, 0.0) == 0.0


def test_static_and_off_ignore_signals_and_validation():
    assert Controller(30, ControllerConfig(policy="static", conversion=0.5)).update(BUSY, now=0) is None
    c = Controller(30, ControllerConfig(policy="off"))
    assert c.update(BUSY, now=0) is None and c.plan(9000, 8) == 0
    for kw, msg in (({"policy": "sometimes"}, "policy"), ({"level": 1.5}, "level"), ({"policy": "off", "level": 0.5}, "'off'")):  # fmt: skip
        with pytest.raises(ValueError, match=msg):
            c.set(**kw)
    for kw, msg in (({"queue_low": 5, "queue_high": 4}, "hysteresis"), ({"quality_budget": 0.9}, "quality_budget")):
        with pytest.raises(ValueError, match=msg):
            ControllerConfig(**kw)


def test_parse_caps():
    assert parse_caps("2048:0.125,inf:0.5") == ((2048.0, 0.125), (float("inf"), 0.5))
    assert (parse_caps("paper"), parse_caps("none"), parse_caps("auto")) == (PAPER_CAPS, (), None)
    for bad in ("2048-0.1", "4096:0.2,2048:0.1,inf:0.5", "2048:0.1", "inf:1.5"):
        with pytest.raises(ValueError):
            parse_caps(bad)


def test_engine_honours_per_request_floors_when_folding_running_sequences(tokenizer):
    core = make_core(tokenizer, ctrl={"policy": "static", "conversion": 0.0})
    outs: list[list] = [[], [], []]
    floors = (1.0, 0.5, 0.0)
    reqs = [Request(f"r{i}", list(range(10, 40)), RequestParams(max_tokens=6, ignore_eos=True, dsla_max_level=m),
                    outs[i].append) for i, m in enumerate(floors)]  # fmt: skip
    for r in reqs:
        core.add(r)
    core.step()
    assert [r.status for r in reqs] == [Status.RUNNING] * 3  # one batch
    d = core.control("static", 1.0, convert_running=True)
    assert d.targets == {"r0": 4, "r1": 2} and [r.dsla_count for r in reqs] == [4, 2, 0]
    while core.step():
        pass
    assert [o[-1].dsla_layers for o in outs] == [4, 2, 0] and [o[-1].completion_tokens for o in outs] == [6] * 3


def test_server_reports_mixed_floors_in_one_batch(tokenizer):
    floors = (None, 0.5, 0.0)
    with start_server(tokenizer, ctrl={"policy": "static", "conversion": 1.0}) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        gate = threading.Event()
        server.engine.post(lambda: gate.wait(30))  # hold the engine thread so all three join one step

        def ask(floor: float | None):
            extra = {"dsla": {"max_level": floor}} if floor is not None else None
            return client.completions.create(model="tiny-llama", prompt="The sea was calm", max_tokens=4,
                                             temperature=0, extra_body=extra)  # fmt: skip

        with ThreadPoolExecutor(3) as pool:
            futures = [pool.submit(ask, f) for f in floors]
            wait_until(lambda: server.engine.queued() == 3, what="three requests queued")
            gate.set()
            answers = [f.result() for f in futures]
        reports = [a.choices[0].model_extra["dsla"] for a in answers]
        assert [r["dsla_layers"] for r in reports] == [4, 2, 0]
        assert [r["max_level"] for r in reports] == [1.0, 0.5, 0.0] and reports[1]["level"] == 0.5
        chat = client.chat.completions.create(model="tiny-llama", messages=[{"role": "user", "content": "Hi"}],
                                              max_tokens=2, extra_body={"dsla": {"max_level": 0.25}})  # fmt: skip
        assert chat.choices[0].model_extra["dsla"] == {"dsla_layers": 1, "level": 0.25, "max_level": 0.25}
        with pytest.raises(openai.BadRequestError, match=r"dsla\.max_level"):
            client.completions.create(
                model="tiny-llama", prompt="x", max_tokens=1, extra_body={"dsla": {"max_level": 2}}
            )


def test_engine_plans_each_new_sequence_from_the_profile(tokenizer):
    slow_prefill = synthetic_profile(lambda lv, n: n * 0.1 * (1 - lv), own_decode)  # 500 tokens: 50 s at level 0
    core = make_core(tokenizer, ctrl={"policy": "adaptive", "profile": slow_prefill, "cooldown_s": 60})
    outs: list[list] = [[], []]
    short = Request("short", list(range(10, 20)), RequestParams(max_tokens=8, ignore_eos=True), outs[0].append)
    core.add(short)
    core.step()
    assert core.controller.level == 0.0 and short.dsla_count == 0  # 1 s to its first token at level 0 meets 2 s
    long = Request("long", list(range(10, 510)), RequestParams(max_tokens=4, ignore_eos=True), outs[1].append)
    core.add(long)
    core.step()
    assert long.dsla_count == 2  # no level meets 2 s: the nearest is the most conversion allowed (0.5 of 4 layers)
    assert "no level under 0.5" in core.snapshot()["controller"]["last_plan"]["reason"]
    while core.step():
        pass
    assert [o[-1].finish_reason for o in outs] == ["length", "length"] and 0.2 <= core.controller.speed <= 5
