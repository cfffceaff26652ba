"""Rotary embedding applied in place to q and k: one program per token rotates all its q and k heads.
Reference: tradeoff_kernels.reference.rotary_embedding."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rotate_heads(ptr, stride_h, n_heads, cos, sin, half,
                  INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    i = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:  # pair i is (2i, 2i + 1)
        first, second = 2 * i, 2 * i + 1
    else:  # rotate-half: pair i is (i, i + D/2)
        first, second = i, i + half
    mask = (heads[:, None] < n_heads) & (i[None, :] < half)
    p1 = ptr + heads[:, None] * stride_h + first[None, :]
    p2 = ptr + heads[:, None] * stride_h + second[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos - x2 * sin).to(ptr.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * cos + x1 * sin).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr, q_stride_t, q_stride_h, k_stride_t, k_stride_h,
                   cos_stride, sin_stride, n_q_heads, n_k_heads, half,
                   INTERLEAVED: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    i = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * cos_stride + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + pos * sin_stride + i, mask=i < half, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr + t * q_stride_t, q_stride_h, n_q_heads, cos, sin, half, INTERLEAVED, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr + t * k_stride_t, k_stride_h, n_k_heads, cos, sin, half, INTERLEAVED, BLOCK_HK, BLOCK_HALF)


def rotary_embedding(q: Tensor, k: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> None:
    T, n_q_heads, head_dim = q.shape
    if k.shape[0] != T or k.shape[2] != head_dim or q.stride(-1) != 1 or k.stride(-1) != 1 or head_dim % 2:
        raise ValueError(f"rotary_embedding: q {tuple(q.shape)} and k {tuple(k.shape)} must be [T, heads, D] with even D, "
                         "last dim contiguous")
    if T == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(T,)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0), sin.stride(0),
        n_q_heads, k.shape[1], half, INTERLEAVED=interleaved, BLOCK_HQ=triton.next_power_of_2(n_q_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]), BLOCK_HALF=triton.next_power_of_2(half))
