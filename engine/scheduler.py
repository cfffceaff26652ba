"""Batched mode's scheduler: which sequences run in the next step, and how many of their tokens.

Iteration-level, as in Orca: the batch is decided again before every step, so a sequence joins as soon
as there is room and leaves the moment it finishes. One token budget per step is shared, as in vLLM V1 and
Sarathi-Serve: running sequences go first (a decode costs one token), then waiting ones are admitted.
With chunked prefill a prompt is cut to what is left of the budget, so decodes never wait behind a long
prompt; without it a prompt always runs whole in one step, and the decodes in that step wait for it
(prefill interference, visible as a TBT spike). When a running sequence needs a block and none is free,
the newest running sequence is preempted: its blocks are released and it goes back to the front of the
queue to be recomputed from its tokens (prefix caching often finds them still there).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.sequence import Sequence


@dataclass(frozen=True)
class BatchPolicy:
    """How batched mode schedules. Immutable: the engine swaps in a new one between steps (`Engine.set_policy`)."""

    max_batch_size: int = 32  # sequences per step
    token_budget: int = 64  # tokens per step: decodes plus prefill chunks
    chunked_prefill: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.max_batch_size < self.token_budget:
            raise ValueError(f"max_batch_size must be in [1, token_budget - 1] = [1, {self.token_budget - 1}] so that a "
                             f"full batch of decodes leaves room for prefill, got {self.max_batch_size}")


@dataclass(eq=False)
class PagedSeq:
    """A sequence in batched mode and the cache blocks it holds."""

    seq: Sequence
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens of seq.all_ids whose k/v are in the cache
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of its full, computed blocks

    @property
    def num_tokens(self) -> int:
        return len(self.seq.prompt_ids) + len(self.seq.output_ids)


def chunk(pending: int, budget: float, chunked_prefill: bool, prefilling: bool) -> int:
    """How many of a sequence's `pending` tokens run in a step with `budget` tokens left (0: none); `prefilling`: a
    prompt (or part of one) is in the step already. The one rule, for the scheduler and for serve/queueing.py's model."""
    if budget <= 0:  # an unsplit prompt overran it: nothing more this step
        return 0
    if chunked_prefill or pending == 1:
        return int(min(pending, budget))
    return pending if pending <= budget or not prefilling else 0  # an unsplit prompt may overrun the budget alone


def fails_to_fit(seq: Sequence, blocks: BlockManager, max_seq_len: int) -> bool:
    """Fail `seq` now if even alone it would outgrow the cache (at its longest), rather than stall it forever."""
    longest = min(len(seq.prompt_ids) + seq.params.max_tokens, max_seq_len)
    if blocks.blocks_for(longest) <= blocks.num_blocks:
        return False
    seq.fail(ValueError(f"a sequence of up to {longest} tokens needs {blocks.blocks_for(longest)} KV blocks; "
                        f"the cache has {blocks.num_blocks}"))
    return True


class Scheduler:
    def __init__(self, blocks: BlockManager, max_seq_len: int, policy: BatchPolicy):
        self.blocks = blocks
        self.max_seq_len = max_seq_len
        self.policy = policy
        self.waiting: deque[PagedSeq] = deque()  # hold no blocks
        self.running: list[PagedSeq] = []  # oldest first
        self.preemptions = 0
        self.cached_tokens = 0  # prompt tokens whose k/v came from the prefix cache

    def add(self, seq: Sequence) -> None:
        if not fails_to_fit(seq, self.blocks, self.max_seq_len):
            self.waiting.append(PagedSeq(seq))

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def schedule(self) -> list[tuple[PagedSeq, int]]:
        """The next step's batch: (sequence, number of its pending tokens to run), running ones first."""
        self._drop_cancelled()
        policy = self.policy  # one policy for the whole step, even if the engine swaps it meanwhile
        budget = policy.token_budget
        batch: list[tuple[PagedSeq, int]] = []
        prefilling = False  # a prompt (or part of one) is in this step already
        preemptions = self.preemptions
        i = 0
        while i < len(self.running):  # preemption pops from the tail, so the sequences before i stay
            s = self.running[i]
            n = self._chunk(s, policy, budget, prefilling)
            if n == 0 or not self._grow_or_preempt(s, n):
                break
            batch.append((s, n))
            budget -= n
            prefilling |= n > 1
            i += 1
        preempted = self.preemptions > preemptions
        # Admit waiting sequences; not in a step that had to preempt, or they would take back the freed blocks.
        while self.waiting and not preempted and len(self.running) < policy.max_batch_size:
            s = self.waiting[0]
            s.block_table, s.block_hashes = self.blocks.share_prefix(s.seq.all_ids)
            s.num_computed = len(s.block_table) * self.blocks.block_size
            n = self._chunk(s, policy, budget, prefilling)
            if n == 0 or not self.blocks.grow(s.block_table, s.num_computed + n):
                self._release(s)
                break
            self.waiting.popleft()
            self.running.append(s)
            self.cached_tokens += s.num_computed
            s.seq.metrics.cached_tokens = min(s.num_computed, len(s.seq.prompt_ids))
            s.seq.mark_scheduled()
            batch.append((s, n))
            budget -= n
            prefilling |= n > 1
        return batch

    def _chunk(self, s: PagedSeq, policy: BatchPolicy, budget: int, prefilling: bool) -> int:
        return chunk(s.num_tokens - s.num_computed, budget, policy.chunked_prefill, prefilling)

    def _grow_or_preempt(self, s: PagedSeq, n: int) -> bool:
        """Make room for s's next n tokens, preempting the newest running sequences if needed; False if s itself was."""
        while not self.blocks.grow(s.block_table, s.num_computed + n):
            victim = self.running.pop()
            self._release(victim)
            self.waiting.appendleft(victim)
            self.preemptions += 1
            if victim is s:
                return False
        return True

    def advance(self, batch: list[tuple[PagedSeq, int]]) -> None:
        """After the forward pass: the batch's tokens are in the cache; register newly full blocks."""
        for s, n in batch:
            s.num_computed += n
            self.blocks.cache_full_blocks(s.block_table, s.block_hashes, s.seq.all_ids, s.num_computed)

    def remove_finished(self) -> None:
        for s in self.running:
            if s.seq.finished:
                self._release(s)
        self.running = [s for s in self.running if not s.seq.finished]

    def take_all(self) -> list[Sequence]:
        """Remove every sequence and free its blocks (mode switch); their tokens stay in the sequences."""
        seqs = [s.seq for s in self.running] + [s.seq for s in self.waiting]
        for s in self.running:
            self._release(s)
        self.running.clear()
        self.waiting.clear()
        return seqs

    def _drop_cancelled(self) -> None:
        for s in self.running + list(self.waiting):
            if s.seq.cancelled:
                s.seq.finish("cancelled")
        self.remove_finished()
        if any(s.seq.finished for s in self.waiting):
            self.waiting = deque(s for s in self.waiting if not s.seq.finished)

    def _release(self, s: PagedSeq) -> None:
        self.blocks.release(s.block_table)
        s.block_hashes = []
        s.num_computed = 0
