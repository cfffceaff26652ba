"""Fused SwiGLU, silu(gate) * up, in float32 with one rounding. gate and up may be the two halves of one
fused gate/up projection (strided views). Reference: tradeoff_kernels.reference.swiglu."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _swiglu_kernel(gate_ptr, up_ptr, out_ptr, width, gate_stride, up_stride, out_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < width
    g = tl.load(gate_ptr + row * gate_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + row * up_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=mask)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    if gate.shape != up.shape or gate.stride(-1) != 1 or up.stride(-1) != 1:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must match, last dim contiguous")
    width = gate.shape[-1]
    g2, u2 = gate.reshape(-1, width), up.reshape(-1, width)
    out = torch.empty(g2.shape, dtype=gate.dtype, device=gate.device)
    if out.numel():
        _swiglu_kernel[(g2.shape[0], triton.cdiv(width, BLOCK))](
            g2, u2, out, width, g2.stride(0), u2.stride(0), out.stride(0), BLOCK=BLOCK)
    return out.view(gate.shape)
