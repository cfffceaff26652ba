import pytest
import torch

from tradeoff_kernels import reference
from tradeoff_kernels.w4a16_triton import BLOCK_M, w4a16_linear


def packed(w: torch.Tensor, group: int, dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, ...]:
    """(qweight, scales, zeros): a float weight quantised and packed for the kernel."""
    q, scales, zeros = reference.quantize_w4(w, group, dtype)
    return reference.pack_w4(q), scales, zeros


def test_pack_layout_nibbles_scales_and_zeros():
    N, K, group = 3, 64, 32
    q = torch.randint(0, 16, (N, K))
    q[:, 0::group], q[:, 1::group] = 0, 15  # every group spans the full range, so min/max recover scale and zero
    scales, zeros = torch.rand(N, K // group) + 0.1, torch.randn(N, K // group)
    w = q * scales.repeat_interleave(group, 1) + zeros.repeat_interleave(group, 1)
    qweight, got_scales, got_zeros = packed(w, group, torch.float32)
    assert qweight.dtype == torch.uint8 and qweight.shape == (N, K // 2)
    for n in range(N):
        for j in range(K // 2):  # byte j: element 2j in the low nibble, 2j + 1 in the high nibble
            assert qweight[n, j].item() == q[n, 2 * j].item() + 16 * q[n, 2 * j + 1].item()
    torch.testing.assert_close(got_scales, scales)
    torch.testing.assert_close(got_zeros, zeros)


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("store", [torch.float32, torch.float16], ids=["fp32_scales", "fp16_scales"])
def test_pack_rounds_to_nearest_level(group, store):
    w = torch.randn(8, 256) * 3
    qweight, scales, zeros = packed(w, group, store)
    assert scales.dtype == zeros.dtype == store
    err = (reference.dequantize_w4(qweight, scales, zeros, group) - w).abs()
    half_step = scales.float().repeat_interleave(group, 1) / 2
    # half a quantisation step, plus the rounding of scale (x15 levels) and zero to their stored dtype
    slack = torch.finfo(store).eps * (15 * half_step * 2 + zeros.float().abs().repeat_interleave(group, 1))
    assert (err <= half_step + slack + 1e-6).all()


def test_reference_is_x_times_dequantised_weight_transposed(assert_matches):
    w, x = torch.randn(40, 128), torch.randn(3, 128)
    weight = packed(w, 64, torch.float32)
    want = x.double() @ reference.dequantize_w4(*weight, 64).double().T
    assert_matches(reference.w4a16_linear(x, *weight, 64), want, torch.float32)


# (group, K): K a multiple of the group but not of the kernel's 128-wide K tile (96, 320, 576), or exactly one tile
SHAPES = [(32, 96), (64, 320), (128, 384), (32, 576)]


@pytest.mark.parametrize("group,K", SHAPES, ids=[f"g{g}_k{k}" for g, k in SHAPES])
@pytest.mark.parametrize("M", [1, 7, BLOCK_M])
@pytest.mark.parametrize("split_k", [1, None, 3], ids=["no_split", "auto_split", "split3"])
def test_triton_matches_reference(device, dtype, assert_matches, group, K, M, split_k):
    N = 72  # two 64-wide N tiles, the second one partial
    qweight, scales, zeros = packed(torch.randn(N, K, device=device), group, dtype)
    x = torch.randn(M, K + 16, device=device, dtype=dtype)[:, :K]  # a strided view of the activations
    got = w4a16_linear(x, qweight, scales, zeros, group, split_k)
    assert got.dtype == dtype and got.shape == (M, N)
    assert_matches(got, reference.w4a16_linear(x.float(), qweight, scales, zeros, group), dtype)


def test_triton_keeps_leading_dims(device, assert_matches):
    qweight, scales, zeros = packed(torch.randn(16, 64, device=device), 32)
    x = torch.randn(2, 3, 64, device=device)
    got = w4a16_linear(x, qweight, scales, zeros, 32)
    assert got.shape == (2, 3, 16)
    assert_matches(got, reference.w4a16_linear(x, qweight, scales, zeros, 32), torch.float32)


def test_triton_rejects_more_rows_than_a_tile(device):
    qweight, scales, zeros = packed(torch.randn(16, 64, device=device), 32)
    with pytest.raises(ValueError, match="at most 16 rows"):
        w4a16_linear(torch.randn(BLOCK_M + 1, 64, device=device), qweight, scales, zeros, 32)
