"""KV caches. `StaticKVCache`: one preallocated sequence for batch-1 latency mode. `PagedKVCache`: fixed-size
blocks shared by many sequences, for batched mode (which block holds what is engine/block_manager.py's job).

The cache owns both the storage and the attention over it (`attend`), so the model never sees the
layout. `length` is the number of valid positions; rolling it back (`truncate`) is how speculative
decoding discards rejected tokens and how a cancelled request leaves the cache reusable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

import tradeoff_kernels
from engine.model import ModelConfig


class StaticKVCache:
    def __init__(self, cfg: ModelConfig, max_seq_len: int, dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (cfg.n_layers, 1, cfg.n_kv_heads, max_seq_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_seq_len = max_seq_len
        self.length = 0  # valid positions before the current forward
        self._start = 0  # where the current forward's tokens are written
        self.ids: list[int] = []  # the tokens whose k/v are held, when added through `extend`

    def begin(self, n_new: int) -> Tensor:
        """Reserve room for `n_new` tokens and return their positions."""
        return torch.arange(self.reserve(n_new), self.length, device=self.k.device)

    def reserve(self, n_new: int) -> int:
        """`begin` without the positions tensor; returns the first position."""
        if self.length + n_new > self.max_seq_len:
            raise ValueError(f"KV cache full: {self.length} + {n_new} tokens > {self.max_seq_len}")
        self._start = self.length
        self.length += n_new
        return self._start

    def extend(self, ids: list[int]) -> Tensor:
        """`begin` for these tokens, remembering them so a later sequence can reuse a common prefix."""
        return torch.arange(self.record(ids), self.length, device=self.k.device)

    def record(self, ids: list[int]) -> int:
        """`extend` without the positions tensor (the CUDA-graph step builds them on the device); returns the first position."""
        start = self.reserve(len(ids))
        self.ids += ids
        return start

    def reuse_prefix(self, ids: list[int]) -> int:
        """Keep the k/v of the longest common prefix with `ids`, leaving at least one token of `ids` to run."""
        n = 0
        limit = min(len(ids) - 1, len(self.ids))
        while n < limit and ids[n] == self.ids[n]:
            n += 1
        self.truncate(n)
        return n

    def truncate(self, length: int) -> None:
        """Forget every position from `length` on."""
        self.length = min(self.length, length)
        del self.ids[length:]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        T, H, D = q.shape
        start, end = self._start, self._start + T
        self.k[layer, 0, :, start:end] = k.transpose(0, 1)
        self.v[layer, 0, :, start:end] = v.transpose(0, 1)
        keys, values = self.k[layer, 0, :, :end], self.v[layer, 0, :, :end]  # [KV, end, D]
        if T == 1:
            # Decode: three small ops instead of SDPA's dispatch (which costs more than the math at batch 1).
            kv = keys.shape[0]
            scores = torch.bmm(q.view(kv, H // kv, D), keys.transpose(1, 2)).mul_(D**-0.5)  # [KV, G, end]
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(values.dtype)
            return torch.bmm(probs, values).view(1, H * D)
        # Prefill / verification: query i sits at position start + i and sees keys 0..start + i.
        mask = torch.ones(T, end, dtype=torch.bool, device=q.device).tril(diagonal=start)
        out = F.scaled_dot_product_attention(q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0),
                                             attn_mask=mask, enable_gqa=True)
        return out[0].transpose(0, 1).reshape(T, -1)


# ---- batched mode: a paged cache shared by many sequences ----------------------------------------------


def decode_attention(q: Tensor, keys: Tensor, values: Tensor, pad: Tensor) -> Tensor:
    """One query token per sequence, as batched matmuls per KV head over the query heads that share it (GQA).

    q [B, H, D]; keys, values [B, C, KV, D]; pad [B, C], True past a sequence's end -> [B, H, D]. Once several
    times faster on the CPU than scaled_dot_product_attention with a padding mask (4.6 ms per layer at batch 16
    over 256 keys, bf16, 1 thread, on an earlier torch); with torch 2.13 on an AVX-512/AMX Xeon that is reversed
    (1.1 vs 0.36 ms at batch 16 over 208 keys in bf16, 0.76 vs 0.59 in fp32), so engine/setup.py measures both.
    """
    B, H, D = q.shape
    KV = keys.shape[2]
    q = q.reshape(B, KV, H // KV, D)
    out = torch.empty_like(q)
    for h in range(KV):
        scores = torch.bmm(q[:, h], keys[:, :, h].transpose(1, 2)).float() * D**-0.5  # [B, group, C]
        probs = torch.softmax(scores.masked_fill_(pad[:, None], float("-inf")), dim=-1)
        out[:, h] = torch.bmm(probs.to(values.dtype), values[:, :, h])
    return out.view(B, H, D)


def sdpa_decode_attention(q: Tensor, keys: Tensor, values: Tensor, pad: Tensor) -> Tensor:
    """`decode_attention` in one call of torch's fused attention (the keys' strided view, no copy)."""
    out = F.scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=~pad[:, None, None], enable_gqa=True)
    return out[:, :, 0]


DECODE_ATTENTION = {"sdpa": sdpa_decode_attention, "bmm": decode_attention}  # engine/setup.py picks one per CPU


class PagedKVCache:
    """k/v of many sequences in fixed-size blocks, and attention for one ragged batch step over them.

    Layout per layer: [num_blocks, block_size, n_kv_heads, head_dim] (the kernels package's layout). Before
    each forward, `prepare` is told every sequence's new-token count, context length and block table; then
    `attend` (called by the model per layer) writes the new k/v into their slots and attends each new token
    over its own sequence. Single-token queries (decodes) run together in padded groups of similar lengths (on the
    CPU through `decode_kernel`, one of DECODE_ATTENTION) or as one batch through the Triton paged-attention kernel
    on CUDA; prefill chunks run one sequence at a time.
    """

    def __init__(self, cfg: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: str | torch.device = "cpu", decode_kernel: str = "sdpa"):
        # zeros, not empty: padded key slots are masked out, but 0 * NaN garbage would still poison the sum
        shape = (cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.device = self.k.device
        self.decode_kernel = DECODE_ATTENTION[decode_kernel]

    def prepare(self, query_lens: list[int], context_lens: list[int], block_tables: list[list[int]]) -> Tensor:
        """Set up one step: sequence i runs query_lens[i] new tokens ending at position context_lens[i] - 1.
        Returns the positions of all new tokens, concatenated in sequence order."""
        bs, dev = self.block_size, self.device
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []  # the query row of each decode, in sequence order
        decode_seqs: list[int] = []
        self._prefills: list[tuple[int, int, Tensor, int, Tensor]] = []  # (first row, rows, blocks, context, mask)
        row = 0
        for i, (q_len, ctx, table) in enumerate(zip(query_lens, context_lens, block_tables)):
            start = ctx - q_len
            positions += range(start, ctx)
            slots += [table[p // bs] * bs + p % bs for p in range(start, ctx)]
            if q_len == 1:
                decode_rows.append(row)
                decode_seqs.append(i)
            else:  # query j sits at position start + j and sees keys 0..start + j
                mask = torch.ones(q_len, ctx, dtype=torch.bool, device=dev).tril(diagonal=start)
                blocks = torch.tensor(table[: -(-ctx // bs)], device=dev)
                self._prefills.append((row, q_len, blocks, ctx, mask))
            row += q_len
        self._slots = torch.tensor(slots, device=dev)
        widths = [-(-context_lens[i] // bs) for i in decode_seqs]
        # the Triton kernel reads each sequence's own blocks; the CPU path pads a group to its longest, so on the CPU
        # decodes of very different lengths attend in groups (one long context would make every row pay for it)
        groups = width_groups(widths) if dev.type != "cuda" else [list(range(len(widths)))] if widths else []
        self._decode_groups: list[tuple[slice | Tensor, Tensor, Tensor, Tensor]] = []  # (rows, tables, lens, pad)
        for group in groups:
            rows = [decode_rows[j] for j in group]
            width = max(widths[j] for j in group)
            tables = [block_tables[decode_seqs[j]][:widths[j]] for j in group]
            lens = torch.tensor([context_lens[decode_seqs[j]] for j in group], dtype=torch.int32, device=dev)
            self._decode_groups.append((
                slice(rows[0], rows[0] + len(rows)) if rows == list(range(rows[0], rows[0] + len(rows)))
                else torch.tensor(rows, device=dev),  # a slice needs no gather
                torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
                lens, torch.arange(width * bs, device=dev) >= lens[:, None]))  # pad: [B, keys], True past the end
        return torch.tensor(positions, device=dev)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        k_cache, v_cache = self.k[layer], self.v[layer]
        if self.device.type == "cuda":
            tradeoff_kernels.write_kv_cache(k, v, k_cache, v_cache, self._slots)
        else:
            k_cache.view(-1, *k.shape[1:])[self._slots] = k
            v_cache.view(-1, *v.shape[1:])[self._slots] = v
        out = torch.empty_like(q)
        for rows, tables, lens, pad in self._decode_groups:
            out[rows] = self._attend_decodes(q[rows], k_cache, v_cache, tables, lens, pad)
        for row, n, blocks, ctx, mask in self._prefills:  # 4-D inputs: 3-D ones took a much slower CPU path
            keys = k_cache.index_select(0, blocks).flatten(0, 1)[:ctx].transpose(0, 1)[None]  # [1, KV, ctx, D]
            values = v_cache.index_select(0, blocks).flatten(0, 1)[:ctx].transpose(0, 1)[None]
            o = F.scaled_dot_product_attention(q[row:row + n].transpose(0, 1)[None], keys, values, attn_mask=mask,
                                               enable_gqa=True)
            out[row:row + n] = o[0].transpose(0, 1)
        return out.view(q.shape[0], -1)

    def _attend_decodes(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, tables: Tensor, lens: Tensor,
                        pad: Tensor) -> Tensor:
        """q [B, H, D], one new token per sequence, over blocks `tables` [B, width] -> [B, H, D]."""
        if self.device.type == "cuda":
            return tradeoff_kernels.paged_decode_attention(q.unsqueeze(1), k_cache, v_cache, tables, lens)[:, 0]
        B, width = tables.shape
        blocks = tables.view(-1)  # index_select gathers ~6x faster than indexing with the table
        keys = k_cache.index_select(0, blocks).view(B, width * self.block_size, *k_cache.shape[2:])
        values = v_cache.index_select(0, blocks).view(B, width * self.block_size, *v_cache.shape[2:])
        return self.decode_kernel(q, keys, values, pad)


def width_groups(widths: list[int], slack: int = 8) -> list[list[int]]:
    """Indices of `widths` (blocks per sequence) in groups that attend together, shortest first: a group ends where a
    width passes twice its shortest and `slack` blocks more, so padding at most doubles a group's gather (rows of
    similar lengths, the usual case, stay one group)."""
    order = sorted(range(len(widths)), key=widths.__getitem__)
    groups: list[list[int]] = []
    for j in order:
        if groups and widths[j] <= max(2 * widths[groups[-1][0]], widths[groups[-1][0]] + slack):
            groups[-1].append(j)
        else:
            groups.append([j])
    return groups
