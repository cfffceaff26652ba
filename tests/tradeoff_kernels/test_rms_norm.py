import pytest
import torch

from tradeoff_kernels import reference
from tradeoff_kernels.rms_norm_triton import rms_norm


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * weight.double()


@pytest.mark.parametrize("with_residual", [False, True])
def test_reference_is_rms_norm_of_the_sum(with_residual):
    x, w, r = torch.randn(4, 96), torch.randn(96), torch.randn(4, 96)
    if with_residual:
        normed, new_residual = reference.rms_norm(x, w, 1e-5, r)
        torch.testing.assert_close(new_residual, x + r)
        torch.testing.assert_close(normed.double(), naive_rms_norm(x + r, w, 1e-5))
    else:
        torch.testing.assert_close(reference.rms_norm(x, w, 1e-5).double(), naive_rms_norm(x, w, 1e-5))


@pytest.mark.parametrize("dim", [64, 100, 576])
@pytest.mark.parametrize("rows", [(1,), (3, 5)])
@pytest.mark.parametrize("with_residual", [False, True])
def test_triton_matches_reference(device, dtype, assert_matches, dim, rows, with_residual):
    x = torch.randn(*rows, dim + 8, device=device, dtype=dtype)[..., :dim]  # a strided view, as from a fused buffer
    w = torch.randn(dim, device=device, dtype=dtype)
    r = torch.randn(*rows, dim, device=device, dtype=dtype) if with_residual else None
    got, want = rms_norm(x, w, 1e-5, r), reference.rms_norm(x, w, 1e-5, r)
    if with_residual:
        assert_matches(got[0], want[0], dtype)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # the same single rounding of x + r
    else:
        assert_matches(got, want, dtype)


def test_triton_rejects_a_mismatched_weight(device):
    with pytest.raises(ValueError, match="rms_norm"):
        rms_norm(torch.randn(2, 64, device=device), torch.randn(32, device=device), 1e-5)
