"""The engine front: callers submit requests and read token streams; one worker thread runs the model.

The worker loops over: take newly submitted requests and control messages, then run one step of the
current mode's runner. Every request becomes a `Sequence` (engine/sequence.py) that carries its own
state, so cancellation is checked before every step and a mode switch can move sequences between runners.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import torch

from engine.latency import LatencyRunner
from engine.loader import LoadedModel, load
from engine.metrics import RequestMetrics
from engine.model import Transformer
from engine.sequence import EngineError, Request, Sequence, Stream, TokenEvent

__all__ = ["Completion", "ContextLengthError", "Engine", "EngineError", "OverloadedError", "Request", "Stream", "TokenEvent"]


class ContextLengthError(ValueError):
    """The prompt (plus at least one new token) does not fit the model's context."""


class OverloadedError(RuntimeError):
    """The waiting queue is full; retry later."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    metrics: RequestMetrics

    @property
    def finish_reason(self) -> str | None:
        return self.metrics.finish_reason


def default_dtype(device: torch.device) -> torch.dtype:
    # Measured with `tradeoff bench decode` (bench/RESULTS.md): bf16 halves the bytes per token and
    # decodes ~1.7x faster than fp32 on the 2-core CPU, with no loss in prefill at chat prompt lengths.
    return torch.bfloat16


class Engine:
    def __init__(self, model: str | LoadedModel = "smollm2-135m", device: str | None = None,
                 dtype: torch.dtype | None = None, max_seq_len: int | None = None, max_waiting: int = 64):
        loaded = load(model) if isinstance(model, str) else model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        self.name = loaded.name
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model = Transformer(loaded.config, dtype=self.dtype, device=self.device)
        self.model.load_canonical(loaded.weights)
        self.max_seq_len = min(max_seq_len or loaded.config.max_seq_len, loaded.config.max_seq_len)
        self.max_waiting = max_waiting
        self.runner = LatencyRunner(self.model, self.max_seq_len)
        self._inbox: queue.SimpleQueue[Sequence | tuple | None] = queue.SimpleQueue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    # ---- public API -------------------------------------------------------------------------

    def prompt_ids(self, request: Request) -> list[int]:
        given = [x is not None for x in (request.prompt, request.messages, request.prompt_ids)]
        if sum(given) != 1:
            raise ValueError("a request needs exactly one of prompt, messages or prompt_ids")
        if request.messages is not None:
            return self.tokenizer.encode_chat(request.messages)
        if request.prompt is not None:
            return self.tokenizer.encode(request.prompt)
        return list(request.prompt_ids)

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a request and return its stream. Pass the running loop to read it with `async for`."""
        if self._closed:
            raise RuntimeError("engine is closed")
        ids = self.prompt_ids(request)
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_seq_len:
            raise ContextLengthError(
                f"prompt is {len(ids)} tokens; the context holds {self.max_seq_len} including at least one new token"
            )
        if self._inbox.qsize() + self.runner.num_waiting() >= self.max_waiting:
            raise OverloadedError(f"engine overloaded: {self.max_waiting} requests already waiting; retry later")
        seq = Sequence(Stream(request, loop), ids, self.tokenizer)
        self._inbox.put(seq)
        return seq.stream

    def stream(self, request: Request) -> Iterator[TokenEvent]:
        return iter(self.submit(request))

    async def astream(self, request: Request) -> AsyncIterator[TokenEvent]:
        async for event in self.submit(request, asyncio.get_running_loop()):
            yield event

    def generate(self, request: Request) -> Completion:
        stream = self.submit(request)
        ids: list[int] = []
        text = []
        for ev in stream:
            ids += ev.token_ids
            text.append(ev.text)
        return Completion("".join(text), ids, stream.metrics)

    def clear_cache(self) -> None:
        """Drop cached k/v so the next request prefills from scratch (benchmarks use it)."""
        self._inbox.put(("clear_cache",))

    def close(self) -> None:
        self._closed = True
        self._inbox.put(None)
        self._worker.join(timeout=30)

    # ---- worker -----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            block = not self.runner.has_work()
            try:
                while True:
                    item = self._inbox.get(block=block)
                    block = False
                    if item is None:
                        self._shutdown()
                        return
                    self._handle(item)
            except queue.Empty:
                pass
            if self.runner.has_work():
                self.runner.step()

    def _handle(self, item: Sequence | tuple) -> None:
        if isinstance(item, Sequence):
            self.runner.add(item)
        elif item[0] == "clear_cache":
            self.runner.clear_cache()

    def _shutdown(self) -> None:
        for seq in self.runner.take_all():
            seq.finish("cancelled")
