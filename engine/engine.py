"""The engine front: callers submit requests and read token streams; one worker thread runs the model.

The worker loops over: take newly submitted requests and control messages, then run one step of the
current mode's runner. Every request becomes a `Sequence` (engine/sequence.py) that carries its own
state, so cancellation is checked before every step and a mode switch can move sequences between runners:
`set_mode` hands every unfinished sequence to the other runner, which recomputes its k/v from the tokens
it has (prompt + output so far). Tokens leave only through `Sequence.append`, so none is lost or repeated.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace

import torch

from engine.batched import BatchedRunner, batched_model, choose_dtype
from engine.latency import LatencyRunner
from engine.loader import LoadedModel, load
from engine.metrics import RequestMetrics
from engine.model import Transformer
from engine.quant import quantize
from engine.scheduler import BatchPolicy
from engine.sequence import EngineError, Request, Sequence, Stream, TokenEvent
from engine.speculative import build_drafter
from engine.stats import RollingStats

__all__ = ["Completion", "ContextLengthError", "Engine", "EngineError", "OverloadedError", "Request", "Stream", "TokenEvent"]


class ContextLengthError(ValueError):
    """The prompt (plus at least one new token) does not fit the model's context."""


class OverloadedError(RuntimeError):
    """The waiting queue is full (`max_waiting` requests not yet running); retry later."""


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    metrics: RequestMetrics

    @property
    def finish_reason(self) -> str | None:
        return self.metrics.finish_reason


def activation_dtype(device: torch.device, weights: torch.dtype) -> torch.dtype:
    # Measured (bench/RESULTS.md): this CPU has no native bf16, so norms, RoPE and attention run faster in fp32
    # while the matmuls still read bf16/int4 weights; GPUs keep activations in the weights' dtype.
    return torch.float32 if device.type == "cpu" else weights


def default_dtype(device: torch.device) -> torch.dtype:
    # Measured with `tradeoff bench decode` (bench/RESULTS.md): bf16 weights read half the bytes of fp32 and decode
    # faster (28.7 vs 21.1 tok/s on the 2-core CPU); int4 quantization then starts from them.
    return torch.bfloat16


def default_quant(device: torch.device) -> str:
    # Measured with `tradeoff bench decode` (bench/RESULTS.md): on the CPU, int4 weights (the GGUF's own Q4_1
    # groups) decode fastest; torch's int4 kernel here is CPU-only, so other devices keep full weights.
    return "int4" if device.type == "cpu" else "none"


MODES = ("latency", "batched")


