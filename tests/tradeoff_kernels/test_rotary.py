import pytest
import torch

from tradeoff_kernels import reference
from tradeoff_kernels.rotary_triton import rotary_embedding


def rotate_half_hf(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's apply_rotary_pos_emb for one tensor: x * cos + rotate_half(x) * sin, with [D]-wide tables."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def tables(max_pos: int, head_dim: int, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [max_pos, D/2]: column i is the angle of pair i."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def test_reference_rotate_half_matches_hugging_face():
    q, k = torch.randn(5, 4, 64), torch.randn(5, 2, 64)
    positions = torch.tensor([0, 3, 7, 8, 30])
    cos, sin = tables(32, 64, torch.float64)
    full_cos, full_sin = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)  # HF's rotate-half tables (the engine's too)
    want_q = rotate_half_hf(q.double(), full_cos[positions].unsqueeze(1), full_sin[positions].unsqueeze(1))
    want_k = rotate_half_hf(k.double(), full_cos[positions].unsqueeze(1), full_sin[positions].unsqueeze(1))
    reference.rotary_embedding(q, k, positions, full_cos.float(), full_sin.float())  # the model's tables work as they are
    torch.testing.assert_close(q.double(), want_q)
    torch.testing.assert_close(k.double(), want_k)


def test_reference_interleaved_is_complex_rotation_of_adjacent_pairs():
    q, k = torch.randn(3, 2, 16), torch.randn(3, 1, 16)
    positions = torch.tensor([1, 5, 9])
    cos, sin = tables(10, 16, torch.float64)
    turn = torch.complex(cos[positions], sin[positions]).unsqueeze(1)
    want_q = torch.view_as_real(torch.view_as_complex(q.double().reshape(3, 2, 8, 2)) * turn).reshape(q.shape)
    want_k = torch.view_as_real(torch.view_as_complex(k.double().reshape(3, 1, 8, 2)) * turn).reshape(k.shape)
    reference.rotary_embedding(q, k, positions, cos.float(), sin.float(), interleaved=True)
    torch.testing.assert_close(q.double(), want_q)
    torch.testing.assert_close(k.double(), want_k)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)], ids=["gqa1", "gqa3", "gqa8"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["rotate_half", "interleaved"])
@pytest.mark.parametrize("full_tables", [False, True], ids=["half_table", "model_table"])
def test_triton_matches_reference(device, dtype, assert_matches, head_dim, heads, interleaved, full_tables):
    n_q, n_k = heads
    T = 3
    # q, k and v as views of one fused qkv buffer, as the model's projection produces them
    qkv = torch.randn(T, (n_q + 2 * n_k) * head_dim, device=device, dtype=dtype)
    # random angles: every pair really turns, so an element the kernel skips cannot pass for rotated
    angles = torch.rand(64, head_dim // 2, dtype=torch.float64) * 2 * torch.pi
    cos, sin = angles.cos().float(), angles.sin().float()
    if full_tables:
        cos, sin = torch.cat([cos, cos], -1).to(dtype), torch.cat([sin, sin], -1).to(dtype)
    cos, sin = cos.to(device), sin.to(device)
    positions = torch.tensor([5, 17, 63], device=device)

    def split(buf):
        q = buf[:, : n_q * head_dim].view(T, n_q, head_dim)
        k = buf[:, n_q * head_dim : (n_q + n_k) * head_dim].view(T, n_k, head_dim)
        return q, k

    got, want = qkv.clone(), qkv.clone()
    rotary_embedding(*split(got), positions, cos, sin, interleaved)
    reference.rotary_embedding(*split(want), positions, cos, sin, interleaved)
    for g, w in zip(split(got), split(want)):
        assert_matches(g, w, dtype)
    v = slice((n_q + n_k) * head_dim, None)
    torch.testing.assert_close(got[:, v], qkv[:, v], rtol=0, atol=0)  # v untouched
