import dataclasses
import importlib
import subprocess
import sys

import pytest
import torch

import tradeoff_kernels
from tradeoff_kernels import reference

TRITON_MODULE = {"rms_norm": "rms_norm_triton", "rotary_embedding": "rotary_triton",
                 "paged_decode_attention": "paged_attention_triton", "w4a16_linear": "w4a16_triton",
                 "write_kv_cache": "kv_write_triton", "swiglu": "swiglu_triton"}


def arguments(op: str, device: str) -> tuple:
    """Small valid inputs for each public op."""
    r = lambda *shape: torch.randn(*shape, device=device)
    if op == "rms_norm":
        return r(2, 64), r(64), 1e-5, None
    if op == "rotary_embedding":
        return r(2, 2, 8), r(2, 1, 8), torch.tensor([1, 3], device=device), r(4, 4), r(4, 4), False
    if op == "paged_decode_attention":
        table = torch.tensor([[1, 0]], dtype=torch.int32, device=device)
        seq_lens = torch.tensor([6], dtype=torch.int32, device=device)
        return r(1, 1, 2, 16), r(2, 4, 1, 16), r(2, 4, 1, 16), table, seq_lens, None, None
    if op == "w4a16_linear":
        q, scales, zeros = tradeoff_kernels.quantize_w4(r(16, 64), 32)
        return r(1, 64), tradeoff_kernels.pack_w4(q), scales, zeros, 32, None
    if op == "write_kv_cache":
        return r(2, 1, 16), r(2, 1, 16), r(2, 4, 1, 16), r(2, 4, 1, 16), torch.tensor([0, 5], device=device)
    return r(2, 8), r(2, 8)


def spy_on(monkeypatch, module, name: str) -> list:
    calls, original = [], getattr(module, name)

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(module, name, spy)
    return calls


@pytest.mark.parametrize("op", TRITON_MODULE)
def test_cpu_tensors_use_the_reference(monkeypatch, op):
    calls = spy_on(monkeypatch, reference, op)
    args = arguments(op, "cpu")
    getattr(tradeoff_kernels, op)(*args)
    assert len(calls) == 1 and all(a is b for a, b in zip(calls[0], args))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only machines only")
def test_importing_kernels_without_a_gpu_does_not_import_triton():
    code = "import sys, kernels; print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton' or m.endswith('_triton')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("op", TRITON_MODULE)
def test_the_triton_set_holds_each_ops_triton_kernel(op):
    module = importlib.import_module(f"tradeoff_kernels.{TRITON_MODULE[op]}")
    assert getattr(tradeoff_kernels.triton_kernels(), op) is getattr(module, op)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("op", TRITON_MODULE)
def test_cuda_tensors_use_triton(monkeypatch, op):
    triton_calls, original = [], getattr(tradeoff_kernels._TRITON, op)

    def spy(*args):
        triton_calls.append(args)
        return original(*args)

    monkeypatch.setattr(tradeoff_kernels, "_TRITON", dataclasses.replace(tradeoff_kernels._TRITON, **{op: spy}))
    reference_calls = spy_on(monkeypatch, reference, op)
    getattr(tradeoff_kernels, op)(*arguments(op, "cuda"))
    torch.cuda.synchronize()
    assert len(triton_calls) == 1 and not reference_calls
