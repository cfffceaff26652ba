"""Batched mode: the same tokens as batch 1, exact block accounting, prefix-cache reuse, live mode switches, overload."""

import random
import threading

import pytest
import torch

from engine import Controls, Engine, OverloadedError, Request, SamplingParams
from engine.batched import BatchedRunner
from engine.latency import LatencyRunner
from engine.model import Transformer
from engine.scheduler import BatchPolicy
from engine.sequence import Sequence, Stream
from tests.conftest import wait_until

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while working.",
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about the sea.",
    "List five fruits that are red.",
    "How many legs does a spider have?",
]
MAX_TOKENS = 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread. On the shared 2-core machine, two OpenMP threads under oversubscription wait for each
    other's scheduler slices (one fp32 GEMM went from 0.1 ms to 40 ms), which made this file take minutes."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def new_seq(ids: list[int], tokenizer, max_tokens: int, ignore_eos: bool = False) -> Sequence:
    request = Request(prompt_ids=ids, sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))
    return Sequence(Stream(request, None), ids, tokenizer)


def run_to_end(runner, seqs: list[Sequence], arrivals: list[int] | None = None) -> None:
    """Add seqs[i] before step arrivals[i] (all at once by default) and step until every one has finished."""
    arrivals = arrivals or [0] * len(seqs)
    pending = sorted(zip(arrivals, range(len(seqs))))
    step = 0
    while pending or runner.has_work():
        while pending and pending[0][0] <= step:
            runner.add(seqs[pending.pop(0)[1]])
        if runner.has_work():
            runner.step()
        step += 1


# ---- the real model, fp32, greedy: batched == batch 1 ---------------------------------------------------


@pytest.fixture(scope="module")
def prompts(default_model):
    return [default_model.tokenizer.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]


@pytest.fixture(scope="module")
def batch1_outputs(fp32_model, prompts, default_model):
    """The reference: each prompt alone through latency mode's batch-1 runner."""
    runner = LatencyRunner(fp32_model, 2048)
    outputs = []
    for ids in prompts:
        runner.clear_cache()
        seq = new_seq(ids, default_model.tokenizer, MAX_TOKENS)
        run_to_end(runner, [seq])
        outputs.append(seq.output_ids)
    return outputs


@pytest.mark.parametrize("chunked,token_budget,kv_tokens,block_size", [
    (True, 24, 4096, 16),  # prompts (37-40 tokens) are split into chunks that share steps with decodes
    (False, 24, 4096, 16),  # prompts run whole
    (True, 64, 88, 8),  # 11 blocks of 8 tokens for 6 sequences that each need 6: preemption by recompute
])
def test_greedy_batched_outputs_equal_batch1(fp32_model, prompts, batch1_outputs, default_model, chunked, token_budget,
                                               kv_tokens, block_size):
    rng = random.Random(len(prompts) + kv_tokens + chunked)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    runner = BatchedRunner(fp32_model, 2048, BatchPolicy(max_batch_size=6, token_budget=token_budget, chunked_prefill=chunked),
                           kv_cache_tokens=kv_tokens, block_size=block_size)
    seqs = [new_seq(prompts[i], default_model.tokenizer, MAX_TOKENS) for i in order]
    run_to_end(runner, seqs, arrivals=sorted(rng.randrange(6) for _ in seqs))
    assert [s.output_ids for s in seqs] == [batch1_outputs[i] for i in order]
    assert all(s.metrics.emissions[-1][2] == "batched" for s in seqs)
    if kv_tokens < 200:
        assert runner.scheduler.preemptions > 0
    assert runner.blocks.num_free == runner.blocks.num_blocks


# ---- a tiny random model where the real one is not needed ------------------------------------------------

