"""Disaggregated mode: prompts run in a prefill worker process, decode steps in a decode worker process, and each
prompt's k/v moves from one to the other through shared memory (the workers: engine/disagg_worker.py).

This is the coordinator, on the engine's worker thread. It keeps every `Sequence` (tokens leave only through
`Sequence.append`, as in the other modes) and both caches' block managers; the workers only compute. A request
goes: waiting -> on the prefill worker (its prompt's k/v computed into the prefill cache, whose prefix cache
serves repeated system prompts and conversations, then copied into decode-cache blocks reserved for it: the
hand-off) -> its first token sampled here -> decoding, one row of every decode step. The decode worker never runs a
prompt and the two workers run at once, so a long prompt arriving costs the decoding users nothing but the core
it runs on: what chunked prefill only spreads out, disaggregation removes, and pays for with fewer cores per phase.

Admission: a prompt starts only when the decode cache has blocks for all of it (decode capacity pushes back, as in
vLLM's and SGLang's disaggregated serving) and the decode batch has a row for it. When a decode needs a block and
none is free, the newest decoding sequence goes back to the front of the queue and is prefilled again from its
tokens. A worker that dies fails the requests whose k/v it held, with an error naming it and its exit code, and a
new one starts in its place; one that dies before it is ready marks the runner `broken` (the engine falls back).
"""

from __future__ import annotations

import multiprocessing.connection
import sys
import time
from collections import deque
from dataclasses import dataclass
from multiprocessing import resource_tracker

import torch.multiprocessing as mp

from engine.batched import emit
from engine.block_manager import BlockManager
from engine.disagg_worker import ROLES, Decode, Decoded, Failed, Prefill, Prefilled, Ready, Shared, serve, share
from engine.model import Transformer
from engine.scheduler import BatchPolicy, PagedSeq, fails_to_fit
from engine.sequence import EngineError, Sequence

MODE = "disaggregated"
POLL_S = 0.01  # the longest a step waits on the workers, so the engine hears of new requests and controls
START_S = 120.0  # the longest a worker may take to start (import torch, map the shared memory)


class WorkerStartError(RuntimeError):
    """A worker process could not start; the engine's other modes are unaffected."""


@dataclass(eq=False)
class Handoff:
    """A prompt on the prefill worker: the sequence (its block table is the decode cache's blocks the k/v goes to),
    the prefill cache's blocks it is computed into, and the tokens it computes."""

    seq: PagedSeq
    prefill_table: list[int]
    prefill_hashes: list[int]
    ids: list[int]


@dataclass
class HandoffTotals:
    """Since start: prompts handed over, their bytes and copy seconds."""

    count: int = 0
    bytes: int = 0
    seconds: float = 0.0


class WorkerProcess:
    """One worker: its process, its end of the pipe, and the job it is running (None: idle)."""

    def __init__(self, role: str, shared: Shared, threads: int):
        ctx = mp.get_context("spawn")  # not fork: the engine's process runs threads (and maybe an event loop)
        start_resource_tracker()
        self.role = role
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(role, shared, child, threads), name=f"tradeoff-{role}",
                                   daemon=True)
        self.process.start()
        child.close()
        self.ready = False
        self.job: Handoff | list[PagedSeq] | None = None

    def send(self, message: Prefill | Decode, job: Handoff | list[PagedSeq]) -> None:
        self.job = job
        self.conn.send(message)

    def died(self) -> str:
        return f"the {self.role} worker (pid {self.process.pid}) died (exit code {self.process.exitcode})"

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:  # already gone
            pass
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


