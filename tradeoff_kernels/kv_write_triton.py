"""Fused KV-cache write: new k and v [T, n_kv_heads, D] into their paged slots in one launch, one program
per token. Reference: tradeoff_kernels.reference.write_kv_cache."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, block_size, n_heads, head_dim,
                     k_stride_t, k_stride_h, v_stride_t, v_stride_h, kc_stride_blk, kc_stride_slot, kc_stride_h,
                     vc_stride_blk, vc_stride_slot, vc_stride_h, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    if slot >= 0:  # negative slots mark padding tokens
        mask = (h < n_heads) & (d < head_dim)
        blk, off = slot // block_size, slot % block_size
        k = tl.load(k_ptr + t * k_stride_t + h * k_stride_h + d, mask=mask)
        v = tl.load(v_ptr + t * v_stride_t + h * v_stride_h + d, mask=mask)
        tl.store(k_cache_ptr + blk * kc_stride_blk + off * kc_stride_slot + h * kc_stride_h + d,
                 k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + blk * vc_stride_blk + off * vc_stride_slot + h * vc_stride_h + d,
                 v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    T, n_heads, head_dim = k.shape
    if (v.shape != k.shape or k_cache.shape[2:] != (n_heads, head_dim) or v_cache.shape != k_cache.shape
            or slot_mapping.shape != (T,) or k.stride(-1) != 1 or v.stride(-1) != 1 or k_cache.stride(-1) != 1
            or v_cache.stride(-1) != 1):
        raise ValueError(f"write_kv_cache: k {tuple(k.shape)}, v {tuple(v.shape)}, caches {tuple(k_cache.shape)}/"
                         f"{tuple(v_cache.shape)}, slot_mapping {tuple(slot_mapping.shape)} do not fit the layout")
    if T == 0:
        return
    _write_kv_kernel[(T,)](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1], n_heads, head_dim, k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_D=triton.next_power_of_2(head_dim))
