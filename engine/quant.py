"""Weight-only quantization for batch-1 decode, which is memory-bound: fewer bytes per weight, faster steps.

- int8: one scale per output channel, `torch.ops.aten._weight_int8pack_mm` (fused on CPU).
- int4: group-wise scale and zero (group 32, GGUF Q4_1's block, with its fp16 scale and minimum, so the default
  model's Q4_1 blocks are recovered exactly), from one quantization step (`tradeoff_kernels.quantize_w4`) packed for the
  device: on the CPU for `torch.ops.aten._weight_int4pack_mm_for_cpu` (`Int4Linear`; torch's formula is
  w = (q - 8) * scale + zero_t, so zero_t = group min + 8 * scale) and the native kernel, on the fused (Triton)
  path for the W4A16 kernel (`W4A16Linear`).

Torch's int4 kernel is fast only with bf16 activations, so Int4Linear feeds it bf16 whatever the model's dtype;
its dense copy (for prompt chunks) is in `dense_dtype`. Quantize from fp32 weights: the default GGUF's Q4_1 groups
are then recovered exactly (from bf16-rounded weights they are not), which the native kernel relies on.
Quantization happens once at load: it takes well under a second for the default model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import tradeoff_kernels
from engine.model import Linear, Transformer
from tradeoff_kernels.native import pack_q4

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


def int4_quantize(weight: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The int4 codes of a weight: (q uint8 [N, K] in 0..15, scale, group_min fp16 [N, K/32]); w = q * scale + min."""
    if weight.shape[1] % INT4_GROUP:
        raise ValueError(f"int4 needs the input dim ({weight.shape[1]}) to be a multiple of the group size {INT4_GROUP}")
    return tradeoff_kernels.quantize_w4(weight, INT4_GROUP)


class Int4Linear(nn.Module):
    """int4 for decode and verification (a few rows); prefill chunks of `DENSE_ROWS`+ rows use the dense weight.

    The int4 CPU kernel unpacks weights per row block, so past a few rows it is slower than a dense GEMM
    (measured: 95 rows take 2.7x longer than bf16). Keeping the dense weight costs memory only: it is the tensor
    the model loaded anyway.
    """

    DENSE_ROWS = 8

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype):
        super().__init__()
        if weight.device.type != "cpu":
            raise NotImplementedError("Int4Linear runs torch's CPU int4 kernel; on a GPU int4 runs W4A16Linear")
        q, scale, lo = int4_quantize(weight)
        scale, lo = scale.float(), lo.float()
        self.group = INT4_GROUP
        self.out_features = weight.shape[0]
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1))
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


W4A16_BYTES = 0.5 + 4 / 32  # what a W4A16 weight costs a decode step: its code, and an fp16 scale and min per 32


class W4A16Linear(nn.Module):
    """int4 for the Triton W4A16 kernel (`w4a16`: the model's fused kernels, or the dispatching function): the codes
    of `int4_quantize` two per byte, with its fp16 scales and minima, for decode and verification rows (up to the
    kernel's 16); longer prompt chunks use the dense weight, as `Int4Linear` does."""

    MAX_ROWS = 16

    def __init__(self, weight: Tensor, bias: Tensor | None, dtype: torch.dtype,
                 w4a16: Callable[..., Tensor] = tradeoff_kernels.w4a16_linear):
        super().__init__()
        q, scales, zeros = int4_quantize(weight)
        self.register_buffer("qweight", tradeoff_kernels.pack_w4(q))
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)
        self.dense = weight.to(dtype)
        self.bias = bias
        self.w4a16 = w4a16

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() > self.MAX_ROWS * x.shape[-1]:
            return F.linear(x.to(self.dense.dtype), self.dense, self.bias)
        y = self.w4a16(x.to(self.dense.dtype), self.qweight, self.scales, self.zeros, INT4_GROUP)
        return y if self.bias is None else y + self.bias


def quantize(model: Transformer, mode: str, dense_dtype: torch.dtype | None = None) -> Transformer:
    """Replace every layer projection and the output head with its quantized form, in place. dense_dtype: the
    dtype of int4's dense copies (default: the model's weights')."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r} (choose from {', '.join(QUANT_MODES)})")
    if mode == "none":
        return model
    dtype = model.weight_dtype if mode == "int8" else dense_dtype or model.weight_dtype
    w4a16 = mode == "int4" and (model.kernels is not None or model.device.type != "cpu")
    for block in model.layers:
        for name, child in list(block.named_children()):
            if not isinstance(child, Linear):
                continue
            if mode == "int8":
                layer = Int8Linear(child.weight, child.bias, dtype)
            elif w4a16:
                layer = W4A16Linear(child.weight, child.bias, dtype,
                                    model.kernels.w4a16_linear if model.kernels else tradeoff_kernels.w4a16_linear)
            else:
                layer = Int4Linear(child.weight, child.bias, dtype)
            setattr(block, name, layer)
    # The head too, on the CPU: it is the largest single matrix (a fifth of the bytes per token). In int8 for both
    # modes: an int4 head loses greedy choices (top-1 agreement with fp32 0.88 against 0.95 with an int8 head,
    # teacher-forced, engine/setup.py's measure; the default GGUF's embedding is Q8_0, which int4 cannot hold). With
    # W4A16 it stays dense: Int8Linear off the CPU dequantizes its whole weight per call, more bytes than bf16's.
    if not w4a16:
        model.head_q = Int8Linear(model.lm_head, None, model.weight_dtype if mode == "int8" else torch.bfloat16)
    return model