def start_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (every spawn needs it) on the process's own stderr: it passes
    sys.stderr's descriptor to the tracker, and under Textual sys.stderr is a capture whose descriptor is -1, which
    makes the spawn fail ("bad value(s) in fds_to_keep")."""
    stderr, sys.stderr = sys.stderr, sys.__stderr__
    try:
        resource_tracker.ensure_running()
    finally:
        sys.stderr = stderr


class DisaggregatedRunner:
    """The runner interface of engine/latency.py (add, has_work, num_waiting, num_running, take_all, clear_cache,
    step) over a prefill worker and a decode worker. `threads`: (prefill, decode) torch threads; decode_kernel: as
    batched mode's. Raises WorkerStartError if shared memory cannot be made or a worker does not start."""

    def __init__(self, model: Transformer, max_seq_len: int, policy: BatchPolicy | None = None,
                 kv_cache_tokens: int = 16384, block_size: int = 16, threads: tuple[int, int] = (1, 1),
                 decode_kernel: str = "sdpa"):
        if model.device.type != "cpu":
            raise WorkerStartError("disaggregated mode runs on the CPU (its workers share memory, not a device)")
        if len(threads) != 2 or min(threads) < 1:
            raise WorkerStartError(f"disaggregated mode needs (prefill, decode) threads of at least 1 each, got {threads}")
        self.max_seq_len = max_seq_len
        self.policy = policy or BatchPolicy()
        self.threads = threads
        num_blocks = -(-kv_cache_tokens // block_size)
        self.prefill_blocks = BlockManager(num_blocks, block_size, prefix_caching=True)
        self.decode_blocks = BlockManager(num_blocks, block_size, prefix_caching=False)
        self.max_rows = self.policy.token_budget  # the decode logits buffer's rows: max_batch_size stays below it
        try:
            self.shared = share(model, num_blocks, block_size, self.max_rows, decode_kernel)
        except (OSError, RuntimeError) as e:
            raise WorkerStartError(f"disaggregated mode needs shared memory for the weights and two KV caches of "
                                   f"{kv_cache_tokens} tokens (/dev/shm): {e}") from None
        self.waiting: deque[PagedSeq] = deque()
        self.decoding: list[PagedSeq] = []  # their k/v is in the decode cache; oldest first
        self.handoffs = HandoffTotals()
        self.preemptions = 0
        self.restarts = 0  # workers started again after one died
        self.cached_tokens = 0  # prompt tokens served from the prefill cache's prefix cache, since start
        self.broken: str | None = None  # why the runner cannot go on (a worker failed to start); the engine falls back
        self.workers: dict[str, WorkerProcess] = {}
        for role, n in zip(ROLES, threads):
            try:
                self.workers[role] = WorkerProcess(role, self.shared, n)
            except Exception as e:  # the process could not even be spawned
                self.close()
                raise WorkerStartError(f"the {role} worker could not start: {type(e).__name__}: {e}") from None
        deadline = time.monotonic() + START_S
        while not all(w.ready for w in self.workers.values()) and self.broken is None and time.monotonic() < deadline:
            self._collect(timeout=1.0)
        if self.broken is not None or not all(w.ready for w in self.workers.values()):
            self.close()
            raise WorkerStartError(self.broken or f"a disaggregated worker did not start within {START_S:.0f} s")

    # ---- what the engine calls -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        if not fails_to_fit(seq, self.decode_blocks, self.max_seq_len):  # the two caches are of one size
            self.waiting.append(PagedSeq(seq))

    def has_work(self) -> bool:
        """Requests to run, or a worker starting (whose readiness, or death, the next step hears)."""
        return bool(self.waiting or self.decoding or self.in_transit()) or not all(w.ready for w in self.workers.values())

    def num_waiting(self) -> int:
        return len(self.waiting)

    def num_running(self) -> int:
        return len(self.decoding) + self.in_transit()

    def in_transit(self) -> int:
        """Prompts on the prefill worker (their k/v not yet in the decode cache): 0 or 1."""
        return int(self.workers["prefill"].job is not None)

    def take_all(self) -> list[Sequence]:
        """Let the work in flight finish (a prompt's first token, a decode step's tokens come out as usual), then
        hand every unfinished sequence over, freeing its blocks (mode switch, shutdown)."""
        while any(w.job is not None for w in self.workers.values()):
            self._collect(timeout=POLL_S)
        self._drop_finished()
        seqs = [s.seq for s in self.decoding] + [s.seq for s in self.waiting if not s.seq.finished]
        for s in self.decoding:
            self.decode_blocks.release(s.block_table)
        self.decoding.clear()
        self.waiting.clear()
        return seqs

    def clear_cache(self) -> None:
        self.prefill_blocks.clear_prefix_cache()

    def decode_rows(self) -> int:
        """The most sequences one decode step runs: the policy's batch size, within the logits buffer."""
        return min(self.policy.max_batch_size, self.max_rows)

    def step(self) -> int:
        """Start whatever work a free worker can take, then wait (at most POLL_S) for replies and act on them.
        Returns the rows of the decode step that completed in this call (0: none did)."""
        for w in list(self.workers.values()):  # one that died while idle is replaced before it is given a job
            if w.ready and w.job is None and not w.process.is_alive():
                self._died(w)
        self._start_prefill()
        self._start_decode()
        return self._collect(timeout=POLL_S)

    def close(self) -> None:
        for w in self.workers.values():
            w.close()

    # ---- internals --------------------------------------------------------------------------

    def _start_prefill(self) -> None:
        worker = self.workers["prefill"]
        if any(s.seq.cancelled for s in self.waiting):  # a request cancelled while it waits ends now
            for s in self.waiting:
                if s.seq.cancelled:
                    s.seq.finish("cancelled")
            self.waiting = deque(s for s in self.waiting if not s.seq.finished)
        if not worker.ready or worker.job is not None or not self.waiting:
            return
        if len(self.decoding) >= self.decode_rows():
            return  # no decode row for it yet
        s = self.waiting[0]
        ids = s.seq.all_ids  # a sequence preempted or moved in from another mode brings its output so far
        table, hashes = self.prefill_blocks.share_prefix(ids)
        cached = len(table) * self.prefill_blocks.block_size
        if not self.prefill_blocks.grow(table, len(ids)) or not self.decode_blocks.grow(s.block_table, len(ids)):
            self.prefill_blocks.release(table)
            self.decode_blocks.release(s.block_table)
            return  # the decode cache is full: the prompt waits for decodes to finish
        self.waiting.popleft()
        s.seq.mark_scheduled()
        s.seq.metrics.cached_tokens = min(cached, len(s.seq.prompt_ids))
        self.cached_tokens += cached
        worker.send(Prefill(ids[cached:], cached, list(table), list(s.block_table)), Handoff(s, table, hashes, ids))

    def _start_decode(self) -> None:
        worker = self.workers["decode"]
        if not worker.ready or worker.job is not None:
            return
        self._drop_finished()
        batch: list[PagedSeq] = []
        rows = self.decode_rows()
        i = 0
        while i < len(self.decoding) and len(batch) < rows:  # preemption pops from the tail: those before i stay
            s = self.decoding[i]
            if not self._grow_or_preempt(s):
                break
            batch.append(s)
            i += 1
        if batch:
            worker.send(Decode([s.seq.all_ids[-1] for s in batch], [s.num_tokens for s in batch],
                               [list(s.block_table) for s in batch]), batch)

    def _grow_or_preempt(self, s: PagedSeq) -> bool:
        """A block for s's next token, preempting the newest decoding sequences if needed; False if s itself was."""
        while not self.decode_blocks.grow(s.block_table, s.num_tokens):
            victim = self.decoding.pop()
            self.decode_blocks.release(victim.block_table)
            victim.num_computed = 0
            self.waiting.appendleft(victim)
            self.preemptions += 1
            if victim is s:
                return False
        return True

    def _drop_finished(self) -> None:
        """End cancelled decoding sequences and free the blocks of every finished one (no decode step in flight)."""
        for s in self.decoding:
            if s.seq.cancelled:
                s.seq.finish("cancelled")
            if s.seq.finished:
                self.decode_blocks.release(s.block_table)
        self.decoding = [s for s in self.decoding if not s.seq.finished]

    def _collect(self, timeout: float) -> int:
        """Wait up to `timeout` for a reply or a death among the workers that are busy or starting; act on each."""
        busy = [w for w in self.workers.values() if w.job is not None or not w.ready]
        if not busy:
            return 0
        ready = multiprocessing.connection.wait([x for w in busy for x in (w.conn, w.process.sentinel)], timeout)
        rows = 0
        for w in busy:
            if w.conn in ready:
                try:
                    reply = w.conn.recv()
                except (EOFError, OSError):
                    self._died(w)
                    continue
                rows += self._on_reply(w, reply)
            elif w.process.sentinel in ready:
                self._died(w)
        return rows

    def _on_reply(self, w: WorkerProcess, reply: Ready | Prefilled | Decoded | Failed) -> int:
        job, w.job = w.job, None
        if isinstance(reply, Ready):
            w.ready = True
        elif isinstance(reply, Failed):
            self._fail(job, EngineError(f"the {w.role} worker failed: {reply.error}"))
        elif isinstance(reply, Prefilled):
            self._handed_off(job, reply)
        else:
            self._decoded(job)
            return len(job)
        return 0

    def _handed_off(self, job: Handoff, reply: Prefilled) -> None:
        self.prefill_blocks.cache_full_blocks(job.prefill_table, job.prefill_hashes, job.ids, len(job.ids))
        self.prefill_blocks.release(job.prefill_table)
        totals = self.handoffs
        totals.count += 1
        totals.bytes += reply.handoff_bytes
        totals.seconds += reply.handoff_s
        s, m = job.seq, job.seq.seq.metrics
        m.prefill_s, m.handoff_s, m.handoff_bytes = reply.prefill_s, reply.handoff_s, reply.handoff_bytes
        s.num_computed = len(job.ids)
        if s.seq.cancelled:
            s.seq.finish("cancelled")
        elif not s.seq.finished:
            emit(s.seq, self.shared.prefill_logits[0], time.monotonic(), None, MODE, self.max_seq_len)
        if s.seq.finished:
            self.decode_blocks.release(s.block_table)
        else:
            self.decoding.append(s)

    def _decoded(self, batch: list[PagedSeq]) -> None:
        now = time.monotonic()
        logits = self.shared.decode_logits
        for j, s in enumerate(batch):
            s.num_computed += 1
            if not s.seq.cancelled and not s.seq.finished:
                emit(s.seq, logits[j], now, None, MODE, self.max_seq_len)
        self._drop_finished()

    def _fail(self, job: Handoff | list[PagedSeq] | None, error: Exception) -> None:
        """The job's requests end with `error`; their blocks on both sides are freed."""
        if isinstance(job, Handoff):
            self.prefill_blocks.release(job.prefill_table)
            self.decode_blocks.release(job.seq.block_table)
            job.seq.seq.fail(error)
        elif job is not None:
            for s in job:
                s.seq.fail(error)
            self._drop_finished()

    def _died(self, w: WorkerProcess) -> None:
        """Fail the requests whose k/v the dead worker held, and start another in its place (unless it died
        starting: then the runner is broken and the engine falls back)."""
        w.process.join()
        error = EngineError(w.died())
        if not w.ready:
            self._break(f"{w.died()} while starting")
            return
        if w.role == "prefill":
            self._fail(w.job, error)
            self.prefill_blocks.clear_prefix_cache()  # that worker's cache is gone with it, as on a real server
        else:
            for s in self.decoding:  # every decoding sequence's k/v was on the decode worker
                s.seq.fail(error)
            self._drop_finished()
        w.job = None
        w.conn.close()
        self.restarts += 1
        try:
            self.workers[w.role] = WorkerProcess(w.role, self.shared, self.threads[ROLES.index(w.role)])
        except Exception as e:  # cannot spawn another: the engine falls back
            self._break(f"{w.died()}, and another could not start ({type(e).__name__}: {e})")

    def _break(self, reason: str) -> None:
        """The runner cannot go on: every request it holds fails with `reason`, and the engine falls back."""
        self.broken = reason
        error = EngineError(reason)
        prefill = self.workers["prefill"]
        self._fail(prefill.job, error)  # the prompt in transit, if any (the worker's reply, if it comes, goes unread)
        prefill.job = None
        for s in self.decoding + list(self.waiting):
            s.seq.fail(error)
        self._drop_finished()
        self.waiting.clear()
