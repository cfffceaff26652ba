"""Latency mode: batch size 1 on a static KV cache, with speculative decoding. One sequence runs at a time;
the rest wait in FIFO order.

The cache keeps the k/v of the last sequence it ran, so a follow-up turn sharing a prefix with it
(system prompt, conversation so far) prefills only its new tokens. Each decode step feeds the last
emitted token plus k drafted tokens through the target at once, emits what verification accepts
(all with one timestamp), and truncates the cache back to what was accepted. k = 0 is a plain decode step.

On a CPU, where the engine's setup (engine/setup.py) chose it, the native kernel (engine/native.py) runs the decode
and verify steps, each in one call, and prompt chunks too if it was chosen for them; other prompt chunks run
through the model's dense weights and then the native step's int8 head, so every row's logits come from one head.
Either way only the rows whose logits are needed go through the head. On CUDA the
decode step replays a captured CUDA graph and chooses tokens on the device (engine/cuda_graph.py); prefill, and a
step whose shape no graph covers, run eagerly.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from engine.cuda_graph import DecodeGraphs
from engine.kv_cache import StaticKVCache
from engine.metrics import SpecStats
from engine.model import Transformer
from engine.native import NativeModel
from engine.sequence import Sequence
from engine.speculative import AdaptiveK, Drafter, choose_tokens

MODE = "latency"


class LatencyRunner:
    """native: the native step for decode and verify rows; native_prefill: for prompt chunks too (in chunks of
    `prefill_rows`). cuda_path (on CUDA): one of engine.engine.CUDA_PATHS."""

    def __init__(self, model: Transformer, max_seq_len: int, drafter: Drafter | None = None, k_max: int = 6,
                 cuda_path: str = "graphs", native: NativeModel | None = None, native_prefill: bool = False,
                 prefill_rows: int = 16):
        self.model = model
        self.native = native
        self.native_prefill = native_prefill and native is not None
        self.prefill_rows = prefill_rows
        self.max_seq_len = max_seq_len
        self.cache = StaticKVCache(model.cfg, max_seq_len, model.dtype, model.device)
        graphs = model.device.type == "cuda" and cuda_path != "eager"
        compile_mode = "reduce-overhead" if cuda_path == "compile" else None  # torch.compile's graphs, not ours
        self.graphs = DecodeGraphs(model, self.cache, k_max + 1, compile_mode=compile_mode) if graphs else None
        self.queue: deque[Sequence] = deque()
        self.drafter = drafter
        self.adaptive = AdaptiveK(k_max=k_max)
        self.spec = SpecStats()  # engine-wide totals since start
        self._prefilled = False  # has the head sequence been prefilled (its first token emitted)?

    # ---- what the engine calls -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        self.queue.append(seq)

    def has_work(self) -> bool:
        return bool(self.queue)

    def num_waiting(self) -> int:
        return max(0, len(self.queue) - 1)

    def num_running(self) -> int:
        return min(1, len(self.queue))

    def take_all(self) -> list[Sequence]:
        """Hand every unfinished sequence over (mode switch); their tokens so far stay in the sequence."""
        seqs = list(self.queue)
        self.queue.clear()
        self._prefilled = False
        return seqs

    def clear_cache(self) -> None:
        self.cache.truncate(0)

    def set_drafter(self, drafter: Drafter | None) -> None:
        self.drafter = drafter
        self.adaptive = AdaptiveK(k_max=self.adaptive.k_max)

    def step(self) -> int:
        """One model step for the sequence at the head: its prefill, or one (speculative) decode step. Returns 1,
        the step's rows (as the other runners count them)."""
        self._drop_cancelled_waiting()
        seq = self.queue[0]
        try:
            if seq.cancelled:
                seq.finish("cancelled")
            elif not self._prefilled:
                self._prefill(seq)
            else:
                self._decode(seq)
            if not seq.finished and len(seq.all_ids) >= self.max_seq_len:
                seq.finish("length")
        except Exception as e:  # one bad request must not take the engine down
            self.clear_cache()
            seq.fail(e)
        if seq.finished:
            self.queue.popleft()
            self._prefilled = False
        return 1

    # ---- internals --------------------------------------------------------------------------

    def _drop_cancelled_waiting(self) -> None:
        """A request cancelled while it waits (its client left) ends now, not when its turn would have come."""
        if any(s.cancelled for s in self.queue):
            head, *waiting = self.queue
            for seq in waiting:
                if seq.cancelled:
                    seq.finish("cancelled")
            self.queue = deque([head, *(s for s in waiting if not s.finished)])

    def _prefill(self, seq: Sequence) -> None:
        seq.mark_scheduled()
        ids = seq.all_ids  # a sequence moved in from batched mode brings its output so far
        cached = self.cache.reuse_prefix(ids)
        seq.metrics.cached_tokens = min(cached, len(seq.prompt_ids))
        logits = self._forward(ids[cached:], 1)
        self._prefilled = True
        masked = seq.mask_stops(logits)  # min_tokens
        tokens = choose_tokens([], None, logits if masked is None else masked, seq.params, seq.generator)
        seq.append(tokens, MODE, logits=logits)

    def _decode(self, seq: Sequence) -> None:
        t0 = time.perf_counter()
        ids = seq.all_ids
        # the step may emit k + 1 tokens, and the sequence must still fit the context after it
        k = min(self.adaptive.choose(), self.max_seq_len - len(ids) - 1) if self.drafter else 0
        drafts, draft_probs = self.drafter.propose(ids, k, seq.params, seq.generator) if k > 0 else ([], None)
        t1 = time.perf_counter()
        kept = self.cache.length
        step = [ids[-1], *drafts]
        timed = True  # a step that first captures its CUDA graph says nothing about k's cost: AdaptiveK skips it
        if self.graphs is not None and self.graphs.fits(len(step)):
            timed = self.graphs.ready(len(step))
            logits, best = self.graphs.run(step)
        else:
            logits, best = self._forward(step, len(step)), None
        if (masked := seq.mask_stops(logits)) is not None:  # min_tokens: stop tokens are out, so the graph's argmax is too
            best = None
        tokens = choose_tokens(drafts, draft_probs, logits if masked is None else masked, seq.params, seq.generator, best)
        accepted = len(tokens) - 1
        self.cache.truncate(kept + 1 + accepted)  # forget the rejected drafts
        t2 = time.perf_counter()
        max_drafts = self.adaptive.k_max if self.drafter else 0
        for stats in (self.spec, seq.metrics.spec):  # before `append`, which may end the request and report its metrics
            stats.add(len(drafts), accepted, len(tokens), t1 - t0, t2 - t0, max_drafts)
        seq.append(tokens, MODE, logits=logits)
        if self.drafter and timed:
            self.adaptive.update(k, len(drafts), accepted, t1 - t0, t2 - t1)

    def _forward(self, ids: list[int], logit_rows: int) -> torch.Tensor:
        """Run `ids` after the cached sequence; return the logits [logit_rows, V] of the last `logit_rows` of them."""
        if self.native is not None and (len(ids) <= self.adaptive.k_max + 1 or self.native_prefill):
            for i in range(0, len(ids) - self.prefill_rows, self.prefill_rows):  # a long prompt: chunks but the last
                self.native.forward(ids[i:i + self.prefill_rows], self.cache, 0)
            return self.native.forward(ids[-((len(ids) - 1) % self.prefill_rows + 1):], self.cache, logit_rows)
        hidden = self.model(torch.tensor(ids, device=self.model.device), self.cache.extend(ids), self.cache)
        if self.native is not None:  # the head every native step uses, exact, and faster than the dense model's
            return self.native.head(hidden[-logit_rows:])
        return self.model.logits(hidden[-logit_rows:])