def test_block_accounting_after_500_random_requests_with_cancellations(tiny):
    loaded, model = tiny
    rng = random.Random(1)
    runner = BatchedRunner(model, 512, BatchPolicy(max_batch_size=12, token_budget=48), kv_cache_tokens=640, block_size=8)
    bm, sched = runner.blocks, runner.scheduler
    shared = [rng.randrange(3, 500) for _ in range(20)]  # a common "system prompt" so prefix hits happen
    seqs = []
    while len(seqs) < 500 or runner.has_work():
        for _ in range(rng.choice([0, 0, 1, 2, 3]) if len(seqs) < 500 else 0):
            prefix = shared[:rng.randrange(21)] if rng.random() < 0.5 else []
            prompt = prefix + [rng.randrange(3, 500) for _ in range(rng.randrange(1, 60))]
            seqs.append(new_seq(prompt, loaded.tokenizer, rng.randrange(1, 40), ignore_eos=True))
            runner.add(seqs[-1])
        for s in rng.sample(seqs[-30:], k=min(2, len(seqs))):
            if rng.random() < 0.05:
                s.stream.cancel()
        if runner.has_work():
            runner.step()
        # every block is free or held, with a reference count equal to the number of tables holding it
        holders = [0] * bm.num_blocks
        for s in sched.running:
            for b in s.block_table:
                holders[b] += 1
        assert holders == bm.ref_count and set(bm.free) == {b for b in range(bm.num_blocks) if not holders[b]}
    assert bm.num_free == bm.num_blocks and not sched.running and not sched.waiting
    reasons = [s.metrics.finish_reason for s in seqs]
    assert set(reasons) == {"length", "cancelled"} and reasons.count("cancelled") >= 10
    assert all(len(s.output_ids) == s.params.max_tokens for s in seqs if s.metrics.finish_reason == "length")
    assert sched.preemptions > 0 and sched.cached_tokens > 0  # both paths were exercised


def test_prefix_cache_hit_reuses_blocks_and_gives_the_same_tokens(tiny):
    loaded, model = tiny
    system = list(range(100, 140))  # 40 tokens: 2 full blocks of 16 + 8
    a = new_seq(system + [7, 8, 9], loaded.tokenizer, 12, ignore_eos=True)
    b = new_seq(system + [10, 11], loaded.tokenizer, 12, ignore_eos=True)
    runner = BatchedRunner(model, 512, kv_cache_tokens=256)
    run_to_end(runner, [a])
    a_blocks = list(runner.blocks.cached.values())
    runner.add(b)
    runner.step()
    held = runner.scheduler.running[0].block_table
    assert held[:2] == a_blocks[:2] and runner.scheduler.cached_tokens == 32
    run_to_end(runner, [])
    # the same requests on a cold cache, and batch 1, give the same tokens
    for reference in (BatchedRunner(model, 512, kv_cache_tokens=256, prefix_caching=False), LatencyRunner(model, 512)):
        ref = new_seq(b.prompt_ids, loaded.tokenizer, 12, ignore_eos=True)
        run_to_end(reference, [ref])
        assert ref.output_ids == b.output_ids


class RaisesOn:
    """The model, except that a forward pass whose tokens include `token` raises (as a bad input would)."""

    def __init__(self, model: Transformer, token: int):
        self.model, self.token = model, token

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, tokens, positions, cache):
        if (tokens == self.token).any():
            raise RuntimeError("this input breaks the model")
        return self.model(tokens, positions, cache)


@pytest.mark.parametrize("where", [1, 2, 4])
def test_a_failed_step_fails_only_the_sequence_that_caused_it(tiny, where):
    """Five sequences share steps; one breaks the forward pass mid-prompt (its chunk arrives after the others have
    started decoding). It fails alone; the other four give exactly the tokens they give without it, and every
    block comes back."""
    loaded, model = tiny
    policy = BatchPolicy(max_batch_size=8, token_budget=16)
    prompts = [[5 + i, 6, 7, 8] for i in range(4)]
    clean = [new_seq(p, loaded.tokenizer, 12, ignore_eos=True) for p in prompts]
    run_to_end(BatchedRunner(model, 512, policy, kv_cache_tokens=512, block_size=8), clean)
    runner = BatchedRunner(RaisesOn(model, 9999), 512, policy, kv_cache_tokens=512, block_size=8)
    good = [new_seq(p, loaded.tokenizer, 12, ignore_eos=True) for p in prompts]
    bad = new_seq(list(range(100, 130)) + [9999] + list(range(130, 140)), loaded.tokenizer, 12, ignore_eos=True)
    seqs = good[:where] + [bad] + good[where:]
    run_to_end(runner, seqs)
    with pytest.raises(Exception, match="breaks the model"):
        list(bad.stream)
    assert bad.metrics.finish_reason == "error"
    assert [s.output_ids for s in good] == [s.output_ids for s in clean]
    assert [s.metrics.finish_reason for s in good] == ["length"] * 4
    assert runner.blocks.num_free == runner.blocks.num_blocks and not runner.scheduler.running
    # and it serves on: a new request after the failure runs normally
    after = new_seq(prompts[0], loaded.tokenizer, 12, ignore_eos=True)
    run_to_end(runner, [after])
    assert after.output_ids == clean[0].output_ids


