import pytest
import torch

from tradeoff_kernels import reference
from tradeoff_kernels.kv_write_triton import write_kv_cache


def test_reference_writes_each_token_to_its_slot_and_skips_padding():
    k, v = torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    k_cache, v_cache = torch.zeros(4, 4, 2, 8), torch.zeros(4, 4, 2, 8)
    reference.write_kv_cache(k, v, k_cache, v_cache, torch.tensor([13, -1, 2]))
    torch.testing.assert_close(k_cache[3, 1], k[0])
    torch.testing.assert_close(v_cache[0, 2], v[2])
    assert (k_cache != 0).any(-1).any(-1).sum() == 2 and (v_cache != 0).any(-1).any(-1).sum() == 2


@pytest.mark.parametrize("head_dim,n_kv", [(64, 1), (128, 3), (64, 8)])
@pytest.mark.parametrize("block_size", [16, 5])
def test_triton_matches_reference(device, dtype, head_dim, n_kv, block_size):
    T, n_blocks = 6, 4
    # k and v as views of one fused qkv buffer (with 2 query heads in front)
    qkv = torch.randn(T, (2 + 2 * n_kv) * head_dim, device=device, dtype=dtype)
    k = qkv[:, 2 * head_dim : (2 + n_kv) * head_dim].view(T, n_kv, head_dim)
    v = qkv[:, (2 + n_kv) * head_dim :].view(T, n_kv, head_dim)
    slots = torch.randperm(n_blocks * block_size, device=device)[:T]
    slots[2] = -1  # a padding token
    caches = [torch.full((n_blocks, block_size, n_kv, head_dim), float("nan"), device=device, dtype=dtype) for _ in range(4)]
    write_kv_cache(k, v, caches[0], caches[1], slots)
    reference.write_kv_cache(k, v, caches[2], caches[3], slots)
    # written slots equal bit for bit; every other slot is still NaN in both
    torch.testing.assert_close(caches[0], caches[2], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(caches[1], caches[3], rtol=0, atol=0, equal_nan=True)
    assert caches[0].isnan().any(-1).any(-1).sum() == n_blocks * block_size - (T - 1)
