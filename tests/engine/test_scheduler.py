"""The batched-mode scheduler, driven without a model: budgets, chunking, batch size, preemption, cancellation."""

import pytest

from engine.block_manager import BlockManager
from engine.sampling import SamplingParams
from engine.scheduler import BatchPolicy, Scheduler
from engine.sequence import EngineError, Request, Sequence, Stream


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model.tokenizer


def make_seq(tokenizer, n_prompt: int, max_tokens: int, first: int = 1000) -> Sequence:
    ids = list(range(first, first + n_prompt))
    request = Request(prompt_ids=ids, sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    return Sequence(Stream(request, None), ids, tokenizer)


def step(sched: Scheduler) -> list[tuple]:
    """What the batched runner does around the forward pass, with token 7 as every sampled token."""
    batch = sched.schedule()
    sched.advance(batch)
    for s, _ in batch:
        if s.num_computed == s.num_tokens:
            s.seq.append([7], "batched")
    sched.remove_finished()
    return [(s.seq, n) for s, n in batch]


def check_blocks(sched: Scheduler) -> None:
    """Every block is either free or held, and its reference count is the number of tables holding it."""
    bm = sched.blocks
    holders = [0] * bm.num_blocks
    for s in sched.running:
        for b in s.block_table:
            holders[b] += 1
    assert all(not s.block_table for s in sched.waiting)
    assert holders == bm.ref_count
    assert set(bm.free) == {b for b in range(bm.num_blocks) if holders[b] == 0}


def test_decodes_go_first_and_a_long_prompt_is_chunked_to_the_budget(tokenizer):
    sched = Scheduler(BlockManager(64, 4), 1024, BatchPolicy(max_batch_size=8, token_budget=10))
    decoders = [make_seq(tokenizer, 3, 40, first=1000 + 10 * i) for i in range(3)]
    for s in decoders:
        sched.add(s)
    assert step(sched) == [(s, 3) for s in decoders]  # 9 prompt tokens fit the budget of 10
    long = make_seq(tokenizer, 30, 5, first=5000)
    sched.add(long)
    chunks = []
    while not long.output_ids:
        batch = step(sched)
        assert sum(n for _, n in batch) <= 10
        assert batch[:3] == [(s, 1) for s in decoders]  # every decoder advances in every step, first
        chunks += [n for s, n in batch if s is long]
        check_blocks(sched)
    assert chunks == [7, 7, 7, 7, 2]


def test_without_chunking_a_prompt_runs_whole_in_one_step_with_the_decodes(tokenizer):
    sched = Scheduler(BlockManager(64, 4), 1024, BatchPolicy(max_batch_size=8, token_budget=10, chunked_prefill=False))
    decoders = [make_seq(tokenizer, 3, 40, first=1000 + 10 * i) for i in range(3)]
    for s in decoders:
        sched.add(s)
    step(sched)
    long, short = make_seq(tokenizer, 30, 5, first=5000), make_seq(tokenizer, 4, 5, first=6000)
    sched.add(long)
    sched.add(short)
    # the unsplit prompt overruns the budget as the step's one prefill; the next prompt waits a step
    assert step(sched) == [(s, 1) for s in decoders] + [(long, 30)]
    assert step(sched) == [(s, 1) for s in decoders] + [(long, 1), (short, 4)]


def test_max_batch_size_caps_the_running_set_and_changes_live(tokenizer):
    sched = Scheduler(BlockManager(64, 4), 1024, BatchPolicy(max_batch_size=3, token_budget=32))
    seqs = [make_seq(tokenizer, 2, 50, first=1000 + 10 * i) for i in range(8)]
    for s in seqs:
        sched.add(s)
    step(sched)
    assert len(sched.running) == 3 and len(sched.waiting) == 5
    sched.policy = BatchPolicy(max_batch_size=5, token_budget=32)
    step(sched)
    assert len(sched.running) == 5 and [s.seq for s in sched.running] == seqs[:5]
    with pytest.raises(ValueError, match="max_batch_size"):
        BatchPolicy(max_batch_size=32, token_budget=32)


def test_out_of_blocks_preempts_the_newest_and_requeues_it_first(tokenizer):
    sched = Scheduler(BlockManager(6, 4), 1024, BatchPolicy(max_batch_size=8, token_budget=64))
    seqs = [make_seq(tokenizer, 8, 6, first=1000 + 100 * i) for i in range(3)]  # 2 blocks each: all 6 in use
    for s in seqs:
        sched.add(s)
    step(sched)
    assert sched.blocks.num_free == 0 and sched.preemptions == 0
    seqs.append(make_seq(tokenizer, 4, 6, first=2000))  # waits: no block is free
    sched.add(seqs[3])
    # the first decode of each needs a third block: the newest is preempted to make room for the oldest,
    # and goes back ahead of the sequence that was already waiting
    batch = step(sched)
    assert sched.preemptions == 1 and [s.seq for s in sched.waiting] == [seqs[2], seqs[3]]
    assert [s for s, _ in batch] == seqs[:2]
    check_blocks(sched)
    while sched.has_work():
        step(sched)
        check_blocks(sched)
    # a preempted sequence resumes from its tokens: each finishes with its full output exactly once
    assert [len(s.output_ids) for s in seqs] == [6, 6, 6, 6]
    assert all(s.metrics.finish_reason == "length" for s in seqs)
    assert sched.blocks.num_free == 6


def test_cancelling_frees_blocks_at_the_next_step(tokenizer):
    sched = Scheduler(BlockManager(16, 4), 1024, BatchPolicy())
    a, b = make_seq(tokenizer, 10, 50), make_seq(tokenizer, 10, 50, first=3000)
    sched.add(a)
    sched.add(b)
    step(sched)
    used = sched.blocks.num_used
    a.stream.cancel()
    batch = step(sched)
    assert [s for s, _ in batch] == [b]
    assert a.finished and a.metrics.finish_reason == "cancelled"
    assert sched.blocks.num_used == used - 3 and len(sched.running) == 1


def test_a_sequence_the_cache_can_never_hold_fails_with_a_clear_error(tokenizer):
    sched = Scheduler(BlockManager(4, 4), 1024, BatchPolicy())
    seq = make_seq(tokenizer, 10, 20)  # up to 30 tokens = 8 blocks > 4
    sched.add(seq)
    assert not sched.has_work()
    with pytest.raises(EngineError, match="needs 8 KV blocks; the cache has 4"):
        list(seq.stream)


def test_a_cached_prompt_waits_when_an_unsplit_prompt_took_the_budget(tokenizer):
    """A prompt whose every token but one is in the prefix cache has one pending token; when an unsplit prompt has
    already overrun the step's budget it must wait (it once got a negative count, which moved its cache backwards)."""
    sched = Scheduler(BlockManager(64, 4), 1024, BatchPolicy(max_batch_size=8, token_budget=10, chunked_prefill=False))
    first = make_seq(tokenizer, 8, 40, first=2000)
    sched.add(first)
    step(sched)  # its two full blocks are in the prefix cache now
    long = make_seq(tokenizer, 30, 5, first=5000)
    ids = list(range(2000, 2009))  # first's 8 tokens and one more
    cached = Sequence(Stream(Request(prompt_ids=ids, sampling=SamplingParams(max_tokens=5, ignore_eos=True)), None),
                      ids, tokenizer)
    sched.add(long)
    sched.add(cached)
    assert step(sched) == [(first, 1), (long, 30)]
    assert step(sched) == [(first, 1), (long, 1), (cached, 1)]
    check_blocks(sched)