def test_a_failed_step_in_latency_mode_leaves_the_cache_consistent(tiny):
    """Latency mode runs one sequence per step, so the failure is the head's own; the cache it half-wrote is dropped,
    and the next sequence gives the tokens it gives on a fresh runner."""
    loaded, model = tiny
    reference = new_seq([5, 6, 7, 8], loaded.tokenizer, 10, ignore_eos=True)
    run_to_end(LatencyRunner(model, 512), [reference])
    runner = LatencyRunner(RaisesOn(model, 9999), 512)
    first = new_seq([5, 6, 7, 8], loaded.tokenizer, 10, ignore_eos=True)
    bad = new_seq([5, 6, 7, 8, 9999], loaded.tokenizer, 10, ignore_eos=True)  # shares a prefix with `first`
    after = new_seq([5, 6, 7, 8], loaded.tokenizer, 10, ignore_eos=True)
    run_to_end(runner, [first, bad])
    assert bad.metrics.finish_reason == "error" and runner.cache.length == len(runner.cache.ids) == 0
    run_to_end(runner, [after])
    assert first.output_ids == after.output_ids == reference.output_ids
    assert runner.cache.ids == after.all_ids[:runner.cache.length]


# ---- the engine: live mode switches and overload ----------------------------------------------------------


def switch_modes_while_streaming(engine: Engine, prompts: list[list[int]], max_tokens: int, cycle: list[str],
                                 every: int) -> tuple[list[list[tuple[list[int], str]]], set[str]]:
    """Stream every prompt at once, switching to the next mode of `cycle` each time `every` more tokens have come
    out (so requests are mid-generation at every switch). Returns each stream's events (token ids, text) and the
    modes that emitted them."""
    streams = [engine.submit(Request(prompt_ids=ids, sampling=SamplingParams(max_tokens=max_tokens))) for ids in prompts]
    results = [[] for _ in streams]

    def read(i):
        results[i] += [(ev.token_ids, ev.text) for ev in streams[i]]

    readers = [threading.Thread(target=read, args=(i,)) for i in range(len(streams))]
    for r in readers:
        r.start()
    switched_at, switches = 0, 0
    while any(r.is_alive() for r in readers):
        emitted = sum(len(ids) for events in results for ids, _ in events)
        if emitted >= switched_at + every:
            engine.control(Controls(mode=cycle[switches % len(cycle)]))
            switched_at, switches = emitted, switches + 1
        threading.Event().wait(0.01)
    for r in readers:
        r.join()
    return results, {m for s in streams for _, _, m in s.metrics.emissions}


def test_mode_switch_under_load_loses_no_request_and_repeats_no_token(default_model, prompts, batch1_outputs):
    engine = Engine(default_model, dtype=torch.float32, quant="none")  # batch 1 with speculation, full fp32 weights
    try:
        results, modes = switch_modes_while_streaming(engine, prompts[:4], MAX_TOKENS, ["batched", "latency"], every=3)
        for i, events in enumerate(results):
            assert [t for ids, _ in events for t in ids] == batch1_outputs[i]
            assert "".join(text for _, text in events) == default_model.tokenizer.decode(batch1_outputs[i])
        assert modes == {"latency", "batched"}  # tokens really came from both modes
        after = engine.generate(Request(prompt_ids=prompts[0], sampling=SamplingParams(max_tokens=3)))
        assert after.token_ids == batch1_outputs[0][:3]
    finally:
        engine.close()


def test_overload_in_batched_mode_is_refused_and_the_engine_keeps_serving(default_model):
    engine = Engine(default_model, mode="batched", max_waiting=3, policy=BatchPolicy(max_batch_size=1))
    try:
        long = SamplingParams(max_tokens=500, ignore_eos=True)
        streams = [engine.submit(Request(prompt="Once upon a time", sampling=long))]
        wait_until(lambda: engine.snapshot().state.running == 1)  # the first one runs; with a batch of 1, the rest wait
        streams += [engine.submit(Request(prompt="Once upon a time", sampling=long)) for _ in range(3)]
        with pytest.raises(OverloadedError, match="overloaded: 3 requests already waiting"):
            engine.submit(Request(prompt="one too many"))
        assert engine.snapshot().stats.rejected == 1
        for s in streams:
            s.cancel()
            list(s)
        assert [s.metrics.finish_reason for s in streams] == ["cancelled"] * 4
        c = engine.generate(Request(prompt="Hi", sampling=SamplingParams(max_tokens=3, ignore_eos=True)))
        assert len(c.token_ids) == 3 and c.metrics.emissions[0][2] == "batched"
        # the stream ends before the worker has put the finished sequence away
        wait_until(lambda: engine.snapshot().state.running == 0)
        state = engine.snapshot().state
        assert state.mode == "batched" and state.kv.blocks_used == 0 and state.running == state.waiting == 0
    finally:
        engine.close()


