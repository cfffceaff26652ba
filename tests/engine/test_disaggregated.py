"""Disaggregated mode: the same tokens as batch 1, exact block accounting on both workers with cancellations during
the hand-off, workers killed mid-stream, start-up failures, and live switches between all three modes."""

import multiprocessing
import os
import random
import signal
import threading

import pytest
import torch

import engine.disaggregated as disaggregated
from engine import Controls, Engine, EngineError, Request, SamplingParams
from engine.backend import ControlError
from engine.disaggregated import DisaggregatedRunner
from engine.kv_cache import width_groups
from engine.latency import LatencyRunner
from engine.scheduler import BatchPolicy
from tests.conftest import wait_until
from tests.engine.test_batched import MAX_TOKENS, QUESTIONS, new_seq, run_to_end, switch_modes_while_streaming

LONG = SamplingParams(max_tokens=100_000, ignore_eos=True)


@pytest.mark.parametrize("kv_tokens,block_size", [
    (4096, 16),  # room for all: prompts of 37-45 tokens, not multiples of the block size
    (120, 8),  # 15 blocks of 8 for sequences that need 6 each: decode-side preemption, prefilled again
])
def test_greedy_disaggregated_outputs_equal_batch1(default_model, fp32_model, kv_tokens, block_size):
    """Every question twice, in random order and at random steps: the second asking of each, and every question
    after the first (the chat template's system prompt), finds its prefix in the prefill worker's cache."""
    tok = default_model.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    reference = LatencyRunner(fp32_model, 2048)
    expected = []
    for ids in prompts:
        reference.clear_cache()
        seq = new_seq(ids, tok, MAX_TOKENS)
        run_to_end(reference, [seq])
        expected.append(seq.output_ids)
    rng = random.Random(kv_tokens)
    order = [i for i in range(len(prompts)) for _ in range(2)]
    rng.shuffle(order)
    runner = DisaggregatedRunner(fp32_model, 2048, BatchPolicy(max_batch_size=6, token_budget=24), kv_tokens, block_size)
    try:
        seqs = [new_seq(prompts[i], tok, MAX_TOKENS) for i in order]
        run_to_end(runner, seqs, arrivals=sorted(rng.randrange(40) for _ in seqs))  # steps of the coordinator: the
        # workers run meanwhile, so arrivals fall at random points of their work
        assert [s.output_ids for s in seqs] == [expected[i] for i in order]
        assert all(m == "disaggregated" for s in seqs for _, _, m in s.metrics.emissions)
        assert runner.cached_tokens > 0 and any(s.metrics.cached_tokens for s in seqs)
        assert all(s.metrics.handoff_bytes > 0 and s.metrics.handoff_s is not None for s in seqs)
        if kv_tokens < 200:
            assert runner.preemptions > 0
        assert runner.handoffs.count == len(seqs) + runner.preemptions
        assert runner.decode_blocks.num_free == runner.decode_blocks.num_blocks
        assert runner.prefill_blocks.num_free == runner.prefill_blocks.num_blocks
    finally:
        runner.close()


