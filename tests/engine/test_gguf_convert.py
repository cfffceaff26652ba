"""GGUF dequantisation and the Q/K un-permutation, against gguf-py and llama.cpp's own converter formula."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from engine.gguf_convert import dequantize, unpermute


@pytest.fixture(scope="module")
def reader(default_gguf):
    return GGUFReader(str(default_gguf))


@pytest.mark.parametrize("qtype", ["Q4_1", "Q8_0", "F32"])
def test_dequantize_matches_gguf_py_on_the_default_model(reader, qtype):
    tensors = [t for t in reader.tensors if t.tensor_type.name == qtype][:3]
    assert tensors
    for t in tensors:
        shape = tuple(reversed([int(x) for x in t.shape]))
        ref = torch.from_numpy(gguf_dequantize(t.data, t.tensor_type).astype(np.float32)).reshape(shape)
        assert torch.equal(dequantize(t.data, t.tensor_type, shape), ref), t.name


def test_dequantize_q4_0_matches_gguf_py():
    w = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    raw = gguf_quantize(w, GGMLQuantizationType.Q4_0)
    ref = gguf_dequantize(raw, GGMLQuantizationType.Q4_0).astype(np.float32)
    assert torch.equal(dequantize(raw, GGMLQuantizationType.Q4_0, (8, 64)), torch.from_numpy(ref))


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, written out independently."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("n_head", [1, 3, 9])
def test_unpermute_inverts_llama_cpp_permute(n_head):
    w = torch.randn(n_head * 64, 40)
    assert torch.equal(unpermute(llama_cpp_permute(w, n_head), n_head), w)
    assert not torch.equal(llama_cpp_permute(w, n_head), w)
