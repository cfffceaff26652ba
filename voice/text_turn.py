"""The text turn model: the LLM reads the transcript so far and says how likely the user's turn ends there.

The conversation is rendered as the reply's prompt would be, but with the user's message left open (no end
marker, no assistant prompt), and the engine is asked for one token with its log-probabilities: P(end of turn) is
the probability of the template's end-of-turn token right after the user's words. "I would like to know" leaves it
near 0, "How far away is the moon?" high. The request's prefix is the reply's, so in latency mode the drafted reply
that follows it prefills only the few tokens of the template between them.

It needs a backend with a local tokenizer that returns log-probabilities (tradeoff's engine); with any other there is
no text judgment and semantic_vad judges by audio alone (voice/smart_turn.py).
"""

from __future__ import annotations

import asyncio
import math

from engine import Backend, Request, SamplingParams
from engine.sequence import Stream
from voice.responder import newest_that_fit

TOP_TOKENS = 20  # the end-of-turn token counts only among the model's 20 likeliest; below those it is ~0


def submit(engine: Backend, system: str | None, history: list[dict], loop: asyncio.AbstractEventLoop) -> Stream | None:
    """Queue the one-token request whose log-probabilities hold P(end of turn) after `history`'s last (user) message,
    fitted to the context as the reply's prompt is (blocking: run it on a thread). None where this backend cannot say."""
    if engine.tokenizer is None:
        return None
    head = [{"role": "system", "content": system}] if system else []
    ids = engine.tokenizer.encode_chat(head + newest_that_fit(engine, head, history), open_last=True)
    sampling = SamplingParams(max_tokens=1, logprobs=TOP_TOKENS, ignore_eos=True)
    return engine.submit(Request(prompt_ids=ids, sampling=sampling, user_class="judge"), loop)


async def probability(engine: Backend, stream: Stream) -> float | None:
    """P(end of turn) from the stream `submit` returned; None if the backend gave no log-probabilities."""
    try:
        async for ev in stream:
            if ev.logprobs:
                stops = engine.tokenizer.stop_ids
                return min(1.0, sum(math.exp(lp) for token, lp in ev.logprobs[0].items() if token in stops))
    finally:
        stream.cancel()
    return None
