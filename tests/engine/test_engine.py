"""The streaming engine on the default model: answers, streams, cancels, measures, refuses bad input."""

import asyncio

import pytest

from engine import ContextLengthError, Engine, OverloadedError, Request, SamplingParams
from tests.conftest import wait_until


@pytest.fixture(scope="module")
def engine(default_model):
    e = Engine(default_model, spec="off")  # plain decoding: one token per emission
    yield e
    e.close()


def chat(text: str, **sampling) -> Request:
    return Request(messages=[{"role": "user", "content": text}], sampling=SamplingParams(**sampling))


def test_capital_of_france(engine):
    c = engine.generate(chat("What is the capital of France?", max_tokens=30))
    assert "Paris" in c.text
    assert c.finish_reason == "stop"


def test_deltas_concatenate_to_the_full_decode(engine):
    stream = engine.submit(chat("Write a haiku about winter, with an emoji.", max_tokens=40))
    events = list(stream)
    ids = [i for ev in events for i in ev.token_ids]
    assert "".join(ev.text for ev in events) == engine.tokenizer.decode(ids)
    assert len(ids) == stream.metrics.output_tokens


def test_metrics_obey_their_definitions(engine):
    stream = engine.submit(chat("Count from one to twenty in words.", max_tokens=24, ignore_eos=True))
    events = [ev for ev in stream if ev.token_ids]
    m = stream.metrics
    assert m.output_tokens == 24 and m.finish_reason == "length"
    assert len(m.itls) == m.output_tokens - 1
    assert 0 < m.ttft < m.e2e
    assert m.tpot == pytest.approx((m.e2e - m.ttft) / (m.output_tokens - 1))
    assert m.queue_time is not None and 0 <= m.queue_time <= m.ttft
    times = [ev.t for ev in events]
    assert times == sorted(times)
    assert times[0] - m.arrival == pytest.approx(m.ttft)


def test_speculative_chunks_count_as_one_emission_each(default_model):
    e = Engine(default_model, spec="ngram")
    try:
        text = "one two three four five six seven eight nine ten"
        stream = e.submit(chat(f"Repeat exactly: {text}. {text}.", max_tokens=40, ignore_eos=True))
        events = [ev for ev in stream if ev.token_ids]
    finally:
        e.close()
    m = stream.metrics
    assert len(events) == len(m.emissions) and len(m.itls) == len(m.emissions) - 1
    assert sum(len(ev.token_ids) for ev in events) == m.output_tokens == 40
    assert max(len(ev.token_ids) for ev in events) > 1  # some step emitted an accepted chunk
    assert [ev.t for ev in events] == [t for t, _, _ in m.emissions]


def test_cancellation_stops_within_one_step(engine):
    stream = engine.submit(chat("Tell me a very long story about a dragon.", max_tokens=200, ignore_eos=True))
    it = iter(stream)
    for _ in range(3):
        next(it)
    produced_at_cancel = stream.metrics.output_tokens
    stream.cancel()
    rest = list(it)
    assert stream.metrics.finish_reason == "cancelled"
    assert stream.metrics.output_tokens <= produced_at_cancel + 1
    assert sum(len(ev.token_ids) for ev in rest) <= produced_at_cancel + 1 - 3
    # the engine serves the next request normally
    assert "Paris" in engine.generate(chat("What is the capital of France?", max_tokens=30)).text


def test_prefix_reuse_gives_the_same_tokens_as_a_cold_cache(engine):
    history = [{"role": "user", "content": "Name a fruit."}]
    first = engine.generate(Request(messages=history, sampling=SamplingParams(max_tokens=12)))
    follow_up = history + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "And a colour?"}]
    warm = engine.generate(Request(messages=follow_up, sampling=SamplingParams(max_tokens=12)))
    engine.clear_cache()
    cold = engine.generate(Request(messages=follow_up, sampling=SamplingParams(max_tokens=12)))
    assert warm.token_ids == cold.token_ids
    # the first turn's prompt was not computed again, and after clear_cache nothing was reused
    assert warm.metrics.cached_tokens >= len(engine.prompt_ids(Request(messages=history)))
    assert cold.metrics.cached_tokens == 0


