import pytest
import torch

from tradeoff_kernels import reference
from tradeoff_kernels.swiglu_triton import swiglu


def test_reference_is_silu_gate_times_up():
    g, u = torch.randn(3, 40), torch.randn(3, 40)
    torch.testing.assert_close(reference.swiglu(g, u).double(), g.double() * torch.sigmoid(g.double()) * u.double())


@pytest.mark.parametrize("shape", [(1, 50), (3, 1536), (2, 2, 1100)])
def test_triton_matches_reference(device, dtype, assert_matches, shape):
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], device=device, dtype=dtype)
    gate, up = gate_up.chunk(2, dim=-1)  # strided halves of one fused projection, as the model produces them
    got = swiglu(gate, up)
    assert got.shape == gate.shape
    assert_matches(got, reference.swiglu(gate, up), dtype)
