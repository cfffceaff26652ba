"""Weight-only 4-bit GEMV/GEMM for 1..16 activation rows (decode and speculative verification).
Reference: tradeoff_kernels.reference.w4a16_linear; the packed layout is described in tradeoff_kernels/__init__.py.

One program computes BLOCK_N outputs for all rows. It streams packed bytes [BLOCK_N, BLOCK_K/2], splits
them into the even (low nibble) and odd (high nibble) columns, dequantises both in float32 with each
element's group scale and zero, and multiplies them by the even and odd columns of x. Decode is memory-bound,
so when N alone gives too few programs to fill the GPU, K is split too: each split writes a float32 partial,
and the partials are summed afterwards.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from tradeoff_kernels.device import num_sms

BLOCK_M = 16  # the smallest tile tl.dot accepts; rows past M are masked
BLOCK_N = 64
BLOCK_K = 128


def choose_split_k(N: int, K: int, sms: int) -> int:
    """Split K until the grid covers every SM about twice (never more splits than K tiles)."""
    return max(1, min(triton.cdiv(K, BLOCK_K), (2 * sms) // triton.cdiv(N, BLOCK_N)))


@triton.jit
def _w4a16_kernel(x_ptr, qw_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, group_size, split_k,
                  x_stride, qw_stride, s_stride, z_stride, out_stride_split, out_stride_m,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, BLOCK_K // 2)  # byte j of a tile holds elements 2j (low nibble) and 2j + 1 (high nibble)
    m_ok = m < M
    n_ok = n < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, split_k * BLOCK_K):
        even = k0 + 2 * j
        k_ok = even < K
        w_mask = n_ok[:, None] & k_ok[None, :]
        packed = tl.load(qw_ptr + n[:, None].to(tl.int64) * qw_stride + (even // 2)[None, :], mask=w_mask, other=0)
        group = (even // group_size)[None, :]  # 2j and 2j + 1 share a group: group sizes are even
        scale = tl.load(scales_ptr + n[:, None] * s_stride + group, mask=w_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + n[:, None] * z_stride + group, mask=w_mask, other=0.0).to(tl.float32)
        w_even = ((packed & 0xF).to(tl.float32) * scale + zero).to(x_ptr.dtype.element_ty)
        w_odd = ((packed >> 4).to(tl.float32) * scale + zero).to(x_ptr.dtype.element_ty)
        x_mask = m_ok[:, None] & k_ok[None, :]
        x_even = tl.load(x_ptr + m[:, None] * x_stride + even[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_ptr + m[:, None] * x_stride + even[None, :] + 1, mask=x_mask, other=0.0)
        acc += tl.dot(x_even, tl.trans(w_even), input_precision="ieee")
        acc += tl.dot(x_odd, tl.trans(w_odd), input_precision="ieee")
    out = out_ptr + pid_k * out_stride_split + m[:, None] * out_stride_m + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 split_k: int | None = None) -> Tensor:
    K = x.shape[-1]
    N = qweight.shape[0]
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    groups = K // group_size
    if (M > BLOCK_M or K % group_size or group_size % 2 or qweight.shape != (N, K // 2) or qweight.dtype != torch.uint8
            or scales.shape != (N, groups) or zeros.shape != (N, groups)
            or any(t.stride(-1) != 1 for t in (x2, qweight, scales, zeros))):
        raise ValueError(f"w4a16_linear: x {tuple(x.shape)} (at most {BLOCK_M} rows), qweight {tuple(qweight.shape)} "
                         f"{qweight.dtype}, scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)}, group {group_size}")
    if split_k is None:
        split_k = choose_split_k(N, K, num_sms(x.device))
    # One split writes the output directly; several write float32 partials that are summed below.
    target = x2.new_empty((split_k, M, N), dtype=x.dtype if split_k == 1 else torch.float32)
    _w4a16_kernel[(triton.cdiv(N, BLOCK_N), split_k)](
        x2, qweight, scales, zeros, target, M, N, K, group_size, split_k,
        x2.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), target.stride(0), target.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    out = target[0] if split_k == 1 else target.sum(0).to(x.dtype)
    return out.view(*x.shape[:-1], N)
