"""The adaptive controller: caps by prompt length, hysteresis, cooldown, stepping back down, reasons."""

from __future__ import annotations

import pytest

from dsla_serve.serving.controller import Controller, ControllerConfig, Signals, parse_caps

BUSY = Signals(queue_depth=6)
CALM = Signals()


def test_paper_caps_by_prompt_length():
    c = Controller(32, ControllerConfig(max_conversion=1.0))
    c.level = 1.0
    assert [c.layers_for(n) for n in (100, 2047, 2048, 4095, 4096, 8191, 8192, 30000)] == [4, 4, 8, 8, 12, 12, 16, 16]
    c.set(policy="static", level=0.75)  # static and manual levels are what the operator asked for: no caps
    assert c.layers_for(100) == 24


def test_steps_up_under_load_holds_for_the_cooldown_and_stops_at_the_ceiling():
    c = Controller(30, ControllerConfig(cooldown_s=10, max_conversion=0.25))
    d = c.update(BUSY, now=0)
    assert d is not None and (d.from_level, d.to_level, d.trigger) == (0.0, 0.125, "queue")
    assert "queue depth 6 >= 4" in d.reason and not d.convert_running  # a queue alone spares running sequences
    assert c.update(BUSY, now=5) is None  # cooldown
    assert c.update(BUSY, now=11).to_level == 0.25
    assert c.update(BUSY, now=30) is None  # at max_conversion


def test_memory_or_latency_pressure_converts_running_sequences():
    c = Controller(30, ControllerConfig(cooldown_s=0))
    assert c.update(Signals(memory_pressure=0.9), now=0).convert_running
    d = c.update(Signals(tpot_s=0.4), now=1)
    assert d.trigger == "latency" and d.convert_running and "400 ms" in d.reason


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


def test_static_and_off_ignore_signals_and_validation():
    assert Controller(30, ControllerConfig(policy="static", conversion=0.5)).update(BUSY, now=0) is None
    c = Controller(30, ControllerConfig(policy="off"))
    assert c.update(BUSY, now=0) is None and c.layers_for(9000) == 0
    with pytest.raises(ValueError, match="policy"):
        c.set(policy="sometimes")
    with pytest.raises(ValueError, match="level"):
        c.set(level=1.5)
    with pytest.raises(ValueError, match="'off'"):
        c.set(policy="off", level=0.5)
    with pytest.raises(ValueError, match="hysteresis"):
        ControllerConfig(queue_low=5, queue_high=4)


def test_parse_caps():
    assert parse_caps("2048:0.125,inf:0.5") == ((2048.0, 0.125), (float("inf"), 0.5))
    for bad in ("2048-0.1", "4096:0.2,2048:0.1,inf:0.5", "2048:0.1", "inf:1.5"):
        with pytest.raises(ValueError):
            parse_caps(bad)
