"""The paged KV cache: ragged-batch attention against plain math."""

import math
import random

import pytest
import torch

from engine.kv_cache import DECODE_ATTENTION, PagedKVCache
from engine.model import ModelConfig


def reference_attention(q, keys, values, q_positions):
    """Plain softmax attention: q [T, H, D] at q_positions over keys/values [S, KV, D] at positions 0..S-1."""
    H, KV, D = q.shape[1], keys.shape[1], q.shape[2]
    out = torch.empty_like(q)
    for t, pos in enumerate(q_positions):
        for h in range(H):
            kv = h // (H // KV)
            scores = keys[: pos + 1, kv] @ q[t, h] / math.sqrt(D)
            out[t, h] = torch.softmax(scores, 0) @ values[: pos + 1, kv]
    return out


@pytest.mark.parametrize("kernel", sorted(DECODE_ATTENTION))
@pytest.mark.parametrize("order", ["decodes first", "mixed", "long prefill", "decodes of very different lengths"])
def test_ragged_batch_attention_matches_plain_attention(order, kernel):
    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = ModelConfig(arch="llama", vocab_size=10, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=8,
                      rope_theta=1e4, norm_eps=1e-5, max_seq_len=128, tie_embeddings=True, qkv_bias=False)
    bs, num_blocks = 4, 100
    cache = PagedKVCache(cfg, num_blocks, bs, torch.float32, decode_kernel=kernel)
    free = list(range(num_blocks))
    rng.shuffle(free)  # block tables are scattered, not contiguous
    # (tokens already cached, new tokens this step): two decodes, a fresh prefill, a later prefill chunk
    shapes = {"decodes first": [(9, 1), (17, 1), (0, 6), (5, 7)], "mixed": [(9, 1), (0, 6), (5, 7), (17, 1)],
              "long prefill": [(3, 1), (20, 300)],
              "decodes of very different lengths": [(150, 1), (2, 1), (0, 5), (9, 1), (60, 1)]}[order]  # 3 groups
    history = []  # full k, v per sequence, written step by step
    tables = []
    for past, new in shapes:
        n_blocks = -(-(past + new) // bs)
        tables.append([free.pop() for _ in range(n_blocks)])
        history.append((torch.randn(past + new, 2, 8), torch.randn(past + new, 2, 8)))
    # put each sequence's past k/v into its blocks, as earlier steps would have
    for (past, _), table, (k, v) in zip(shapes, tables, history):
        for p in range(past):
            cache.k[0, table[p // bs], p % bs] = k[p]
            cache.v[0, table[p // bs], p % bs] = v[p]
    positions = cache.prepare([n for _, n in shapes], [p + n for p, n in shapes], tables)
    assert positions.tolist() == [p for past, new in shapes for p in range(past, past + new)]
    q = torch.randn(len(positions), 4, 8)
    new_k = torch.cat([k[past:] for (past, _), (k, _) in zip(shapes, history)])
    new_v = torch.cat([v[past:] for (past, _), (_, v) in zip(shapes, history)])
    out = cache.attend(0, q, new_k, new_v).view(-1, 4, 8)
    row = 0
    for (past, new), (k, v) in zip(shapes, history):
        expected = reference_attention(q[row:row + new], k, v, range(past, past + new))
        torch.testing.assert_close(out[row:row + new], expected, rtol=1e-5, atol=1e-5)
        row += new
