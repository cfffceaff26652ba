"""A worker process of disaggregated mode (engine/disaggregated.py drives two): the prefill worker runs prompts and
hands their k/v over, the decode worker runs decode steps, each on its own threads.

Tensors never cross the pipe. The weights, both paged KV caches and both logits buffers are shared memory, made
by the engine's process and mapped by every worker (`share`); a message names token ids, positions and block
numbers, as frozen dataclasses. The hand-off is the prefill worker copying the prompt's blocks from the prefill
cache into the decode-cache blocks the engine reserved for it: one copy, block by block, as a KV connector moves
blocks between two servers' caches (NIXL, Mooncake) without staging them anywhere else.

A worker decides nothing: which tokens, which blocks and what to sample are the engine's. It imports only what a
model step needs, and ends when the engine closes its pipe or dies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

import torch

from engine.kv_cache import PagedKVCache
from engine.model import Transformer

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class Prefill:
    """Compute `tokens`, which start at position `start` (the prefill cache holds the k/v before it, a cached
    prefix), into the prefill cache's blocks `table`; put the last row's logits in the prefill logits buffer; then
    copy the prompt's blocks into the decode cache's blocks `handoff` (one per block of the prompt)."""

    tokens: list[int]
    start: int
    table: list[int]
    handoff: list[int]


@dataclass(frozen=True)
class Prefilled:
    prefill_s: float  # the forward pass
    handoff_s: float  # the copy into the decode cache
    handoff_bytes: int


@dataclass(frozen=True)
class Decode:
    """One decode step: sequence i feeds tokens[i] at position context_lens[i] - 1, over its decode-cache blocks
    tables[i]; row i of the decode logits buffer receives its logits."""

    tokens: list[int]
    context_lens: list[int]
    tables: list[list[int]]


@dataclass(frozen=True)
class Decoded:
    seconds: float


@dataclass(frozen=True)
class Ready:
    """Sent once, when the worker has mapped the shared memory and can take jobs."""


@dataclass(frozen=True)
class Failed:
    """The job raised; the worker lives on."""

    error: str


@dataclass
class Shared:
    """What both workers map: the model, the two paged caches, and where each worker leaves its logits."""

    model: Transformer
    prefill_cache: PagedKVCache
    decode_cache: PagedKVCache
    prefill_logits: torch.Tensor  # [1, V] float32: the prompt's last row
    decode_logits: torch.Tensor  # [max rows, V] float32: one row per sequence of a decode step


def share(model: Transformer, num_blocks: int, block_size: int, max_rows: int, decode_kernel: str = "sdpa") -> Shared:
    """Move the model's weights into shared memory and make the caches and logits buffers there. Raises OSError or
    RuntimeError when shared memory is missing or too small."""
    model.share_memory()
    cfg, dtype = model.cfg, model.dtype
    caches = [PagedKVCache(cfg, num_blocks, block_size, dtype, decode_kernel=decode_kernel) for _ in ROLES]
    for cache in caches:
        cache.k.share_memory_()
        cache.v.share_memory_()
    logits = [torch.zeros(rows, cfg.vocab_size).share_memory_() for rows in (1, max_rows)]
    return Shared(model, caches[0], caches[1], logits[0], logits[1])


def serve(role: str, shared: Shared, conn: Connection, threads: int) -> None:
    """The worker's life (the target of its process): say Ready, then answer jobs until the pipe closes."""
    torch.set_num_threads(threads)
    run = prefill if role == "prefill" else decode
    conn.send(Ready())
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the engine closed the pipe, or its process is gone
            return
        if job is None:
            return
        try:
            reply: Prefilled | Decoded | Failed = run(shared, job)
        except Exception as e:  # this job failed; its requests fail, the worker takes the next
            reply = Failed(f"{type(e).__name__}: {e}")
        conn.send(reply)


@torch.inference_mode()
def prefill(shared: Shared, job: Prefill) -> Prefilled:
    t0 = time.perf_counter()
    model, cache = shared.model, shared.prefill_cache
    end = job.start + len(job.tokens)
    positions = cache.prepare([len(job.tokens)], [end], [job.table])
    hidden = model(torch.tensor(job.tokens), positions, cache)
    shared.prefill_logits[0] = model.logits(hidden[-1:])[0]
    t1 = time.perf_counter()
    target = shared.decode_cache
    for src, dst in zip(job.table, job.handoff):
        target.k[:, dst].copy_(cache.k[:, src])
        target.v[:, dst].copy_(cache.v[:, src])
    moved = 2 * len(job.handoff) * cache.k[:, 0].numel() * cache.k.element_size()
    return Prefilled(t1 - t0, time.perf_counter() - t1, moved)


@torch.inference_mode()
def decode(shared: Shared, job: Decode) -> Decoded:
    t0 = time.perf_counter()
    model, cache = shared.model, shared.decode_cache
    positions = cache.prepare([1] * len(job.tokens), job.context_lens, job.tables)
    hidden = model(torch.tensor(job.tokens), positions, cache)
    shared.decode_logits[:len(job.tokens)] = model.logits(hidden)
    return Decoded(time.perf_counter() - t0)
