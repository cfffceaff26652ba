"""Weight-only quantization for batch-1 decode, which is memory-bound: fewer bytes per weight, faster steps.

- int8: one scale per output channel, `torch.ops.aten._weight_int8pack_mm` (fused on CPU).
- int4: group-wise scale and zero (group 32, the block size of GGUF Q4_0/Q4_1, so the default model's
  Q4_1 blocks map onto it almost exactly), `torch.ops.aten._weight_int4pack_mm_for_cpu` on the CPU.
  Torch's formula is w = (q - 8) * scale + zero_t, so zero_t = group min + 8 * scale.

Torch's int4 kernel is fast only with bf16 activations, so Int4Linear feeds it bf16 whatever the model's dtype;
its dense copy (for prompt chunks) is in `dense_dtype`. Quantize from fp32 weights: the default GGUF's Q4_1 groups
are then recovered exactly (from bf16-rounded weights they are not), which the native kernel relies on.
Quantization happens once at load: it takes well under a second for the default model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.model import Linear, Transformer
from kernels.native import pack_q4

QUANT_MODES = ("none", "int8", "int4")
INT4_GROUP = 32


class Int8Linear(nn.Module):
    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype):
        super().__init__()
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        x = x.to(self.scale.dtype)
        if x.device.type == "cpu":  # the fused kernel takes 2-D activations
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight, self.scale)
            y = y.view(*x.shape[:-1], -1)
        else:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale
        return y if self.bias is None else y + self.bias


def int4_quantize(weight: Tensor, group: int = INT4_GROUP) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest asymmetric int4 per group along the input dim -> (q int32 [N, K], scale, group_min [N, K/g])."""
    N, K = weight.shape
    w = weight.float().reshape(N, K // group, group)
    lo, hi = w.amin(dim=-1), w.amax(dim=-1)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
    return q.reshape(N, K), scale, lo


class Int4Linear(nn.Module):
    """int4 for decode and verification (a few rows); prefill chunks of `DENSE_ROWS`+ rows use the dense weight.

    The int4 CPU kernel unpacks weights per row block, so past a few rows it is slower than a dense GEMM
    (measured: 95 rows take 2.7x longer than bf16). Keeping the dense weight costs memory only: it is the tensor
    the model loaded anyway.
    """

    DENSE_ROWS = 8

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype, group: int = INT4_GROUP):
        super().__init__()
        if weight.device.type != "cpu":
            raise NotImplementedError("int4 weights run on the CPU kernel only; on a GPU use the Triton W4A16 path")
        if weight.shape[1] % group:
            raise ValueError(f"int4 needs the input dim ({weight.shape[1]}) to be a multiple of the group size {group}")
        q, scale, lo = int4_quantize(weight, group)
        self.group = group
        self.out_features = weight.shape[0]
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        # [K/g, N, 2]: (scale, zero) pairs, the layout the kernel reads
        self.register_buffer("scales_zeros",
                             torch.stack([scale, lo + 8 * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16))
        self.dense = weight.to(dtype)
        # The exact codes (0.75 bytes per weight) for engine/native.py: neither `dense` (bf16) nor `scales_zeros` gives them back.
        self.q4 = pack_q4(q, scale, lo)
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() >= self.DENSE_ROWS * x.shape[-1]:
            return F.linear(x.to(self.dense.dtype), self.dense, self.bias)
        x = x.to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), self.packed, self.group, self.scales_zeros)
        y = y.view(*x.shape[:-1], -1)
        return y if self.bias is None else y + self.bias


def quantize(model: Transformer, mode: str, dense_dtype: torch.dtype | None = None) -> Transformer:
    """Replace every layer projection and the output head with its quantized form, in place. dense_dtype: the
    dtype of int4's dense copies (default: the model's weights')."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r} (choose from {', '.join(QUANT_MODES)})")
    if mode == "none":
        return model
    cls = Int8Linear if mode == "int8" else Int4Linear
    dtype = model.weight_dtype if mode == "int8" else dense_dtype or model.weight_dtype
    for block in model.layers:
        for name, child in list(block.named_children()):
            if isinstance(child, Linear):
                setattr(block, name, cls(child.weight, child.bias, dtype))
    # The head too: it is the largest single matrix (a fifth of the bytes per token). In int8 for both modes: an
    # int4 head loses greedy choices (top-1 agreement with fp32 0.88 against 0.95 with an int8 head, teacher-forced,
    # engine/setup.py's measure; the default GGUF's embedding is Q8_0, which int4 cannot hold).
    model.head_q = Int8Linear(model.lm_head, None, model.weight_dtype if mode == "int8" else torch.bfloat16)
    return model
