"""The text turn model on the default LLM: a complete question reads as the end of a turn and a sentence cut before
its object does not; the reply drafted after a judgment reuses all of the judgment's prefill; a backend without a
tokenizer gives no judgment."""

import asyncio

import pytest

from engine import Controls, Request, SamplingParams
from voice import text_turn
from voice.protocol import SessionConfig

SYSTEM = SessionConfig().instructions


async def probability(engine, history: list[dict]) -> float:
    stream = await asyncio.to_thread(text_turn.submit, engine, SYSTEM, history, asyncio.get_running_loop())
    return await text_turn.probability(engine, stream)


@pytest.fixture
def latency(engine):
    engine.control(Controls(mode="latency"))
    return engine


async def test_a_complete_question_ends_the_turn_and_a_cut_sentence_does_not(latency):
    complete = await probability(latency, [{"role": "user", "content": "How far away is the moon?"}])
    cut = await probability(latency, [{"role": "user", "content": "I would like to know"}])
    assert cut < 0.1 < 0.3 < complete <= 1.0, (cut, complete)
    # the conversation so far is read too: the same words, after a question of the assistant's, are an answer
    history = [{"role": "user", "content": "Book me a table."}, {"role": "assistant", "content": "For how many people?"},
               {"role": "user", "content": "Four people"}]
    assert await probability(latency, history) > cut


async def test_the_reply_after_a_judgment_prefills_only_what_follows_its_prefix(latency):
    history = [{"role": "user", "content": "What is the capital of France?"}]
    latency.clear_cache()
    stream = await asyncio.to_thread(text_turn.submit, latency, SYSTEM, history, asyncio.get_running_loop())
    await text_turn.probability(latency, stream)
    judged = stream.metrics.prompt_tokens
    # a judgment is the loop's own request: counted as one, never as a short reply to the user
    assert stream.metrics.user_class == "judge" and latency.snapshot().stats.judge.finished >= 1
    messages = [{"role": "system", "content": SYSTEM}, *history]
    reply = latency.submit(Request(messages=messages, sampling=SamplingParams(max_tokens=1)), asyncio.get_running_loop())
    async for _ in reply:
        pass
    # all of the judgment's tokens are reused; what is left is the template's end marker and the assistant's prompt
    assert reply.metrics.cached_tokens == judged and 0 < reply.metrics.prompt_tokens - judged <= 8


async def test_no_tokenizer_no_judgment(latency):
    class NoTokenizer:
        tokenizer = None

    assert text_turn.submit(NoTokenizer(), SYSTEM, [{"role": "user", "content": "Hi"}], asyncio.get_running_loop()) is None