def test_block_accounting_on_both_workers_after_300_random_requests_with_cancellations(tiny):
    tiny_loaded, tiny_model = tiny
    rng = random.Random(3)
    runner = DisaggregatedRunner(tiny_model, 512, BatchPolicy(max_batch_size=10, token_budget=32), 480, 8)
    pb, db = runner.prefill_blocks, runner.decode_blocks
    shared = [rng.randrange(3, 500) for _ in range(20)]  # a common "system prompt" so prefix hits happen
    seqs, in_transit_cancels = [], 0

    def adding() -> bool:  # 300 requests, and more while fewer than 5 were caught in transit (that depends on timing)
        return len(seqs) < 300 or (in_transit_cancels < 5 and len(seqs) < 3000)

    try:
        while adding() or runner.has_work():
            for _ in range(rng.choice([0, 0, 1, 2]) if adding() else 0):
                prefix = shared[:rng.randrange(21)] if rng.random() < 0.5 else []
                prompt = prefix + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 50))]
                seqs.append(new_seq(prompt, tiny_loaded.tokenizer, rng.randrange(1, 30), ignore_eos=True))
                runner.add(seqs[-1])
            transit = runner.workers["prefill"].job
            if transit is not None and rng.random() < 0.1:  # cancelled while its k/v is being computed and copied
                transit.seq.seq.stream.cancel()
                in_transit_cancels += 1
            for s in rng.sample(seqs[-20:], k=min(2, len(seqs))):
                if rng.random() < 0.03:
                    s.stream.cancel()
            runner.step()
            # every block is free or held, as often as tables hold it: decoding sequences and the one in transit
            transit = runner.workers["prefill"].job
            decode_holders, prefill_holders = [0] * db.num_blocks, [0] * pb.num_blocks
            for table in [s.block_table for s in runner.decoding] + ([transit.seq.block_table] if transit else []):
                for b in table:
                    decode_holders[b] += 1
            for b in transit.prefill_table if transit else []:
                prefill_holders[b] += 1
            assert decode_holders == db.ref_count and prefill_holders == pb.ref_count
            assert set(db.free) == {b for b in range(db.num_blocks) if not decode_holders[b]}
        assert db.num_free == db.num_blocks and pb.num_free == pb.num_blocks and not runner.decoding
        reasons = [s.metrics.finish_reason for s in seqs]
        assert set(reasons) == {"length", "cancelled"} and in_transit_cancels >= 5
        assert all(len(s.output_ids) == s.params.max_tokens for s in seqs if s.metrics.finish_reason == "length")
        assert runner.preemptions > 0 and runner.cached_tokens > 0  # both paths were exercised
        # a request cancelled while it waits ends at the next step, wherever it is in the queue
        a, b, c = (new_seq([5, 6, 7 + i], tiny_loaded.tokenizer, 4, ignore_eos=True) for i in range(3))
        for seq in (a, b, c):
            runner.add(seq)
        c.stream.cancel()
        runner.step()
        assert c.metrics.finish_reason == "cancelled" and [s.seq for s in runner.waiting] == [b]
        run_to_end(runner, [])
    finally:
        runner.close()


def worker_pid(engine: Engine, role: str) -> int:
    return engine._disaggregated.workers[role].process.pid


def children() -> set[int]:
    return {p.pid for p in multiprocessing.active_children()}


def test_a_killed_worker_fails_its_requests_and_the_engine_serves_the_next(default_model):
    """Prefill worker killed while a long prompt is on it: that request fails with an error naming it, and the users
    decoding meanwhile go on. Decode worker killed: every decoding stream ends with an error naming it. Each time a
    new worker serves the next request, and closing the engine leaves no process and no engine thread behind."""
    before, threads_before = children(), set(threading.enumerate())  # (other tests' engines may still run)
    engine = Engine(default_model, mode="disaggregated", spec="off", kv_cache_tokens=8192)
    try:
        users = [engine.submit(Request(prompt_ids=[1, 2, 3, 4 + i], sampling=LONG)) for i in range(3)]
        wait_until(lambda: all(u.metrics.output_tokens >= 2 for u in users))
        long = engine.submit(Request(prompt_ids=[7] * 1500, sampling=SamplingParams(max_tokens=4)))
        wait_until(lambda: engine.snapshot().state.workers.in_transit == 1 and long.metrics.scheduled is not None)
        for restarts, (role, victims, survivors) in enumerate([("prefill", [long], users), ("decode", users, [])], 1):
            old = worker_pid(engine, role)
            os.kill(old, signal.SIGKILL)
            wait_until(lambda victims=victims: all(v.metrics.finish_reason is not None for v in victims),
                       what="the victims' streams to end")
            for v in victims:
                with pytest.raises(EngineError, match=f"the {role} worker \\(pid {old}\\) died"):
                    list(v)
                assert v.metrics.finish_reason == "error"
            counts = [u.metrics.output_tokens for u in survivors]
            went_on = list(zip(survivors, counts))
            wait_until(lambda went_on=went_on: all(u.metrics.output_tokens >= n + 3 for u, n in went_on))  # decoding went on
            assert all(u.metrics.finish_reason is None for u in survivors)
            after = engine.generate(Request(prompt_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=5, ignore_eos=True)))
            assert len(after.token_ids) == 5 and after.finish_reason == "length"
            state = engine.snapshot().state
            assert state.mode == "disaggregated" and state.workers.restarts == restarts and worker_pid(engine, role) != old
    finally:
        engine.close()
    assert children() <= before
    assert not [t for t in threading.enumerate() if t.name == "engine" and t.is_alive() and t not in threads_before]


