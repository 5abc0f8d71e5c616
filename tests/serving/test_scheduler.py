"""The scheduler alone, no model: fake requests in, ``SchedulerOutput`` out, and a fake runner that
plays the engine's part (prefill advances ``num_computed``, decode appends a token, a request with
all its tokens is removed). Admission under the memory budget, chunked prefill beside decode,
expiry and abort."""

from __future__ import annotations

import pytest

from dsla_serve.serving.request import Request, RequestParams, Status
from dsla_serve.serving.scheduler import Scheduler, SchedulerConfig, SchedulerOutput

BYTES_PER_TOKEN = 100  # the fake cache: capacity x 100 bytes, whatever the plan


def fake_request(name: str, prompt: int, max_tokens: int = 4, arrival: float = 0.0, **params) -> Request:
    req = Request(name, list(range(prompt)), RequestParams(max_tokens=max_tokens, **params), lambda out: None)
    req.arrival = arrival
    return req


def scheduler(**config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), plan_size=lambda r: 0, bytes_for=lambda n, cap: cap * BYTES_PER_TOKEN)


class FakeRunner:
    """Applies a step the way the engine does, without tensors; records admission and completion order."""

    def __init__(self, sched: Scheduler):
        self.sched, self.admitted, self.finished, self.steps = sched, [], [], 0

    def step(self, now: float = 1.0) -> SchedulerOutput:
        out = self.sched.schedule(now)
        self.admitted += [r.id for r in out.admitted]
        for req in out.decode:
            self.token(req)
        for req, n in out.prefill:
            req.num_computed += n
            if req.prefilled:
                self.token(req)  # the prompt's last position gives the first token
        self.steps += 1
        return out

    def token(self, req: Request) -> None:
        req.output_ids.append(7)
        if len(req.output_ids) >= req.params.max_tokens:
            self.sched.remove(req)
            self.finished.append(req.id)

    def drain(self, limit: int = 200) -> None:
        while self.sched.running or self.sched.waiting:
            assert self.steps < limit, "the scheduler stopped making progress"
            self.step()


def test_admission_fits_the_memory_budget_first_come_first_served():
    s = scheduler(memory_budget=26 * BYTES_PER_TOKEN)  # room for two 12-token requests, not three
    a, b, c = (fake_request(n, 8) for n in "abc")
    small = fake_request("small", 1, max_tokens=1)  # 2 tokens: it fits beside a and b, but must not overtake c
    for r in (a, b, c, small):
        s.add(r)
    runner = FakeRunner(s)
    out = runner.step()
    assert [r.id for r in out.admitted] == ["a", "b"] and s.used == 24 * BYTES_PER_TOKEN
    assert [r.status for r in (c, small)] == [Status.WAITING, Status.WAITING]
    assert s.blocked_need == 12 * BYTES_PER_TOKEN and s.memory_pressure() == pytest.approx(36 / 26)
    runner.drain()
    assert runner.admitted == ["a", "b", "c", "small"] and set(runner.finished) == {"a", "b", "c", "small"}
    assert s.used == 0 and s.memory_pressure() == 0


def test_sequence_limit_holds_the_rest_in_the_queue():
    s = scheduler(max_num_seqs=2)
    for i in range(5):
        s.add(fake_request(f"r{i}", 4))
    out = FakeRunner(s).step()
    assert len(out.admitted) == 2 and len(s.running) == 2 and len(s.waiting) == 3
    assert s.waiting_tokens() == 12


def test_chunked_prefill_interleaves_with_decode():
    """A long prompt arriving while another sequence decodes is read prefill_chunk tokens per step, and
    the decoding sequence gets a token every step; with nobody decoding the idle chunk applies."""
    s = scheduler(prefill_chunk=16, idle_prefill_chunk=64)
    runner = FakeRunner(s)
    short = fake_request("short", 4, max_tokens=20)
    s.add(short)
    out = runner.step()
    assert out.prefill == [(short, 4)] and short.prefilled and len(short.output_ids) == 1
    long = fake_request("long", 100, max_tokens=2)
    s.add(long)
    chunks = []
    while not long.prefilled:
        before = len(short.output_ids)
        out = runner.step()
        assert out.decode == [short] and len(short.output_ids) == before + 1  # decode never stalls
        chunks += [n for r, n in out.prefill if r is long]
    assert chunks == [16] * 6 + [4]
    idle = scheduler(prefill_chunk=16, idle_prefill_chunk=64)
    alone = fake_request("alone", 150, max_tokens=1)
    idle.add(alone)
    runner, chunks = FakeRunner(idle), []
    while not alone.prefilled:
        chunks += [n for _, n in runner.step().prefill]
    assert chunks == [64, 64, 22]


def test_prefill_budget_is_shared_between_prompts():
    s = scheduler(prefill_chunk=10, idle_prefill_chunk=10)
    a, b = fake_request("a", 6), fake_request("b", 30)
    s.add(a)
    s.add(b)
    out = FakeRunner(s).step()
    assert out.prefill == [(a, 6), (b, 4)]  # one step never reads more than the budget


def test_prompt_logprob_requests_are_read_in_small_chunks():
    """Prompt logprobs materialise (chunk x vocab) logits: their chunks are capped at logprobs_chunk."""
    s = scheduler(idle_prefill_chunk=512, logprobs_chunk=32)
    scored = fake_request("scored", 100, max_tokens=0, prompt_logprobs=1)
    plain = fake_request("plain", 100)
    s.add(scored)
    s.add(plain)
    out = FakeRunner(s).step()
    assert out.prefill == [(scored, 32), (plain, 100)]


def test_requests_waiting_past_the_queue_timeout_expire_and_running_ones_do_not():
    s = scheduler(max_num_seqs=1, queue_timeout_s=10)
    first, second = fake_request("first", 4, max_tokens=50, arrival=0), fake_request("second", 4, arrival=5)
    s.add(first)
    s.add(second)
    runner = FakeRunner(s)
    assert runner.step(now=1).expired == []
    out = runner.step(now=12)  # first waited 12 s too, but it runs; second queued and waited 7 s
    assert out.expired == [] and first.status == Status.RUNNING
    out = runner.step(now=15.5)
    assert out.expired == [second] and not s.waiting and first in s.running


def test_abort_of_waiting_and_running_requests_frees_everything():
    s = scheduler(max_num_seqs=1)
    running, waiting = fake_request("running", 4, max_tokens=50), fake_request("waiting", 4)
    s.add(running)
    s.add(waiting)
    FakeRunner(s).step()
    assert s.used > 0
    s.remove(waiting)
    s.remove(running)
    assert running.status == waiting.status == Status.FINISHED
    assert not s.running and not s.waiting and s.used == 0
    assert FakeRunner(s).step().empty


def test_config_is_validated():
    with pytest.raises(ValueError, match="logprobs_chunk"):
        SchedulerConfig(logprobs_chunk=0)
    with pytest.raises(ValueError, match="queue_timeout_s"):
        SchedulerConfig(queue_timeout_s=0)
