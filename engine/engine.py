"""The engine front (the in-process `Backend`): callers submit requests and read token streams; one worker thread
runs the model.

The worker loops over: take newly submitted requests and control messages, then run one step of the
current mode's runner. Every request becomes a `Sequence` (engine/sequence.py) that carries its own
state, so cancellation is checked before every step and a mode switch can move sequences between runners:
a mode change hands every unfinished sequence to the other runner, which recomputes its k/v from the tokens
it has (prompt + output so far). Tokens leave only through `Sequence.append`, so none is lost or repeated.

Threads: the runners, their caches and counters belong to the worker and are touched by no other thread. After
every step and control the worker publishes an `EngineState` (frozen) by one reference assignment; `snapshot`
reads only that and the thread-safe rolling stats. Callers' threads only enqueue (requests, controls).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import torch

import tradeoff_kernels
from engine.backend import ControlError, Controls, check_mode
from engine.batched import BatchedRunner, StepProfile, batched_model, cuda_dtype
from engine.disaggregated import DisaggregatedRunner, WorkerStartError
from engine.latency import LatencyRunner
from engine.loader import LoadedModel, load
from engine.machine import cpu
from engine.metrics import RequestMetrics
from engine.model import Transformer
from engine.native import build as build_native
from engine.quant import quantize
from engine.scheduler import BatchPolicy
from engine.sequence import EngineError, Request, Sequence, Stream, TokenEvent
from engine.setup import DTYPES, NATIVE_PREFILL_ROWS, Setup, latency_model, resolve
from engine.snapshot import EngineState, KVCache, Snapshot, Speculation, Workers
from engine.speculative import build_drafter
from engine.stats import RollingStats

__all__ = ["Completion", "ContextLengthError", "Engine", "EngineError", "OverloadedError", "Request", "Stream", "TokenEvent"]

# How decode steps run on CUDA. "graphs" is the default until a GPU run of bench/gpu_decode.py measures "compile"
# faster: no GPU has been lent to this project yet.
CUDA_PATHS = ("graphs", "compile", "eager")


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


class Engine:
    """How the model runs: on a CPU, the setup measured and cached for this machine (engine/setup.py), with `quant`
    (latency mode's weight format) and `dtype` (dense weights: prompt chunks and batched mode) imposed when given,
    or `setup` itself; `progress` hears about a first measurement. On CUDA, bf16 (or `dtype`) weights (int4 runs the
    Triton W4A16 kernel), and `cuda_path` (CUDA_PATHS): "graphs", the fused Triton kernels (tradeoff_kernels/) with both modes'
    decode steps replayed from CUDA graphs; "compile", plain PyTorch ops with latency mode's decode steps compiled by
    torch.compile (mode "reduce-overhead"), batched mode's captured; "eager", plain ops, no graphs (for comparison).
    `disagg_threads`: disaggregated mode's (prefill worker, decode worker) threads."""

    def __init__(self, model: str | LoadedModel = "smollm2-135m", device: str | None = None,
                 dtype: torch.dtype | None = None, max_seq_len: int | None = None, max_waiting: int = 64,
                 mode: str = "latency", policy: BatchPolicy | None = None, kv_cache_tokens: int = 16384,
                 quant: str | None = None, spec: str = "auto", draft: str | None = None, cuda_path: str = "graphs",
                 setup: Setup | None = None, progress: Callable[[str], None] | None = None,
                 disagg_threads: tuple[int, int] = (1, 1)):
        loaded = load(model) if isinstance(model, str) else model
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.name = loaded.name
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        native = None
        if self.device.type == "cpu":
            self.setup: Setup | None = setup or resolve(loaded, quant, dtype, progress)
            self.quant, self.dtype = self.setup.quant, self.setup.weight_dtype
            self.batched_dtype = DTYPES[self.setup.batched]
            self.model = latency_model(loaded, self.setup)
            if self.setup.decode == "native":
                native, why = build_native(self.model, self.setup.threads)
                if native is None:  # the kernel did not build or load here: torch's int4 kernel instead, and say why
                    self.setup = replace(self.setup, decode="int4", prefill="fp32" if self.setup.prefill == "native"
                                         else self.setup.prefill, why=f"native kernel unavailable: {why}")
        else:
            self.setup = None
            self.quant, self.dtype = quant or "none", dtype or torch.bfloat16
            self.batched_dtype = dtype or cuda_dtype()
            if cuda_path not in CUDA_PATHS:
                raise ValueError(f"unknown CUDA path {cuda_path!r} (choose from {', '.join(CUDA_PATHS)})")
            ops = tradeoff_kernels.triton_kernels() if cuda_path == "graphs" else None
            self.model = Transformer(loaded.config, dtype=self.dtype, device=self.device, kernels=ops)
            self.model.load_canonical(loaded.weights)
            quantize(self.model, self.quant)
        self.max_seq_len = min(max_seq_len or loaded.config.max_seq_len, loaded.config.max_seq_len)
        self.max_waiting = max_waiting
        self.policy = policy or BatchPolicy()  # batched mode's scheduling policy; `control` changes it live
        self.kv_cache_tokens = kv_cache_tokens
        self.stats = RollingStats()
        self.finish_listeners: list[Callable[[RequestMetrics], None]] = []  # called on the worker as requests end
        self.spec = spec
        native_threads = self.setup.threads if native is not None else None  # drafts too run natively where the target does
        drafter = build_drafter(spec, self.model, self.name, draft, self.max_seq_len, self.quant, native_threads)
        self._drafter = drafter  # kept so speculation can be turned back on
        self._latency = LatencyRunner(self.model, self.max_seq_len, drafter, cuda_path=cuda_path, native=native,
                                      native_prefill=self.setup is not None and self.setup.prefill == "native",
                                      prefill_rows=NATIVE_PREFILL_ROWS)
        self._cuda_path = cuda_path  # for the batched runner, built later
        self._batched_model = batched_model(loaded, self.model, self.quant, self.batched_dtype)
        self._batched: BatchedRunner | None = None  # built on first use: its KV pool is large
        self.disagg_threads = disagg_threads
        self._disaggregated: DisaggregatedRunner | None = None  # its worker processes start on first use
        self.note: str | None = None  # why the engine left disaggregated mode by itself, if it did
        self._step_profile = StepProfile()  # where batched mode's steps are timed (`record_steps` restarts it)
        self.runner: LatencyRunner | BatchedRunner | DisaggregatedRunner = self._latency
        self.mode = "latency"  # the mode the worker runs now (worker-owned; read it through `snapshot`)
        self._switch(check_mode(mode))
        self._inbox: queue.SimpleQueue[Sequence | PendingControl | str | None] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()  # the queue-bound check and the enqueue are one step
        self._unscheduled: list[Sequence] = []  # submitted, maybe not yet started (pruned under the lock)
        self._closed = False
        self._state = self._current_state()
        self._worker = threading.Thread(target=self._run, name="engine", daemon=True)
        self._worker.start()

    # ---- public API -------------------------------------------------------------------------

    def describe(self) -> str:
        where = cpu().short() if self.device.type == "cpu" else str(self.device)
        return f"{self.name} on {where}: {self.setup_summary()}; speculation {self.spec}"

    def prompt_ids(self, request: Request) -> list[int]:
        request.check()
        # tokenized only as far as the context reaches: a prompt of megabytes is refused after a few thousand tokens
        if request.messages is not None:
            return self.tokenizer.encode_chat(request.messages, limit=self.max_seq_len)
        if request.prompt is not None:
            return self.tokenizer.encode(request.prompt, limit=self.max_seq_len)
        ids = list(request.prompt_ids)
        vocab = self.config.vocab_size
        # checked here, whole, so a bad id is this request's 400 and never reaches a step shared with others
        bad = next((j for j, i in enumerate(ids) if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt_ids[{bad}] is not a token id: token ids are integers in [0, {vocab}), the vocabulary")
        return ids

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
            # Waiting = not started, not ended, not cancelled: a request whose client left stops counting at once.
            self._unscheduled = [s for s in self._unscheduled
                                 if s.metrics.scheduled is None and not s.finished and not s.cancelled]
            if len(self._unscheduled) >= self.max_waiting:
                self.stats.record_rejected()
                raise OverloadedError(f"engine overloaded: {self.max_waiting} requests already waiting "
                                      f"(max_waiting); request not queued, retry later")
            seq = Sequence(Stream(request, loop), ids, self.tokenizer, on_finish=self._finished)
            self.stats.track(seq.metrics)
            self._unscheduled.append(seq)
            self._inbox.put(seq)
        return seq.stream

    def stream(self, request: Request) -> Iterator[TokenEvent]:
        return iter(self.submit(request))

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
        self._inbox.put("clear_cache")

    def record_steps(self) -> StepProfile:
        """Restart the timing of batched mode's steps, keeping each step's (decode rows, prefill tokens, seconds),
        and return the record, which fills as batched mode runs (now, or once a control switches to it). What a
        model of the step time is fitted to: the sweep and the dashboard call it as a load level begins."""
        profile = self._step_profile = StepProfile(samples=[])
        if self._batched is not None:
            self._batched.profile = profile  # the worker reads it as each step begins
        return profile

    def control(self, controls: Controls) -> None:
        """Change mode, speculation and batched mode's policy, all or nothing: every part is checked first
        (ControlError, a ValueError), then the worker applies them together between two steps. Returns once applied,
        so a snapshot taken after it shows them. Requests in flight move over and go on."""
        if self._closed:
            raise RuntimeError("engine is closed")
        pending = PendingControl(controls)
        self._inbox.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error

    def snapshot(self, window_s: float | None = None) -> Snapshot:
        """The rolling-window stats over the last `window_s` seconds and the state the worker last published."""
        return Snapshot(self.stats.window(window_s), self._state)

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
            if self.runner.has_work() and (rows := self.runner.step()):
                self.stats.record_step(time.monotonic(), rows)
            if self.runner is self._disaggregated and self._disaggregated.broken:
                self._fall_back(self._disaggregated.broken)
            self._state = self._current_state()

    def _handle(self, item: Sequence | PendingControl | str) -> None:
        if isinstance(item, Sequence):
            self.runner.add(item)
        elif item == "clear_cache":
            self.runner.clear_cache()
        else:
            try:
                self._apply(item.controls)
            except Exception as e:  # refused (ControlError), or failed (batched mode's KV cache could not be built)
                item.error = e
            item.done.set()

    def _apply(self, controls: Controls) -> None:
        """All or nothing: everything is checked before anything changes."""
        if controls.speculation and self._drafter is None:
            raise ControlError("speculation", "speculation cannot be turned on: this engine was started with --spec off")
        self.policy = policy_with(self.policy, controls)
        if self._batched is not None:
            self._batched.scheduler.policy = self.policy
        if self._disaggregated is not None:
            self._disaggregated.policy = self.policy
        if controls.speculation is not None:
            self._latency.set_drafter(self._drafter if controls.speculation else None)
        if controls.mode is not None:
            self._switch(controls.mode)
        self._state = self._current_state()

    def _current_state(self) -> EngineState:
        """What the worker publishes (on the worker, or before it starts)."""
        drafter, spec = self._latency.drafter, self._latency.spec
        batched = self._batched
        kv = None if batched is None else KVCache(batched.blocks.num_used, batched.blocks.num_free,
                                                   batched.scheduler.preemptions, batched.scheduler.cached_tokens)
        disagg = self._disaggregated
        workers = None if disagg is None else Workers(
            prefill_kv=KVCache(disagg.prefill_blocks.num_used, disagg.prefill_blocks.num_free, 0, disagg.cached_tokens),
            decode_kv=KVCache(disagg.decode_blocks.num_used, disagg.decode_blocks.num_free, disagg.preemptions, 0),
            in_transit=disagg.in_transit(), handoffs=disagg.handoffs.count, handoff_bytes=disagg.handoffs.bytes,
            handoff_s=disagg.handoffs.seconds, restarts=disagg.restarts,
            prefill_threads=disagg.threads[0], decode_threads=disagg.threads[1])
        return EngineState(mode=self.mode, running=self.runner.num_running(), waiting=self.runner.num_waiting(),
                           max_batch_size=self.policy.max_batch_size, chunked_prefill=self.policy.chunked_prefill,
                           can_speculate=self._drafter is not None,
                           speculation=Speculation(drafter.name if drafter else None, spec.steps, spec.drafted,
                                                   spec.accepted, spec.emitted),
                           kv=kv, setup=self.setup_summary(), workers=workers, note=self.note)

    def setup_summary(self) -> str:
        """How the model runs, in a few words (the status line and `describe` show it)."""
        if self.setup is not None:
            return self.setup.describe()
        return f"{self.quant} weights, {str(self.dtype).removeprefix('torch.')}, {self._cuda_path}"

    def _switch(self, mode: str) -> None:
        if mode == self.mode:
            return
        if mode == "batched" and self._batched is None:
            self._batched = BatchedRunner(self._batched_model, self.max_seq_len, self.policy, self.kv_cache_tokens,
                                          cuda_graphs=self._cuda_path != "eager", decode_kernel=self._attention())
            self._batched.profile = self._step_profile
        if mode == "disaggregated" and self._disaggregated is None:
            try:
                self._disaggregated = DisaggregatedRunner(self._batched_model, self.max_seq_len, self.policy,
                                                          self.kv_cache_tokens, threads=self.disagg_threads,
                                                          decode_kernel=self._attention())
            except WorkerStartError as e:
                raise ControlError("mode", f"disaggregated mode cannot start: {e}") from None
        target = {"latency": self._latency, "batched": self._batched, "disaggregated": self._disaggregated}[mode]
        for seq in self.runner.take_all():
            target.add(seq)
        self.runner = target
        self.mode = mode
        self.note = None

    def _attention(self) -> str:
        """The CPU's attention for batched decode rows, as this machine's setup measured it (unused on CUDA)."""
        return self.setup.attention if self.setup is not None else Setup.attention

    def _fall_back(self, why: str) -> None:
        """Disaggregated mode broke (a worker would not start again): serve on in batched mode, and say so."""
        broken, self._disaggregated = self._disaggregated, None
        self._switch("batched")
        broken.close()
        self.note = f"disaggregated mode stopped ({why}); serving in batched mode"

    def _shutdown(self) -> None:
        for seq in self.runner.take_all():
            seq.finish("cancelled")
        if self._disaggregated is not None:
            self._disaggregated.close()
        while True:  # anything that raced with close: nobody waits on a request, and a control returns unapplied
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, Sequence):
                item.finish("cancelled")
            elif isinstance(item, PendingControl):
                item.error = RuntimeError("engine is closed")
                item.done.set()


@dataclass
class PendingControl:
    """A control on its way to the worker; the caller waits on `done`, then raises `error` if it was refused."""

    controls: Controls
    done: threading.Event = field(default_factory=threading.Event)
    error: Exception | None = None


def policy_with(policy: BatchPolicy, controls: Controls) -> BatchPolicy:
    """`policy` with the controls' batching changes; ControlError if BatchPolicy refuses them."""
    changes = {"chunked_prefill": controls.chunked_prefill, "max_batch_size": controls.max_batch_size}
    try:
        return replace(policy, **{k: v for k, v in changes.items() if v is not None})
    except ValueError as e:
        raise ControlError("max_batch_size", str(e)) from None