class Engine:
    """`dtype` applies to both modes when given; by default latency mode runs `default_dtype` and batched mode
    `engine.batched.choose_dtype` (sharing the latency model's weights when the two agree). On CUDA, both modes
    replay their decode steps from CUDA graphs unless `cuda_graphs` is False (eager, for comparison)."""

    def __init__(self, model: str | LoadedModel = "smollm2-135m", device: str | None = None,
                 dtype: torch.dtype | None = None, max_seq_len: int | None = None, max_waiting: int = 64,
                 mode: str = "latency", policy: BatchPolicy | None = None, kv_cache_tokens: int = 16384,
                 quant: str | None = None, spec: str = "auto", draft: str | None = None, cuda_graphs: bool = True):
        loaded = load(model) if isinstance(model, str) else model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = dtype or default_dtype(self.device)
        self.batched_dtype = dtype or choose_dtype(self.device)
        self.name = loaded.name
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model = Transformer(loaded.config, dtype=self.dtype, device=self.device,
                                 act_dtype=activation_dtype(self.device, self.dtype))
        self.model.load_canonical(loaded.weights)
        self.max_seq_len = min(max_seq_len or loaded.config.max_seq_len, loaded.config.max_seq_len)
        self.max_waiting = max_waiting
        self.policy = policy or BatchPolicy()  # batched mode's scheduling policy; `set_policy` changes it live
        self.kv_cache_tokens = kv_cache_tokens
        self.stats = RollingStats()
        self.finish_listeners: list[Callable[[RequestMetrics], None]] = []  # called on the worker as requests end
        self.quant = quant or default_quant(self.device)
        quantize(self.model, self.quant)
        self.spec = spec
        drafter = build_drafter(spec, self.model, self.name, draft, self.max_seq_len, self.quant)
        self._drafter = drafter  # kept so `set_speculation(True)` can bring it back
        self._latency = LatencyRunner(self.model, self.max_seq_len, drafter, cuda_graphs=cuda_graphs)
        self._cuda_graphs = cuda_graphs  # for the batched runner, built later
        self._batched_model = batched_model(loaded, self.model, self.quant, self.batched_dtype)
        self._batched: BatchedRunner | None = None  # built on first use: its KV pool is large
        self.runner: LatencyRunner | BatchedRunner = self._latency
        self.mode = "latency"  # the mode the worker runs now
        self._switch(check_mode(mode))
        self._inbox: queue.SimpleQueue[Sequence | tuple | None] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()  # the queue-bound check and the enqueue are one step
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    # ---- public API -------------------------------------------------------------------------

    def describe(self) -> str:
        return (f"{self.name} on {self.device}: latency mode {self.dtype} ({self.quant} weights), "
                f"batched mode {self.batched_dtype}; speculation {self.spec}")

    def prompt_ids(self, request: Request) -> list[int]:
        request.check()
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
        with self._submit_lock:
            if self._inbox.qsize() + self.runner.num_waiting() >= self.max_waiting:
                self.stats.record_rejected()
                raise OverloadedError(f"engine overloaded: {self.max_waiting} requests already waiting "
                                      f"(max_waiting); request not queued, retry later")
            seq = Sequence(Stream(request, loop), ids, self.tokenizer, on_finish=self._finished)
            self.stats.track(seq.metrics)
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

    def set_mode(self, mode: str) -> None:
        """Switch to "latency" or "batched" before the next step; requests in flight move over and go on."""
        self._inbox.put(("set_mode", check_mode(mode)))

    def set_policy(self, chunked_prefill: bool | None = None, max_batch_size: int | None = None,
                   token_budget: int | None = None) -> None:
        """Change batched mode's scheduling policy from the next step (kept for later while in latency mode)."""
        changes = {"chunked_prefill": chunked_prefill, "max_batch_size": max_batch_size, "token_budget": token_budget}
        self.policy = replace(self.policy, **{k: v for k, v in changes.items() if v is not None})  # validates
        self._inbox.put(("policy", self.policy))

    def set_speculation(self, on: bool) -> None:
        """Turn latency mode's speculative decoding off, or back on with the drafter built at start, from the next step."""
        self._inbox.put(("drafter", self._drafter if on else None))

    def metrics_snapshot(self, since: float | None = None) -> dict:
        """Live numbers for the dashboard: the rolling-window stats (engine/stats.py; `since` starts the window
        later) plus the runner's state and latency mode's speculation counters since start."""
        snap = self.stats.snapshot(since=since)
        drafter = self._latency.drafter
        snap.update(mode=self.mode, running=self.runner.num_running(), waiting=self.runner.num_waiting(),
                    chunked_prefill=self.policy.chunked_prefill, max_batch_size=self.policy.max_batch_size,
                    speculation={"drafter": drafter.name if drafter else None, **vars(self._latency.spec)})
        if (batched := self._batched) is not None:
            snap.update(kv_blocks_used=batched.blocks.num_used, kv_blocks_free=batched.blocks.num_free,
                        preemptions=batched.scheduler.preemptions, prefix_cached_tokens=batched.scheduler.cached_tokens)
        return snap

    def close(self) -> None:
        """Cancel what is queued or running and stop the worker."""
        self._closed = True
        self._inbox.put(None)
        self._worker.join(timeout=30)

    # ---- worker -----------------------------------------------------------------------------

    def _finished(self, metrics: RequestMetrics) -> None:
        for listener in self.finish_listeners:
            listener(metrics)

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
                self.stats.record_step(time.monotonic(), self.runner.num_running())

    def _handle(self, item: Sequence | tuple) -> None:
        if isinstance(item, Sequence):
            self.runner.add(item)
        elif item[0] == "clear_cache":
            self.runner.clear_cache()
        elif item[0] == "set_mode":
            self._switch(item[1])
        elif item[0] == "policy" and self._batched is not None:
            self._batched.scheduler.policy = item[1]
        elif item[0] == "drafter":
            self._latency.set_drafter(item[1])

    def _switch(self, mode: str) -> None:
        if mode == self.mode:
            return
        if mode == "batched" and self._batched is None:
            self._batched = BatchedRunner(self._batched_model, self.max_seq_len, self.policy, self.kv_cache_tokens,
                                          cuda_graphs=self._cuda_graphs)
        target = self._batched if mode == "batched" else self._latency
        for seq in self.runner.take_all():
            target.add(seq)
        self.runner = target
        self.mode = mode

    def _shutdown(self) -> None:
        for seq in self.runner.take_all():
            seq.finish("cancelled")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode
