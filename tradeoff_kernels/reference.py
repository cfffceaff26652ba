"""Plain-PyTorch references: the definition of what each kernel computes, and the path on CPU tensors.

Every function here has the same signature as its Triton twin in tradeoff_kernels/*_triton.py; tuning arguments
the math does not depend on (`num_splits`, `split_k`) are accepted and ignored. Layouts are described in
tradeoff_kernels/__init__.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    if residual is not None:
        x = x + residual  # the new residual stream, rounded to x's dtype as an unfused add would be
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return normed if residual is None else (normed, x)


def rotary_embedding(q: Tensor, k: Tensor, positions: Tensor, cos: Tensor, sin: Tensor, interleaved: bool = False) -> None:
    half = q.shape[-1] // 2
    c = cos[positions, :half].float().unsqueeze(1)
    s = sin[positions, :half].float().unsqueeze(1)
    for x in (q, k):
        x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleaved else (x[..., :half], x[..., half:])
        a, b = x1.float(), x2.float()  # for fp32 these alias x: compute both halves before writing either
        r1, r2 = a * c - b * s, b * c + a * s
        x1.copy_(r1)
        x2.copy_(r2)


def paged_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seq_lens: Tensor,
                           scale: float | None = None, num_splits: int | None = None) -> Tensor:
    n_new = q.shape[1]
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    for b, n in enumerate(seq_lens.tolist()):
        pages = block_table[b, : -(-n // block_size)]
        k = k_cache[pages].flatten(0, 1)[:n].transpose(0, 1).float()  # [Hkv, n, D]
        v = v_cache[pages].flatten(0, 1)[:n].transpose(0, 1).float()
        # new token i sits at position n - n_new + i and sees keys 0..n - n_new + i
        mask = torch.ones(n_new, n, dtype=torch.bool, device=q.device).tril(diagonal=n - n_new)
        o = F.scaled_dot_product_attention(q[b].transpose(0, 1).float(), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[b] = o.transpose(0, 1)
    return out


def quantize_w4(weight: Tensor, group_size: int, dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor, Tensor]:
    """The one int4 quantization step: a float weight [N, K] rounded to nearest with each group's min/max.

    Returns (q uint8 [N, K] in 0..15, scales, zeros [N, K//group] in `dtype`), w ~= q * scale + zero. fp16 by
    default, as GGUF's Q4_1 stores d and m: from the default model's dequantised Q4_1 weights this gives back its
    codes, scales and minima exactly. Both int4 packings come from this output (`pack_w4` for the Triton kernel,
    tradeoff_kernels.native.pack_q4 and torch's CPU int4 pack for the CPU), so a model converts once for either device.
    """
    N, K = weight.shape
    if K % group_size or group_size % 2:
        raise ValueError(f"K={K} must be a multiple of the group size {group_size} (an even number)")
    w = weight.float().reshape(N, K // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    # Round scale and zero to their stored dtype first, so q is chosen for the values dequantisation will use.
    scales = ((hi - lo) / 15).to(dtype)
    zeros = lo.to(dtype)
    s = scales.float().unsqueeze(-1)
    q = ((w - zeros.float().unsqueeze(-1)) / torch.where(s > 0, s, 1.0)).round().clamp(0, 15).to(torch.uint8)
    return q.reshape(N, K), scales, zeros


def pack_w4(q: Tensor) -> Tensor:
    """Codes q [N, K] in 0..15 -> the Triton kernel's qweight uint8 [N, K//2] (element 2j low nibble, 2j + 1 high)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def dequantize_w4(qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int) -> Tensor:
    """The float32 weight [N, K] that a packed 4-bit weight stands for."""
    N = qweight.shape[0]
    q = torch.stack([qweight & 0xF, qweight >> 4], dim=-1).reshape(N, -1).float()
    return q * scales.float().repeat_interleave(group_size, 1) + zeros.float().repeat_interleave(group_size, 1)


def w4a16_linear(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor, group_size: int,
                 split_k: int | None = None) -> Tensor:
    return F.linear(x, dequantize_w4(qweight, scales, zeros, group_size).to(x.dtype))


def write_kv_cache(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor) -> None:
    keep = slot_mapping >= 0  # negative slots mark padding tokens
    slots = slot_mapping[keep].long()
    block_size = k_cache.shape[1]
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)
    v_cache[slots // block_size, slots % block_size] = v[keep].to(v_cache.dtype)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)
