"""RMSNorm with an optional fused residual add: one program per row, one read of x and of the residual,
one write of the normed row and of the new residual. Reference: tradeoff_kernels.reference.rms_norm."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, dim, eps,
                     x_stride, res_stride, out_stride, res_out_stride,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        x = x + tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0)  # in x's dtype, as unfused
        tl.store(res_out_ptr + row * res_out_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / dim + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, (xf * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    dim = x.shape[-1]
    if weight.shape != (dim,) or x.stride(-1) != 1 or (residual is not None and residual.shape != x.shape):
        raise ValueError(f"rms_norm: x {tuple(x.shape)} (last dim contiguous), weight {tuple(weight.shape)}, "
                         f"residual {None if residual is None else tuple(residual.shape)}")
    x2 = x.reshape(-1, dim)
    out = torch.empty_like(x2)
    res2 = x2 if residual is None else residual.reshape(-1, dim)
    res_out = torch.empty_like(x2) if residual is not None else out  # unused without a residual
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(x2.shape[0],)](
        x2, res2, weight, out, res_out, dim, eps, x2.stride(0), res2.stride(0), out.stride(0), res_out.stride(0),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 8))
    if residual is None:
        return out.view(x.shape)
    return out.view(x.shape), res_out.view(x.shape)
