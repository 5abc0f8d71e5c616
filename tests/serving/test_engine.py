"""The engine without HTTP: continuous batching with mixed plans, in-flight folding, cancellation, budget."""

from __future__ import annotations

import pytest
import torch

from dsla_serve.serving.request import Output, Request, RequestParams, Status
from tests.serving.conftest import make_core, tiny_hybrid


def submit(core, prompt: str, max_tokens: int = 12, **params) -> tuple[Request, list[Output]]:
    outs: list[Output] = []
    ids = core.tokenizer(prompt, add_special_tokens=False).input_ids
    req = Request(f"r{len(core.scheduler.running) + len(core.scheduler.waiting)}-{prompt[:8]}", ids,
                  RequestParams(max_tokens=max_tokens, ignore_eos=True, **params), outs.append)  # fmt: skip
    core.add(req)
    return req, outs


def run(core, *reqs: Request, limit: int = 500) -> None:
    for _ in range(limit):
        if all(r.status == Status.FINISHED for r in reqs):
            return
        core.step()
    raise AssertionError("requests did not finish")


def text(outs: list[Output]) -> str:
    return "".join(o.text for o in outs)


def greedy(tokenizer, ids: list[int], plan: list[int], n: int) -> list[int]:
    """Reference: n greedy tokens by full forwards of a fresh copy of the model (no cache at all)."""
    hybrid, _ = tiny_hybrid(tokenizer)
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = hybrid(torch.tensor([ids]), dsla_layers=plan)
            ids.append(int(logits[0, -1].argmax()))
    return ids[-n:]


def test_batch_mixes_plans_and_each_sequence_matches_its_own_plan(tokenizer):
    core = make_core(tokenizer, ctrl={"policy": "static", "conversion": 0.0})
    a, a_out = submit(core, "The lighthouse keeper wrote a letter about the storm")
    core.step()  # a is admitted with no DSLA layers and prefilled
    core.control(level=0.5)  # new sequences: the first two layers of the order [3, 2, 1, 0]
    b, b_out = submit(core, "Wind and rain over the harbour all night long, said the")
    core.step()
    assert (a.dsla_count, b.dsla_count) == (0, 2)
    assert a.status == b.status == Status.RUNNING  # one decode batch holds both plans
    run(core, a, b)
    assert a.output_ids == greedy(tokenizer, a.prompt_ids, [], 12)
    assert b.output_ids == greedy(tokenizer, b.prompt_ids, [3, 2], 12)
    assert text(a_out) == tokenizer.decode(a.output_ids)
    assert a_out[-1].completion_tokens == b_out[-1].completion_tokens == 12


def test_in_flight_fold_continues_as_if_the_layer_had_been_dsla_from_the_start(tokenizer):
    """Folding the last layer's KV cache (order[0] = 3) mid-generation is exact: no re-prefill, and the
    continuation equals a sequence that read prompt + tokens so far with layer 3 as DSLA."""
    core = make_core(tokenizer, ctrl={"policy": "static", "conversion": 0.0})
    prompt = "Boats returned to the harbour when the weather turned and the"
    a, outs = submit(core, prompt, max_tokens=16)
    for _ in range(6):
        core.step()
    assert a.dsla_count == 0 and len(a.output_ids) >= 3
    before = list(a.output_ids)
    core.control(level=0.25, convert_running=True)
    assert a.dsla_count == 1 and core.conversions == 1
    assert a.cache.kv_bytes() < core.runner.cache_bytes(0, a.capacity)  # the KV cache of layer 3 is gone
    run(core, a)
    assert before == greedy(tokenizer, a.prompt_ids, [], len(before))
    assert a.output_ids[len(before) :] == greedy(tokenizer, a.prompt_ids + before, [3], 16 - len(before))
    assert len(outs) and outs[-1].completion_tokens == 16


def test_abort_frees_the_sequence_and_its_cache(tokenizer):
    core = make_core(tokenizer)
    a, _ = submit(core, "A long story about the sea", max_tokens=100)
    b, b_out = submit(core, "Another story", max_tokens=5)
    core.step()
    assert core.scheduler.used > 0
    core.abort(a)
    assert a.status == Status.FINISHED and a.cache is None and a not in core.scheduler.running
    run(core, b)
    assert b_out[-1].finish_reason == "length" and core.scheduler.used == 0


