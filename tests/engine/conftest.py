"""Helpers shared by the engine's tests."""

from __future__ import annotations

import torch

from engine.model import Transformer


def load_dequantized(ref: Transformer, quantized: Transformer) -> Transformer:
    """`ref` (a full-precision model of the same shape) with each projection set to `quantized`'s int4 weights,
    dequantized: the torch model that an int4 step should match."""
    with torch.no_grad():
        for block, q in zip(ref.layers, quantized.layers):
            for name in ("qkv", "o", "gate_up", "down"):
                getattr(block, name).weight.copy_(getattr(q, name).q4.dequantize())
    return ref