def test_a_worker_that_dies_while_starting_again_makes_the_engine_fall_back_to_batched_mode(default_model):
    engine = Engine(default_model, mode="disaggregated", spec="off", kv_cache_tokens=8192)
    try:
        decoding = engine.submit(Request(prompt_ids=[1, 2, 3], sampling=LONG))
        wait_until(lambda: decoding.metrics.output_tokens >= 2)
        os.kill(worker_pid(engine, "decode"), signal.SIGKILL)
        wait_until(lambda: engine.snapshot().state.workers.restarts == 1)
        os.kill(worker_pid(engine, "decode"), signal.SIGKILL)  # the new one is still importing torch
        wait_until(lambda: engine.snapshot().state.mode == "batched", what="the fall-back to batched mode")
        assert "disaggregated mode stopped" in engine.snapshot().state.note and "while starting" in engine.snapshot().state.note
        assert decoding.metrics.finish_reason == "error"
        with pytest.raises(EngineError, match="decode worker"):
            list(decoding)
        after = engine.generate(Request(prompt_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=3, ignore_eos=True)))
        assert len(after.token_ids) == 3 and {m for _, _, m in after.metrics.emissions} == {"batched"}
    finally:
        engine.close()


def test_without_shared_memory_disaggregated_mode_is_refused_clearly_and_the_other_modes_work(default_model, monkeypatch):
    def no_shm(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(disaggregated, "share", no_shm)
    with pytest.raises(ControlError, match="disaggregated mode cannot start: .*shared memory.*No space left"):
        Engine(default_model, mode="disaggregated", spec="off")
    engine = Engine(default_model, spec="off")
    try:
        with pytest.raises(ControlError, match="shared memory"):
            engine.control(Controls(mode="disaggregated"))
        assert engine.snapshot().state.mode == "latency"
        engine.control(Controls(mode="batched"))
        assert len(engine.generate(Request(prompt_ids=[5, 6, 7], sampling=SamplingParams(max_tokens=3))).token_ids) >= 1
    finally:
        engine.close()


def test_mode_switches_between_all_three_modes_under_load_lose_and_repeat_nothing(default_model):
    tok = default_model.tokenizer
    prompts = [tok.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS[:4]]
    engine = Engine(default_model, dtype=torch.float32, quant="none", spec="off")
    try:
        expected = [engine.generate(Request(prompt_ids=ids, sampling=SamplingParams(max_tokens=24))).token_ids
                    for ids in prompts]
        cycle = ["batched", "disaggregated", "latency"]
        results, modes = switch_modes_while_streaming(engine, prompts, 24, cycle, every=4)
        for i, events in enumerate(results):
            assert [t for ids, _ in events for t in ids] == expected[i]
            assert "".join(text for _, text in events) == tok.decode(expected[i])
        assert modes == {"latency", "batched", "disaggregated"}  # tokens really came from all three
    finally:
        engine.close()


def test_width_groups_bound_the_padding_of_each_group():
    assert width_groups([3, 4, 3, 5]) == [[0, 2, 1, 3]]  # similar lengths: one group, as before
    groups = width_groups([30, 4, 120, 5, 28, 40])
    assert groups == [[1, 3], [4, 0, 5], [2]]
    assert sorted(j for g in groups for j in g) == list(range(6))
