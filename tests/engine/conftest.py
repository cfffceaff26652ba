"""Helpers shared by the engine's tests."""

from __future__ import annotations

import pytest
import torch

from engine.model import Transformer


@pytest.fixture(scope="module")
def fp32_model(default_model) -> Transformer:
    """The default model in fp32, per test module (disaggregated mode moves a model's weights into shared memory)."""
    model = Transformer(default_model.config, dtype=torch.float32)
    model.load_canonical(default_model.weights)
    return model


@pytest.fixture(scope="module")
def tiny(tiny_loaded):
    """(the tiny random LoadedModel, its fp32 Transformer)."""
    model = Transformer(tiny_loaded.config, dtype=torch.float32)
    model.load_canonical(tiny_loaded.weights)
    return tiny_loaded, model


def load_dequantized(ref: Transformer, quantized: Transformer) -> Transformer:
    """`ref` (a full-precision model of the same shape) with each projection set to `quantized`'s int4 weights,
    dequantized: the torch model that an int4 step should match."""
    with torch.no_grad():
        for block, q in zip(ref.layers, quantized.layers):
            for name in ("qkv", "o", "gate_up", "down"):
                getattr(block, name).weight.copy_(getattr(q, name).q4.dequantize())
    return ref
