"""Kernel tests run the Triton kernels themselves and compare them with their references.

Without a GPU they run under Triton's interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1
before any kernel is defined). With a GPU
(bench/gpu.sh) the same tests run natively on CUDA, and bf16 joins fp32 and fp16 (the interpreter
mishandles bf16).

Every test runs in deterministic mode with fill_uninitialized_memory, so each torch.empty (every kernel
output and scratch buffer) starts NaN-filled: an element a kernel forgets to write stays NaN and fails.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETED else "cuda")
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])
# Allowed error relative to the expected output's RMS: two roundings of fp16/bf16 (eps ~1e-3/~8e-3); for
# fp32, summation order. Measured worst case under the interpreter: ~0.36 of this for fp16, ~0.11 for fp32.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def nan_filled_empty_and_seed():
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    torch.manual_seed(0)
    yield
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


@pytest.fixture
def device() -> torch.device:
    return DEVICE


@pytest.fixture(params=DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def dtype(request: pytest.FixtureRequest) -> torch.dtype:
    return request.param


@pytest.fixture
def assert_matches():
    """assert_matches(actual, expected, dtype): equal shapes, no NaN, error within TOLERANCE[dtype] x RMS(expected)."""

    def check(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
        expected = expected.double()
        tol = TOLERANCE[dtype]
        torch.testing.assert_close(actual.double(), expected, rtol=tol, atol=tol * expected.pow(2).mean().sqrt().item())

    return check
