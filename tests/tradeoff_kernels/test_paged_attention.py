import pytest
import torch

from tradeoff_kernels import reference
from tradeoff_kernels.paged_attention_triton import MIN_SPLIT_TOKENS, choose_num_splits, paged_decode_attention


def paged_cache(keys: list[torch.Tensor], values: list[torch.Tensor], block_size: int):
    """Scatter each sequence's k/v [n, Hkv, D] into shuffled blocks of a NaN-filled paged cache.

    Spare blocks, slots past each sequence's end and unused block-table entries hold NaN or an out-of-range
    block id, so a kernel that reads anything outside a sequence's tokens produces NaN.
    """
    n_blocks = [-(-k.shape[0] // block_size) for k in keys]
    total = sum(n_blocks) + 3
    _, n_kv, d = keys[0].shape
    # k and v as the two halves of one [blocks, 2, ...] tensor: non-contiguous block strides, as in vLLM
    kv = torch.full((total, 2, block_size, n_kv, d), float("nan"), dtype=keys[0].dtype, device=keys[0].device)
    table = torch.full((len(keys), max(n_blocks) + 2), total + 1000, dtype=torch.int32)
    free = torch.randperm(total).tolist()
    for b, (k, v) in enumerate(zip(keys, values)):
        for i in range(n_blocks[b]):
            blk = free.pop()
            table[b, i] = blk
            rows = slice(i * block_size, (i + 1) * block_size)
            kv[blk, 0, : k[rows].shape[0]] = k[rows]
            kv[blk, 1, : v[rows].shape[0]] = v[rows]
    return kv[:, 0], kv[:, 1], table.to(keys[0].device)


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [n_new, Hq, D] against one sequence's contiguous k/v [n, Hkv, D], float64, causal among the new tokens."""
    n_new, n_heads, _ = q.shape
    n = k.shape[0]
    group = n_heads // k.shape[1]
    k, v = k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    scores = torch.einsum("thd,nhd->htn", q.double(), k) * scale
    visible = torch.arange(n)[None, :] <= torch.arange(n - n_new, n)[:, None]
    probs = scores.masked_fill(~visible.to(q.device), float("-inf")).softmax(-1)
    return torch.einsum("htn,nhd->thd", probs, v)


def make_case(seq_lens, n_new, n_heads, n_kv, head_dim, dtype, device, block_size=16):
    keys = [torch.randn(n, n_kv, head_dim, dtype=dtype, device=device) for n in seq_lens]
    values = [torch.randn(n, n_kv, head_dim, dtype=dtype, device=device) for n in seq_lens]
    k_cache, v_cache, table = paged_cache(keys, values, block_size)
    # q as a strided view (two spare heads per token), as it comes out of a fused projection
    q = torch.randn(len(seq_lens), n_new, n_heads + 2, head_dim, dtype=dtype, device=device)[:, :, :n_heads]
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    return q, keys, values, k_cache, v_cache, table, lens


@pytest.mark.parametrize("n_new", [1, 3])
def test_reference_matches_dense_attention(device, assert_matches, n_new):
    seq_lens = [5, 37, 64]
    q, keys, values, k_cache, v_cache, table, lens = make_case(seq_lens, n_new, 6, 2, 64, torch.float32, device)
    got = reference.paged_decode_attention(q, k_cache, v_cache, table, lens)
    for b in range(len(seq_lens)):
        assert_matches(got[b], dense_attention(q[b], keys[b], values[b], 64**-0.5), torch.float32)


# Sequences: one partial block (5), one not a multiple of the block size (37), and a longer one (300, 19 blocks)
# that fills every one of 5 splits (each split is a multiple of the kernel's 64-token tile).
SEQ_LENS = [5, 37, 300]


@pytest.mark.parametrize("head_dim,n_heads,n_kv", [(64, 2, 2), (128, 6, 2), (64, 8, 1)], ids=["gqa1", "gqa3", "gqa8"])
@pytest.mark.parametrize("n_new", [1, 4], ids=["decode", "verify4"])
@pytest.mark.parametrize("num_splits", [1, None, 5], ids=["one_split", "auto_splits", "many_splits"])
def test_triton_matches_reference(device, dtype, assert_matches, head_dim, n_heads, n_kv, n_new, num_splits):
    q, _, _, k_cache, v_cache, table, lens = make_case(SEQ_LENS, n_new, n_heads, n_kv, head_dim, dtype, device)
    got = paged_decode_attention(q, k_cache, v_cache, table, lens, None, num_splits)
    assert_matches(got, reference.paged_decode_attention(q, k_cache, v_cache, table, lens), dtype)


def test_triton_single_short_sequence_with_custom_scale_and_block_size(device, assert_matches):
    # one block of 32 holding 3 tokens, all of them new (speculative verify from an empty cache), 5 splits
    q, _, _, k_cache, v_cache, table, lens = make_case([3], 3, 4, 4, 64, torch.float32, device, block_size=32)
    got = paged_decode_attention(q, k_cache, v_cache, table, lens, 0.2, 5)
    assert_matches(got, reference.paged_decode_attention(q, k_cache, v_cache, table, lens, 0.2), torch.float32)


@pytest.mark.parametrize("sms", [4, 132])
def test_num_splits_fill_the_gpu_with_no_split_too_short(sms):
    for max_seq_len in (1, 100, 129, 1000, 4096, 32768):
        for batch in (1, 4, 64):
            for n_kv in (1, 3, 8):
                s = choose_num_splits(max_seq_len, batch, n_kv, sms)
                longest_allowed = max(1, max_seq_len // MIN_SPLIT_TOKENS)
                assert 1 <= s <= longest_allowed
                assert s * batch * n_kv >= 2 * sms or s == longest_allowed  # fills every SM twice, unless capped
                assert s == 1 or (s - 1) * batch * n_kv < 2 * sms  # and uses no more splits than that needs
