"""Paged decode attention, flash-decoding style. Reference: tradeoff_kernels.reference.paged_decode_attention.

Stage 1: one program per (sequence, KV head, split). It loads every query row that shares the KV head
(new tokens x query heads of the group, so GQA reads each key once), walks its share of the sequence in
BLOCK_N-token tiles gathered through the block table, and keeps an online softmax. Stage 2 merges the
splits' partial outputs by their log-sum-exp. With one split, stage 1 writes the output directly.
Scores are kept in base 2 (exp2/log2), with log2(e) folded into the softmax scale.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from tradeoff_kernels.device import num_sms

BLOCK_N = 64  # keys per tile; independent of the cache's block size (pages are gathered per token)
MIN_SPLIT_TOKENS = 128  # two tiles: a shorter split does too little to pay for its share of the merge (untuned)


def choose_num_splits(max_seq_len: int, batch: int, n_kv_heads: int, sms: int) -> int:
    """Enough splits that batch x KV heads x splits covers every SM twice, none shorter than MIN_SPLIT_TOKENS."""
    wanted = triton.cdiv(2 * sms, batch * n_kv_heads)
    return max(1, min(wanted, max_seq_len // MIN_SPLIT_TOKENS))


@triton.jit
def _split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_table_ptr, seq_lens_ptr, out_ptr, part_out_ptr, part_lse_ptr,
                  scale_log2, num_splits, block_size, head_dim, n_heads,
                  q_stride_b, q_stride_t, q_stride_h, kc_stride_blk, kc_stride_slot, kc_stride_h,
                  vc_stride_blk, vc_stride_slot, vc_stride_h, bt_stride_b, o_stride_b, o_stride_t, o_stride_h,
                  N_NEW: tl.constexpr, GROUP: tl.constexpr, ONE_SPLIT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    rows = tl.arange(0, BLOCK_M)  # row = new token t * GROUP + head g within the group
    t = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = rows < N_NEW * GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(q_ptr + b * q_stride_b + t[:, None] * q_stride_t + head[:, None] * q_stride_h + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    q_pos = seq_len - N_NEW + t  # new token t sits here and sees keys 0..q_pos (causal among the new tokens)
    per_split = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        page = tl.load(block_table_ptr + b * bt_stride_b + n // block_size, mask=n_ok, other=0).to(tl.int64)
        slot = n % block_size
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + page[:, None] * kc_stride_blk + slot[:, None] * kc_stride_slot + kv_head * kc_stride_h
                    + d[None, :], mask=kv_mask, other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        scores = tl.where((n[None, :] <= q_pos[:, None]) & n_ok[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no visible key yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(scores - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_cache_ptr + page[:, None] * vc_stride_blk + slot[:, None] * vc_stride_slot + kv_head * vc_stride_h
                    + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    seen = l_i > 0  # false for rows whose keys all fall in other splits
    if ONE_SPLIT:
        o_ptrs = out_ptr + b * o_stride_b + t[:, None] * o_stride_t + head[:, None] * o_stride_h + d[None, :]
        tl.store(o_ptrs, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    else:
        part = ((b * N_NEW + t) * n_heads + head) * num_splits + split  # partials are [B, N_NEW, H, splits, (D)]
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        tl.store(part_out_ptr + part[:, None] * head_dim + d[None, :], o, mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _merge_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_splits, head_dim, o_stride_b, o_stride_t, o_stride_h,
                  BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    head = tl.program_id(2)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_ok = s < num_splits
    part = ((b * tl.num_programs(1) + t) * tl.num_programs(2) + head) * num_splits + s
    lse = tl.load(part_lse_ptr + part, mask=s_ok, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # split 0 holds key 0, which every row sees: the max is finite
    o = tl.load(part_out_ptr + part[:, None] * head_dim + d[None, :], mask=s_ok[:, None] & (d[None, :] < head_dim), other=0.0)
    merged = tl.sum(weight[:, None] * o, axis=0) / tl.sum(weight, axis=0)
    tl.store(out_ptr + b * o_stride_b + t * o_stride_t + head * o_stride_h + d, merged.to(out_ptr.dtype.element_ty),
             mask=d < head_dim)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                           scale: float | None = None, num_splits: int | None = None) -> Tensor:
    B, n_new, n_heads, head_dim = q.shape
    _, block_size, n_kv_heads, _ = k_cache.shape
    if (n_heads % n_kv_heads or k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape or block_table.shape[0] != B
            or seq_lens.shape != (B,) or q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1):
        raise ValueError(f"paged_decode_attention: q {tuple(q.shape)}, caches {tuple(k_cache.shape)}/{tuple(v_cache.shape)}, "
                         f"block_table {tuple(block_table.shape)}, seq_lens {tuple(seq_lens.shape)} do not fit the layout")
    group = n_heads // n_kv_heads
    if num_splits is None:  # sized by the table's capacity, which the host knows without a sync
        num_splits = choose_num_splits(block_table.shape[1] * block_size, B, n_kv_heads, num_sms(q.device))
    scale = head_dim**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    one = num_splits == 1
    part_out = q.new_empty((B, n_new, n_heads, num_splits, head_dim), dtype=torch.float32) if not one else out
    part_lse = q.new_empty((B, n_new, n_heads, num_splits), dtype=torch.float32) if not one else out
    block_d = triton.next_power_of_2(head_dim)
    _split_kernel[(B, n_kv_heads, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, out, part_out, part_lse,
        scale * math.log2(math.e), num_splits, block_size, head_dim, n_heads,
        *q.stride()[:3], *k_cache.stride()[:3], *v_cache.stride()[:3], block_table.stride(0), *out.stride()[:3],
        N_NEW=n_new, GROUP=group, ONE_SPLIT=one, BLOCK_M=max(16, triton.next_power_of_2(n_new * group)),
        BLOCK_N=BLOCK_N, BLOCK_D=block_d)
    if not one:
        _merge_kernel[(B, n_new, n_heads)](part_out, part_lse, out, num_splits, head_dim, *out.stride()[:3],
                                            BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=block_d)
    return out
