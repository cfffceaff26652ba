"""CUDA graphs for latency mode's target step (batch 1, static KV cache) and batched mode's decode step (paged KV
cache), and token choice on the device.

A captured graph replays fixed kernels on fixed buffers, so the step it captures may hold no Python int that
changes from step to step. `GraphAttention` is the static cache's attention written that way: the new k/v go in
with index_copy_ at a device tensor of positions, and the queries attend over a fixed window of the cache through
a mask built from the same positions. `DecodeGraphs` captures one graph per (rows, window) bucket on first use:
rows is 1 for a plain decode step or the k + 1 of a speculative verification, padded up to a power of two; the
window is the next power of two from `MIN_WINDOW` that holds the sequence, so a step reads at most twice the keys
it needs. Padding rows come after the real ones, so the causal mask hides them from the real rows; their k/v land
past the cache's length, where later steps overwrite them.

Nothing in the step syncs with the host: greedy argmax runs inside the graph, sampled tokens are drawn on the
device (`engine.speculative.choose_tokens`), and each step reads back its tokens once.

`BatchedDecodeGraphs` does the same for batched mode's decode-only steps (one new token for each sequence) over the
paged cache: one graph per batch-size bucket (1, 2, 4, ...), the batch padded to its bucket, the inputs (token ids,
positions, slots, lengths, block tables) in one static buffer. The fused kernels take the block tables and lengths
as tensors and size their grids by the tables' fixed width, so one graph serves every context length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

import tradeoff_kernels
from engine.kv_cache import PagedKVCache, StaticKVCache
from engine.model import Transformer
from tradeoff_kernels import Kernels

MIN_WINDOW = 256  # keys attended by the smallest window; small enough that short chats read little padding

StepOutput = tuple[Tensor, Tensor]  # logits [rows, V] (float32) and their argmax [rows]


def bucket(n: int) -> int:
    """The next power of two >= n."""
    return 1 << (n - 1).bit_length()


class GraphAttention:
    """Attention over a `StaticKVCache`'s storage for the new tokens at `positions` (a device tensor), over its
    first `window` positions. Same maths as `StaticKVCache.attend`, without Python ints that change per step."""

    def __init__(self, cache: StaticKVCache, window: int):
        self.cache = cache
        self.window = window
        self._keys = torch.arange(window, device=cache.k.device)
        self.positions: Tensor | None = None
        self._hidden: Tensor | None = None

    def set_positions(self, positions: Tensor) -> None:
        """positions [T]: where the step's tokens go; token i sees keys 0..positions[i]."""
        self.positions = positions
        self._hidden = self._keys > positions[:, None]  # [T, window], built once per step for every layer

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T, H, D = q.shape
        KV = k.shape[1]
        k_cache, v_cache = self.cache.k[layer, 0], self.cache.v[layer, 0]  # [KV, max_seq_len, D]
        k_cache.index_copy_(1, self.positions, k.transpose(0, 1))
        v_cache.index_copy_(1, self.positions, v.transpose(0, 1))
        keys, values = k_cache[:, : self.window], v_cache[:, : self.window]
        # GQA as batched matmuls per KV head over the G query heads sharing it, for every new token: [KV, G * T, D]
        scores = torch.bmm(q.transpose(0, 1).reshape(KV, H // KV * T, D), keys.transpose(1, 2)).mul_(D**-0.5)
        scores = scores.view(KV, H // KV, T, self.window).masked_fill_(self._hidden, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
        out = torch.bmm(probs.view(KV, H // KV * T, self.window), values)  # [KV, G * T, D] = [H, T, D]
        return out.view(H, T, D).transpose(0, 1).reshape(T, H * D)


class KernelAttention:
    """Attention over a `StaticKVCache`'s storage through the fused kernels (`model.kernels`): each layer's
    [n_kv_heads, max_seq_len, D] storage seen as one page of max_seq_len slots, so the paged KV write and the paged
    flash-decoding kernel serve the static cache. The kernel reads only the keys up to each row's position, and its
    split count comes from the page's fixed size, so one graph per row count serves every context length."""

    def __init__(self, cache: StaticKVCache, ops: Kernels):
        self.cache = cache
        self.ops = ops
        self._table = torch.zeros(1, 1, dtype=torch.int32, device=cache.k.device)
        self._lens: Tensor | None = None
        self._slots: Tensor | None = None

    def set_positions(self, positions: Tensor) -> None:
        """positions [T], consecutive: where the step's tokens go; token i sees keys 0..positions[i]."""
        self._slots = positions
        self._lens = (positions[-1:] + 1).to(torch.int32)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T, H, D = q.shape
        k_cache = self.cache.k[layer, 0].transpose(0, 1).unsqueeze(0)  # [1 page, max_seq_len slots, KV, D]
        v_cache = self.cache.v[layer, 0].transpose(0, 1).unsqueeze(0)
        self.ops.write_kv_cache(k, v, k_cache, v_cache, self._slots)
        return self.ops.paged_decode_attention(q.unsqueeze(0), k_cache, v_cache, self._table, self._lens).reshape(T, H * D)


class StaticStep:
    """The target step for `rows` tokens, reading its inputs from `inputs` = [first position, token ids...]."""

    def __init__(self, model: Transformer, cache: StaticKVCache, inputs: Tensor, rows: int, window: int):
        self.model = model
        self.inputs = inputs
        self.rows = rows
        self.attention = GraphAttention(cache, window) if model.kernels is None else KernelAttention(cache, model.kernels)
        self._offsets = torch.arange(rows, device=inputs.device)

    @torch.inference_mode()
    def __call__(self) -> StepOutput:
        positions = self.inputs[0] + self._offsets
        self.attention.set_positions(positions)
        logits = self.model.logits(self.model(self.inputs[1 : 1 + self.rows], positions, self.attention))
        return logits, logits.argmax(dim=-1)


class DecodeGraphs:
    """Latency mode's decode/verify steps of up to `max_rows` tokens, replayed from CUDA graphs.

    The cache's prefill stays eager (`StaticKVCache.attend`) and writes the same storage the graphs read.
    capture=False runs the same static step eagerly (the CPU tests check it against the eager path). compile_mode
    ("reduce-overhead", "max-autotune") hands each step to torch.compile instead of capturing it here: the gpt-fast
    way, which the GPU benchmark (bench/gpu_decode.py) times against our graphs over the fused kernels.
    """

    def __init__(self, model: Transformer, cache: StaticKVCache, max_rows: int, capture: bool = True,
                 compile_mode: str | None = None):
        self.model = model
        self.cache = cache
        self.max_rows = bucket(max_rows)
        self.capture = capture and compile_mode is None
        self.compile_mode = compile_mode
        self.inputs = torch.zeros(1 + self.max_rows, dtype=torch.long, device=cache.k.device)
        self._steps: dict[tuple[int, int], Callable[[], StepOutput]] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None  # one memory pool shared by every graph

    def fits(self, n: int) -> bool:
        """Can a step of `n` tokens run here (else the caller runs it eagerly)?"""
        return n <= self.max_rows and self.cache.length + bucket(n) <= self.cache.max_seq_len

    def ready(self, n: int) -> bool:
        """Is the graph for a step of `n` tokens captured already (else `run` captures it first, which takes longer)?"""
        return self._shape(n) in self._steps

    def run(self, ids: list[int]) -> StepOutput:
        """Run `ids` after the cached tokens (extending the cache by them); logits [len(ids), V] and their argmax."""
        n = len(ids)
        shape = self._shape(n)
        # One host-to-device copy per step; padding rows keep earlier (valid) ids. non_blocking: a pageable source is
        # staged at once, so this does not wait for the device.
        self.inputs[: 1 + n].copy_(torch.tensor([self.cache.length, *ids]), non_blocking=True)
        self.cache.record(ids)
        step = self._steps.get(shape) or self._build(*shape)
        logits, best = step()
        return logits[:n], best[:n]

    def _shape(self, n: int) -> tuple[int, int]:
        """(rows, window) of the graph for `n` tokens after the cached ones (the fused kernels need no window)."""
        rows = bucket(n)
        if self.model.kernels is not None:
            return rows, self.cache.max_seq_len
        return rows, min(max(MIN_WINDOW, bucket(self.cache.length + rows)), self.cache.max_seq_len)

    def _build(self, rows: int, window: int) -> Callable[[], StepOutput]:
        step: Callable[[], StepOutput] = StaticStep(self.model, self.cache, self.inputs, rows, window)
        if self.compile_mode is not None:  # torch.compile's own graphs ("reduce-overhead") instead of ours
            step = torch.compile(step, mode=self.compile_mode)
        elif self.capture:
            step = capture_graph(step, self._pool)
        self._steps[rows, window] = step
        return step


def capture_graph(step: Callable[[], StepOutput], pool: tuple) -> Callable[[], StepOutput]:
    """`step` captured in a CUDA graph (allocating from `pool`); the returned call replays it."""
    # Warm up on a side stream first (cuBLAS workspaces, Triton compiles, lazy initialisation), as torch's graph docs
    # ask. The inputs already hold this step's tokens, so the warm-up writes the same k/v the replay will write.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: CUDA work on other threads (another engine, the voice server) must not break the capture
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = step()

    def replay() -> StepOutput:
        graph.replay()
        return out

    return replay


class PagedGraphAttention:
    """Attention over a `PagedKVCache` for one new token per row, from static buffers: slots [rows] (-1: write
    nowhere), block tables [rows, max_blocks] and lengths [rows] (this token included). The fused kernels (their
    references on the CPU) read them as tensors, so no Python int changes from step to step."""

    def __init__(self, cache: PagedKVCache, slots: Tensor, tables: Tensor, lens: Tensor):
        self.cache = cache
        self.slots = slots
        self.tables = tables
        self.lens = lens

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        tradeoff_kernels.write_kv_cache(k, v, k_cache, v_cache, self.slots)
        out = tradeoff_kernels.paged_decode_attention(q.unsqueeze(1), k_cache, v_cache, self.tables, self.lens)
        return out.reshape(q.shape[0], -1)


class PagedStep:
    """Batched mode's decode step for the first `rows` rows of the inputs of a `BatchedDecodeGraphs`."""

    def __init__(self, model: Transformer, graphs: BatchedDecodeGraphs, rows: int):
        self.model = model
        self.tokens = graphs.tokens[:rows]
        self.positions = graphs.positions[:rows]
        self.attention = PagedGraphAttention(graphs.cache, graphs.slots[:rows], graphs.tables[:rows], graphs.lens[:rows])

    @torch.inference_mode()
    def __call__(self) -> StepOutput:
        logits = self.model.logits(self.model(self.tokens, self.positions, self.attention))
        return logits, logits.argmax(dim=-1)


class BatchedDecodeGraphs:
    """Batched mode's decode steps of up to `max_batch` sequences (one new token each), replayed from CUDA graphs.

    The inputs live in one int32 device buffer, [tokens | positions | slots | lengths] of `max_batch` rows each, then
    the block tables [max_batch, max_blocks], refilled with one host-to-device copy per step. A padding row has
    slot -1, so it writes nowhere, and length 1 over block 0, so it reads one key. Steps with prefill chunks, and
    larger batches, stay on the eager path (`fits`). capture=False runs the same step eagerly (the CPU tests check
    it against the eager path).
    """

    def __init__(self, model: Transformer, cache: PagedKVCache, max_batch: int, max_seq_len: int, capture: bool = True):
        self.model = model
        self.cache = cache
        self.max_batch = bucket(max_batch)
        self.max_blocks = -(-max_seq_len // cache.block_size)
        self.capture = capture
        M = self.max_batch
        self._host = torch.zeros(4 * M + M * self.max_blocks, dtype=torch.int32)
        self._fields = self._host[: 4 * M].numpy().reshape(4, M)  # numpy views: filling them from lists is fast
        self._host_tables = self._host[4 * M :].numpy().reshape(M, self.max_blocks)
        self.inputs = torch.zeros_like(self._host, device=cache.device)
        self.tokens, self.positions, self.slots, self.lens = self.inputs[: 4 * M].view(4, M)
        self.tables = self.inputs[4 * M :].view(M, self.max_blocks)
        self._steps: dict[int, Callable[[], StepOutput]] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None  # one memory pool shared by every graph

    def fits(self, query_lens: list[int], context_lens: list[int]) -> bool:
        """Can this step run here: decodes only, few enough of them, short enough (else the caller runs it eagerly)?"""
        return (len(query_lens) <= self.max_batch and all(n == 1 for n in query_lens)
                and max(context_lens) <= self.max_blocks * self.cache.block_size)

    def run(self, tokens: list[int], context_lens: list[int], block_tables: list[list[int]]) -> StepOutput:
        """One new token per sequence: tokens[i] at position context_lens[i] - 1 of the sequence whose blocks are
        block_tables[i]; logits [len(tokens), V] and their argmax."""
        n, rows, bs = len(tokens), bucket(len(tokens)), self.cache.block_size
        positions = [c - 1 for c in context_lens]
        slots = [table[p // bs] * bs + p % bs for table, p in zip(block_tables, positions)]
        self._fields[:, :n] = [tokens, positions, slots, context_lens]
        self._fields[:, n:rows] = [[0], [0], [-1], [1]]  # padding rows: token 0 at position 0, no slot, one key
        for i, (table, c) in enumerate(zip(block_tables, context_lens)):
            used = -(-c // bs)  # entries past these are never read: no need to clear them
            self._host_tables[i, :used] = table[:used]
        self._host_tables[n:rows, 0] = 0
        # One host-to-device copy, up to the last table row the step reads. The source is pageable, so the copy has
        # taken it by the time copy_ returns and the next step may refill it.
        end = 4 * self.max_batch + rows * self.max_blocks
        self.inputs[:end].copy_(self._host[:end], non_blocking=True)
        step = self._steps.get(rows) or self._build(rows)
        logits, best = step()
        return logits[:n], best[:n]

    def _build(self, rows: int) -> Callable[[], StepOutput]:
        step = PagedStep(self.model, self, rows)
        self._steps[rows] = capture_graph(step, self._pool) if self.capture else step
        return self._steps[rows]