def test_seeded_sampling_is_reproducible_and_seed_dependent(engine):
    def run(seed):
        # Same conditions each run: in bf16 a reused prefix changes GEMM shapes and so the last bits of the logits.
        engine.clear_cache()
        return engine.generate(chat("Invent a name for a cat.", max_tokens=16, temperature=1.0, top_p=0.95,
                                    seed=seed, ignore_eos=True)).token_ids

    assert run(1) == run(1)
    assert len({tuple(run(s)) for s in (1, 2, 3)}) > 1


def test_async_stream(engine):
    async def collect():
        return [ev async for ev in engine.submit(chat("Say hello.", max_tokens=8), asyncio.get_running_loop())]

    events = asyncio.run(collect())
    assert events and "".join(ev.text for ev in events)


def test_prompt_longer_than_the_context_is_refused(default_model):
    e = Engine(default_model, max_seq_len=32)
    try:
        with pytest.raises(ContextLengthError, match="32"):
            e.submit(Request(prompt="word " * 100))
        # generation that reaches the context end stops cleanly
        c = e.generate(Request(prompt_ids=list(range(100, 120)), sampling=SamplingParams(max_tokens=50, ignore_eos=True)))
        assert c.finish_reason == "length" and c.metrics.prompt_tokens + c.metrics.output_tokens == 32
    finally:
        e.close()


def test_overload_is_refused_and_the_engine_keeps_serving(default_model):
    e = Engine(default_model, max_waiting=2)
    try:
        long = SamplingParams(max_tokens=60, ignore_eos=True)
        streams = [e.submit(Request(prompt="Once upon a time", sampling=long))]
        wait_until(lambda: streams[0].metrics.scheduled is not None, what="the first request to start")
        streams += [e.submit(Request(prompt="Hello", sampling=long)) for _ in range(2)]
        with pytest.raises(OverloadedError, match="overloaded"):
            e.submit(Request(prompt="one too many"))
        for s in streams:
            s.cancel()
            list(s)
        assert e.generate(Request(prompt="Hi", sampling=SamplingParams(max_tokens=3))).token_ids
    finally:
        e.close()


def test_bad_requests(engine):
    with pytest.raises(ValueError, match="exactly one"):
        engine.submit(Request(prompt="a", messages=[{"role": "user", "content": "b"}]))
    with pytest.raises(ValueError, match="empty"):
        engine.submit(Request(prompt=""))
    with pytest.raises(ValueError, match="unknown user_class 'judges'"):
        engine.submit(Request(prompt="a", user_class="judges"))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)


@pytest.mark.parametrize("ids", [[49152], [-1], [2**63], [5, True], [5, 6.0], [1, 2, 10**80]])
def test_prompt_ids_outside_the_vocabulary_are_refused_at_submission(engine, ids):
    """Checked before anything is queued: a bad id is its request's ValueError (a 400), never a failed model step."""
    before = engine.snapshot().state
    with pytest.raises(ValueError, match=r"prompt_ids\[\d\] is not a token id.*\[0, 49152\)"):
        engine.submit(Request(prompt_ids=ids, sampling=SamplingParams(max_tokens=2)))
    assert engine.snapshot().state.waiting == before.waiting
    assert engine.generate(Request(prompt_ids=[1, 2, 49151], sampling=SamplingParams(max_tokens=1))).token_ids


def test_a_reader_whose_event_loop_closed_cancels_its_request_and_the_engine_lives_on(engine):
    loop = asyncio.new_event_loop()
    stream = engine.submit(chat("Tell me a long story.", max_tokens=100, ignore_eos=True), loop)
    loop.close()  # the reader is gone before the first token arrives
    wait_until(lambda: stream.metrics.finish_reason is not None, what="the request to end")
    assert stream.metrics.finish_reason == "cancelled"
    assert "Paris" in engine.generate(chat("What is the capital of France?", max_tokens=30)).text
