"""A request in flight: its tokens, sampling state, detokenizer, metrics and output stream.

Runners (latency mode, batched mode) only decide which model steps to run. Everything that happens
when tokens come out of a step (stop tokens, the max-token limit, text deltas, timestamps, metrics,
finishing the stream) lives here, so both modes behave the same and a sequence can move between
modes with its state intact.
"""

from __future__ import annotations

import asyncio
import queue
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.metrics import RequestMetrics
from engine.sampling import SamplingParams, forbid, make_generator, top_logprobs
from engine.snapshot import USER_CLASSES
from engine.tokenizer import IncrementalDetokenizer, Tokenizer

if TYPE_CHECKING:
    from torch import Tensor


@dataclass
class Request:
    """Exactly one of `prompt` (raw text, no template), `messages` (chat) or `prompt_ids`."""

    prompt: str | None = None
    messages: list[dict] | None = None
    prompt_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    user_class: str = "user"  # metrics are aggregated per class: one of engine.snapshot.USER_CLASSES

    def check(self) -> None:
        if sum(x is not None for x in (self.prompt, self.messages, self.prompt_ids)) != 1:
            raise ValueError("a request needs exactly one of prompt, messages or prompt_ids")
        if self.user_class not in USER_CLASSES:  # its metrics would count in no class
            raise ValueError(f"unknown user_class {self.user_class!r}; one of {USER_CLASSES}")


@dataclass(frozen=True)
class TokenEvent:
    token_ids: list[int]
    text: str
    t: float  # time.monotonic() when the tokens left the engine
    # SamplingParams.logprobs > 0: per token of token_ids, its position's most likely token ids -> log-probabilities
    logprobs: tuple[dict[int, float], ...] = ()


class EngineError(RuntimeError):
    """A request failed inside the engine; the engine itself keeps serving."""


_DONE = object()


