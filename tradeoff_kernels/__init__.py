"""Triton kernels for the hot decode path, each beside a plain-PyTorch reference with the same signature.

Pure functions over tensors: imports torch and triton only, never engine, voice or tui. Not named `kernels`:
that is Hugging Face's package, which transformers (from 5.25) installs, and it would shadow this one.

Each public function below runs the Triton kernel (tradeoff_kernels/*_triton.py) for CUDA tensors and the reference
(tradeoff_kernels/reference.py) otherwise. Triton is imported only where CUDA exists, so CPU-only machines need
neither, and tests can turn on TRITON_INTERPRET=1 before any kernel is defined. `Kernels` names one
implementation of every op, for a caller that must choose it itself: the engine's fused decode path takes
`triton_kernels()` on CUDA, and the tests give it the same kernels on CPU tensors under the interpreter.

Layouts shared with the engine:
- Paged KV cache: k_cache, v_cache [num_blocks, block_size, n_kv_heads, head_dim]; token i of a sequence
  lives in block block_table[seq, i // block_size] at offset i % block_size. block_table [batch, max_blocks]
  int32; seq_lens [batch] int32: tokens in the cache, including this step's new ones. A slot is
  block * block_size + offset; slot_mapping [T] gives each new token's slot, -1 for padding tokens.
- 4-bit weights (W4A16), for a float weight [N, K] with groups of G consecutive K elements (G = 32, 64, 128):
  qweight uint8 [N, K//2], byte j of a row holds element 2j in its low nibble and 2j + 1 in its high nibble;
  scales, zeros [N, K//G], fp16 by default (the kernel reads them in float32); w = q * scale + zero with q in
  0..15 (GGUF Q4_1 with scale = d, zero = m). `quantize_w4` gives the codes, scales and zeros of a float weight,
  `pack_w4` packs the codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from tradeoff_kernels import reference
from tradeoff_kernels.reference import dequantize_w4, pack_w4, quantize_w4

__all__ = ["Kernels", "dequantize_w4", "pack_w4", "paged_decode_attention", "quantize_w4", "rms_norm",
           "rotary_embedding", "swiglu", "triton_kernels", "w4a16_linear", "write_kv_cache"]


@dataclass(frozen=True)
class Kernels:
    """One implementation of every op, with the signatures of the functions below."""

    name: str
    rms_norm: Callable[..., Tensor | tuple[Tensor, Tensor]]
    rotary_embedding: Callable[..., None]
    swiglu: Callable[[Tensor, Tensor], Tensor]
    w4a16_linear: Callable[..., Tensor]
    paged_decode_attention: Callable[..., Tensor]
    write_kv_cache: Callable[..., None]


def triton_kernels() -> Kernels:
    """The Triton kernels (imports triton): for CUDA tensors, or for CPU tensors under TRITON_INTERPRET=1."""
    from tradeoff_kernels import (
        kv_write_triton,
        paged_attention_triton,
        rms_norm_triton,
        rotary_triton,
        swiglu_triton,
        w4a16_triton,
    )

    return Kernels("triton", rms_norm_triton.rms_norm, rotary_triton.rotary_embedding, swiglu_triton.swiglu,
                   w4a16_triton.w4a16_linear, paged_attention_triton.paged_decode_attention, kv_write_triton.write_kv_cache)


_TRITON = triton_kernels() if torch.cuda.is_available() else None  # what the functions below run on CUDA tensors


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm over the last dim, in float32. With `residual`: s = x + residual, returns (norm(s), s)."""
    impl = _TRITON.rms_norm if x.is_cuda else reference.rms_norm
    return impl(x, weight, eps, residual)


def rotary_embedding(q: Tensor, k: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> None:
    """Rotate q [T, Hq, D] and k [T, Hkv, D] in place (last dim contiguous; they may be views of one qkv buffer).

    cos, sin: [max_pos, >= D/2] tables whose column i is the angle of pair i at that position (the model's
    rotate-half tables, whose halves repeat, work as they are); positions [T]. Pairs are (i, i + D/2) in the
    Hugging Face rotate-half layout, or (2i, 2i + 1) with `interleaved` (GGUF's layout for llama).
    """
    impl = _TRITON.rotary_embedding if q.is_cuda else reference.rotary_embedding
    impl(q, k, positions, cos, sin, interleaved)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                           scale: float | None = None, num_splits: int | None = None) -> Tensor:
    """Attention of q [batch, n_new, Hq, D] over the paged cache -> [batch, n_new, Hq, D].

    The new tokens' k/v must already be in the cache. New token t of sequence b sits at position
    seq_lens[b] - n_new + t and sees keys 0..that position (causal among the new tokens: speculative
    verification passes n_new = k + 1), so seq_lens[b] >= n_new. Hq must be a multiple of Hkv (GQA).
    scale defaults to D**-0.5. num_splits (Triton only) splits each sequence for flash-decoding; by default
    it is chosen from the block table's capacity and the SM count, which needs no host sync (graph-safe).
    """
    impl = _TRITON.paged_decode_attention if q.is_cuda else reference.paged_decode_attention
    return impl(q, k_cache, v_cache, block_table, seq_lens, scale, num_splits)


def w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 split_k: int | None = None) -> Tensor:
    """x [..., K] @ dequantised(qweight).T -> [..., N]; the Triton kernel takes at most 16 rows of x."""
    impl = _TRITON.w4a16_linear if x.is_cuda else reference.w4a16_linear
    return impl(x, qweight, scales, zeros, group_size, split_k)


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    """Store new k, v [T, Hkv, D] into the paged caches at slot_mapping [T] (negative slots are skipped)."""
    impl = _TRITON.write_kv_cache if k.is_cuda else reference.write_kv_cache
    impl(k, v, k_cache, v_cache, slot_mapping)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up, computed in float32."""
    impl = _TRITON.swiglu if gate.is_cuda else reference.swiglu
    return impl(gate, up)