def test_memory_budget_admits_what_fits_and_queues_the_rest(tokenizer):
    probe = make_core(tokenizer)
    one = probe.runner.cache_bytes(0, 40)
    core = make_core(tokenizer, sched={"memory_budget": one + one // 2})
    reqs = [submit(core, "the sea and the wind and", max_tokens=40 - 6) for _ in range(3)]
    assert all(r.capacity == 40 for r, _ in reqs)
    core.step()
    assert [r.status for r, _ in reqs] == [Status.RUNNING, Status.WAITING, Status.WAITING]
    assert core.scheduler.memory_pressure() >= 1  # the blocked head counts as pressure
    run(core, *(r for r, _ in reqs))
    assert all(outs[-1].finish_reason == "length" for _, outs in reqs)


def test_prompt_over_context_and_over_budget_are_rejected_with_what_to_change(tokenizer):
    from dsla_serve.serving.request import EngineError

    core = make_core(tokenizer, sched={"memory_budget": 10_000})
    with pytest.raises(EngineError, match="exceed the model's context") as e:
        core.check(1000, RequestParams(max_tokens=100))
    assert e.value.status == 400
    with pytest.raises(EngineError, match="memory budget"):
        core.check(100, RequestParams(max_tokens=100))


def test_adaptive_policy_converts_under_a_queue_and_back_when_it_drains(tokenizer):
    core = make_core(tokenizer, sched={"max_num_seqs": 1}, ctrl={
        "policy": "adaptive", "caps": ((float("inf"), 0.5),), "step": 0.25, "queue_high": 2, "cooldown_s": 0,
        "tpot_target_s": None})  # fmt: skip
    reqs = [submit(core, f"request {i} about the sea", max_tokens=4)[0] for i in range(4)]
    run(core, *reqs)
    assert reqs[0].dsla_count >= 1  # four waiting at the first step boundary: the level rose before admission
    for _ in range(5):
        core.step()  # idle and calm: the level steps back down
    assert core.controller.level == 0.0
    triggers = [d["trigger"] for d in core.snapshot()["controller"]["decisions"]]
    assert "queue" in triggers and triggers[0] == "load_fell"


def test_memory_pressure_folds_running_sequences_and_admits_the_blocked_one(tokenizer):
    """Adaptive policy under memory pressure: the level rises with convert_running, the running
    sequence's KV caches are folded (its reservation shrinks), and the queued request then fits."""
    probe = make_core(tokenizer)
    one = probe.runner.cache_bytes(0, 40)
    core = make_core(tokenizer, sched={"memory_budget": int(one * 1.6)}, ctrl={
        "policy": "adaptive", "caps": ((float("inf"), 1.0),), "max_conversion": 1.0, "step": 0.25,
        "cooldown_s": 0, "tpot_target_s": None})  # fmt: skip
    a, a_out = submit(core, "the sea and the wind and", max_tokens=40 - 6)
    b, b_out = submit(core, "the sea and the wind and", max_tokens=40 - 6)
    core.step()
    assert a.status == Status.RUNNING and b.status == Status.WAITING
    reserved = a.reserved
    for _ in range(10):
        if b.status == Status.RUNNING:
            break
        core.step()
    assert a.status == b.status == Status.RUNNING  # b got in while a still runs: a's folding made room
    assert a.dsla_count >= 1 and a.reserved < reserved and core.conversions >= 1
    memory = [d for d in core.controller.decisions if d.trigger == "memory"]
    assert memory and all(d.convert_running for d in memory) and "memory pressure" in memory[0].reason
    run(core, a, b)
    assert a_out[-1].finish_reason == b_out[-1].finish_reason == "length"
    assert a_out[-1].completion_tokens == b_out[-1].completion_tokens == 34 and core.scheduler.used == 0


def test_serving_benchmark_rows(tokenizer):
    """``dsla-serve bench serving``'s measurement on the tiny model: half the layers as DSLA hold about
    half the per-sequence cache (the states are small next to a 96-token KV cache)."""
    from dsla_serve.serving.loadtest import run_level

    hybrid, info = tiny_hybrid(tokenizer)
    prompts = [tokenizer("the sea " * 48, add_special_tokens=False).input_ids[:96]] * 2
    rows = [run_level(hybrid, tokenizer, info, level, prompts, decode_tokens=3) for level in (0.0, 0.5)]
    assert [r["decode_steps"] for r in rows] == [3, 3] and all(r["decode_tokens_per_s"] > 0 for r in rows)
    assert rows[0]["cache_bytes_per_seq"] == rows[0]["reserved_bytes_per_seq"] > 0
    assert 0.5 <= rows[1]["cache_bytes_per_seq"] / rows[0]["cache_bytes_per_seq"] < 0.6


def test_shutdown_past_its_drain_timeout_fails_what_is_left_instead_of_hanging(tokenizer):
    import asyncio

    from dsla_serve.serving.engine import AsyncEngine

    async def scenario() -> Output:
        engine = AsyncEngine(make_core(tokenizer))
        engine.start()
        ids = tokenizer("an endless tale", add_special_tokens=False).input_ids
        job = engine.submit([ids], RequestParams(max_tokens=900, ignore_eos=True))
        while not engine.snapshot().running:
            await asyncio.sleep(0.01)
        await engine.shutdown(timeout_s=0.2)
        assert not engine.alive
        out = await asyncio.wait_for(job.next(), 5)
        while out.error is None and out.finish_reason is None:
            out = await asyncio.wait_for(job.next(), 5)
        return out

    out = asyncio.run(scenario())
    assert out.error is not None and out.error.status == 503 and out.error.retry_after


def test_prompt_logprobs_are_read_in_small_chunks_and_equal_a_full_forward(tokenizer):
    """Scoring a 100-token prompt with logprobs_chunk=32: four prefill steps, each materialising logits
    for at most 32 positions, and the entries equal the log-softmax of one full forward."""
    core = make_core(tokenizer, sched={"logprobs_chunk": 32, "idle_prefill_chunk": 2048})
    ids = torch.randint(0, 5000, (100,), generator=torch.Generator().manual_seed(0)).tolist()
    outs: list[Output] = []
    req = Request("scored", ids, RequestParams(max_tokens=0, prompt_logprobs=1), outs.append)
    core.add(req)
    chunks = []
    while req.status != Status.FINISHED:
        before = req.num_computed
        core.step()
        chunks.append(req.num_computed - before)
    assert chunks == [32, 32, 32, 4]
    entries = outs[-1].prompt_logprobs
    hybrid, _ = tiny_hybrid(tokenizer)
    with torch.no_grad():
        logits, _ = hybrid(torch.tensor([ids]), dsla_layers=[])
    want = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert entries[0].logprob is None and [e.token_id for e in entries] == ids
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries[1:]], dtype=torch.float64), want, atol=1e-4,
                               rtol=1e-4)  # fmt: skip
