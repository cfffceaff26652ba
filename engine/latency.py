"""Latency mode: batch size 1 on a static KV cache. One sequence runs at a time; the rest wait in FIFO order.

The cache keeps the k/v of the last sequence it ran, so a follow-up turn sharing a prefix with it
(system prompt, conversation so far) prefills only its new tokens.
"""

from __future__ import annotations

from collections import deque

import torch

from engine.kv_cache import StaticKVCache
from engine.model import Transformer
from engine.sequence import Sequence

MODE = "latency"


class LatencyRunner:
    def __init__(self, model: Transformer, max_seq_len: int):
        self.model = model
        self.max_seq_len = max_seq_len
        self.cache = StaticKVCache(model.cfg, max_seq_len, model.dtype, model.device)
        self.cache_ids: list[int] = []  # the token sequence whose k/v the cache holds
        self.queue: deque[Sequence] = deque()
        self._logits: torch.Tensor | None = None  # next-token logits of the running sequence

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
        self._logits = None
        return seqs

    def clear_cache(self) -> None:
        self.cache.truncate(0)
        self.cache_ids = []

    def step(self) -> None:
        """One model step for the sequence at the head: its prefill, or one decode step."""
        seq = self.queue[0]
        try:
            if seq.cancelled:
                seq.finish("cancelled")
            elif self._logits is None:
                seq.mark_scheduled()
                ids = seq.all_ids  # a sequence moved in from batched mode brings its output so far
                cached = self._reuse_prefix(ids)
                self._logits = self._forward(ids[cached:])
                self._emit(seq)
            else:
                self._logits = self._forward([seq.output_ids[-1]])
                self._emit(seq)
        except Exception as e:  # one bad request must not take the engine down
            self.clear_cache()
            seq.fail(e)
        if seq.finished:
            self.queue.popleft()
            self._logits = None

    # ---- internals --------------------------------------------------------------------------

    def _emit(self, seq: Sequence) -> None:
        seq.append([seq.sample(self._logits)], MODE)
        if not seq.finished and len(seq.all_ids) >= self.max_seq_len:
            seq.finish("length")

    def _forward(self, ids: list[int]) -> torch.Tensor:
        """Run `ids` after the cached sequence; return the logits of the last one."""
        positions = self.cache.begin(len(ids))
        hidden = self.model(torch.tensor(ids, device=self.model.device), positions, self.cache)
        self.cache_ids += ids
        return self.model.logits(hidden[-1])

    def _reuse_prefix(self, ids: list[int]) -> int:
        """Keep the cached k/v of the longest common prefix (leaving at least one token to run)."""
        n = 0
        limit = min(len(ids) - 1, len(self.cache_ids))
        while n < limit and ids[n] == self.cache_ids[n]:
            n += 1
        self.cache.truncate(n)
        del self.cache_ids[n:]
        return n