def test_policy_changes_apply_to_the_running_engine(tiny_loaded):
    engine = Engine(tiny_loaded, mode="batched", quant="none", spec="off", policy=BatchPolicy(max_batch_size=2, token_budget=16))
    try:
        long = SamplingParams(max_tokens=4000, ignore_eos=True)  # outlasts the test
        streams = [engine.submit(Request(prompt_ids=[5, 6, 7, i], sampling=long)) for i in range(5)]

        def settles(running, waiting):
            state = lambda: engine.snapshot().state  # noqa: E731
            wait_until(lambda: (state().running, state().waiting) == (running, waiting), what=f"{running} running")

        settles(2, 3)
        engine.control(Controls(max_batch_size=4, chunked_prefill=False))
        settles(4, 1)
        assert engine._batched.scheduler.policy == BatchPolicy(max_batch_size=4, token_budget=16, chunked_prefill=False)
        with pytest.raises(ValueError, match="max_batch_size"):
            engine.control(Controls(mode="latency", max_batch_size=24))  # must stay below the token budget
        with pytest.raises(ValueError, match="max_batch_size must be int"):
            Controls(max_batch_size=True)  # a bool is not a batch size
        settles(4, 1)  # all or nothing: the refused control changed neither the policy nor the mode
        state = engine.snapshot().state
        assert (state.mode, state.max_batch_size, state.chunked_prefill) == ("batched", 4, False)
        for s in streams:
            s.cancel()
    finally:
        engine.close()


def test_cancelled_requests_leave_the_queue_bound_at_once(tiny_loaded):
    """A request cancelled while it waits stops counting against `max_waiting` the moment it is cancelled, not at the
    worker's next step: with the queue full, cancelling two makes room for two at once."""
    engine = Engine(tiny_loaded, mode="batched", quant="none", spec="off", max_waiting=2,
                    policy=BatchPolicy(max_batch_size=1, token_budget=16))
    try:
        long = SamplingParams(max_tokens=4000, ignore_eos=True)  # outlasts the test
        running = engine.submit(Request(prompt_ids=[5, 6, 7], sampling=long))
        wait_until(lambda: running.metrics.scheduled is not None, what="the first request to run")
        waiting = [engine.submit(Request(prompt_ids=[5, 6, i], sampling=long)) for i in (8, 9)]
        with pytest.raises(OverloadedError):
            engine.submit(Request(prompt_ids=[5, 6, 10], sampling=long))
        for s in waiting:
            s.cancel()
        again = [engine.submit(Request(prompt_ids=[5, 6, i], sampling=long)) for i in (11, 12)]  # no refusal
        assert engine.snapshot().stats.rejected == 1
        for s in [running, *again]:
            s.cancel()
    finally:
        engine.close()


def test_decodes_of_very_different_lengths_attend_in_groups_and_give_batch1s_tokens(tiny):
    """Short and long contexts decode in one step: on the CPU they attend in separate groups (engine/kv_cache.py
    width_groups), each padded only to its own longest, and every sequence still gets exactly its batch-1 tokens."""
    loaded, model = tiny
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(n)] for n in (5, 300, 9, 140, 6, 37)]
    reference = []
    for p in prompts:
        seq = new_seq(p, loaded.tokenizer, 10, ignore_eos=True)
        run_to_end(LatencyRunner(model, 512), [seq])
        reference.append(seq.output_ids)
    runner = BatchedRunner(model, 512, BatchPolicy(max_batch_size=8, token_budget=512), kv_cache_tokens=2048, block_size=8)
    seqs = [new_seq(p, loaded.tokenizer, 10, ignore_eos=True) for p in prompts]
    for s in seqs:
        runner.add(s)
    groups = []
    while runner.has_work():
        runner.step()
        groups.append(len(runner.cache._decode_groups))
    assert [s.output_ids for s in seqs] == reference
    assert max(groups) >= 3  # 1-2 blocks, 5 and 18, 38: three groups in the steps where all decode