class Stream:
    """The token events of one request, readable with `for` or `async for` (not both)."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None):
        self.request = request
        self.cancelled = False
        self._loop = loop
        self._events: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self.metrics: RequestMetrics  # set by the Sequence that feeds this stream

    def cancel(self) -> None:
        """Stop generating; the engine notices before its next step and ends the stream."""
        self.cancelled = True

    def put(self, item: object) -> None:
        """Engine side: hand one event (or the end marker, or an exception) to the reader."""
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._events.put_nowait, item)
            except RuntimeError:  # the reader's event loop is closed: nobody will read this; stop generating
                self.cancelled = True
        else:
            self._events.put(item)

    def end(self) -> None:
        """Engine side: no more events."""
        self.put(_DONE)

    def __iter__(self) -> Iterator[TokenEvent]:
        try:
            while (item := self._events.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()  # a reader that stops early (break, close, exception) cancels the request

    async def __aiter__(self) -> AsyncIterator[TokenEvent]:
        try:
            while (item := await self._events.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancel()


class Sequence:
    def __init__(self, stream: Stream, prompt_ids: list[int], tokenizer: Tokenizer,
                 on_finish: Callable[[RequestMetrics], None] | None = None):
        self.stream = stream
        self.on_finish = on_finish  # told once, with the final metrics, however the request ends
        self.params: SamplingParams = stream.request.sampling
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.metrics = RequestMetrics(arrival=time.monotonic(), prompt_tokens=len(prompt_ids),
                                      user_class=stream.request.user_class)
        stream.metrics = self.metrics
        self.generator = make_generator(self.params)
        self.stop_ids = frozenset() if self.params.ignore_eos else tokenizer.stop_ids
        self._detok = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._stops = StopStrings(self.params.stop)
        self.finished = False

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def cancelled(self) -> bool:
        return self.stream.cancelled

    def mask_stops(self, logits: Tensor) -> Tensor | None:
        """min_tokens: `logits` [n, V], whose row i chooses output token len(output_ids) + i, with the stop tokens made
        impossible in the rows before min_tokens; None when no row needs that (then an argmax taken elsewhere holds)."""
        rows = self.params.min_tokens - len(self.output_ids)
        if rows <= 0 or not self.stop_ids:
            return None
        return forbid(logits, self.stop_ids, rows)

    def append(self, tokens: list[int], mode: str, t: float | None = None, logits: Tensor | None = None) -> None:
        """Emit tokens produced by one step (all at time t); finish on a stop token or the token limit. `logits`
        [>= len(tokens), V]: the rows the tokens were chosen from, row i for tokens[i] (read when logprobs are asked for)."""
        t = time.monotonic() if t is None else t
        accepted: list[int] = []
        reason = None
        for tok in tokens:
            if tok in self.stop_ids:
                reason = "stop"
                break
            accepted.append(tok)
            if len(self.output_ids) + len(accepted) >= self.params.max_tokens:
                reason = "length"
                break
        if accepted:
            # min_tokens: a stop string must end in the text of a token past the first min_tokens
            early = min(len(accepted), max(self.params.min_tokens - len(self.output_ids), 0))
            self.output_ids += accepted
            self.metrics.record(t, len(accepted), mode)
            text, stopped = self._stops.feed(self._detok.add(accepted[:early]), armed=False) if early else ("", False)
            if early < len(accepted):
                more, stopped = self._stops.feed(self._detok.add(accepted[early:]))
                text += more
            logprobs = top_logprobs(logits[:len(accepted)], self.params.logprobs) if self.params.logprobs else ()
            self.stream.put(TokenEvent(accepted, text, t, logprobs))
            if stopped:
                reason = "stop"
        if reason:
            self.finish(reason)

    def mark_scheduled(self) -> None:
        if self.metrics.scheduled is None:
            self.metrics.scheduled = time.monotonic()

    def finish(self, reason: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.metrics.finish_reason = reason
        if not self._stops.stopped and (tail := self._stops.flush(self._detok.flush())):
            self.stream.put(TokenEvent([], tail, time.monotonic()))
        self.stream.end()
        self._notify()

    def fail(self, error: Exception) -> None:
        if self.finished:
            return
        self.finished = True
        self.metrics.finish_reason = "error"
        self.stream.put(EngineError(f"request {self.stream.request.id} failed: {type(error).__name__}: {error}"))
        self._notify()

    def _notify(self) -> None:
        if self.on_finish is not None:
            self.on_finish(self.metrics)


class StopStrings:
    """Cuts generated text before the first stop string. Text that could still turn out to begin one is held
    back until it can't (or the output ends), so no part of a stop string ever reaches the reader."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""
        self.unarmed = 0  # the first characters of `held` came before min_tokens: no stop string may end in them
        self.stopped = False

    def feed(self, delta: str, armed: bool = True) -> tuple[str, bool]:
        """(text that may be released now, whether a stop string was found). Unarmed (the text of the first
        min_tokens tokens), `delta` ends no stop string, though one that begins in it may end in later text."""
        if not self.stops or self.stopped:
            return ("" if self.stopped else delta), self.stopped
        text = self.held + delta
        floor = self.unarmed if armed else len(text)  # a stop string counts only if it ends past this many characters
        # the stop string that ends first wins (the longer one on a tie), as if the text came a character at a time
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s, max(floor - len(s) + 1, 0))) >= 0]
        if hits:
            self.held, self.unarmed, self.stopped = "", 0, True
            return text[: min(hits)[1]], True
        keep = max((n for s in self.stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self.held = text[len(text) - keep:] if keep else ""
        self.unarmed = max(floor - (len(text) - keep), 0)
        return text[: len(text) - keep], False

    def flush(self, delta: str) -> str:
        """The rest, once the output has ended without a stop string."""
        text, stopped = self.feed(delta)
        if stopped:
            return text
        text, self.held = text + self.held, ""
        return text
