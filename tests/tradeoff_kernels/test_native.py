"""The native step (tradeoff_kernels/native_decode.c) against its PyTorch reference on small random models, and the int8
head's packing.

Each build variant runs: the default (-march=native), the AVX2 target (x86-64-v3) where the CPU has AVX2, and
plain x86-64, which compiles the portable C path. Unused cache slots and the logits start as NaN, so a slot the
step writes but should not, a row it reads past its position, or an output it leaves unwritten shows up.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch

from tradeoff_kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.why_unavailable()}")

X86 = platform.machine() in ("x86_64", "AMD64")
AVX2 = X86 and Path("/proc/cpuinfo").exists() and " avx2" in Path("/proc/cpuinfo").read_text()
MARCHES = [None] + (["x86-64-v3"] if AVX2 else []) + (["x86-64"] if X86 else [])
TOLERANCE = 2e-5  # relative to the largest |value|: fp32 summation order, one layer after another


def random_weights(dim: int, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, ffn_dim: int, vocab: int,
                   bias: bool, max_pos: int = 512) -> native.NativeWeights:
    def q4(n: int, k: int) -> native.PackedQ4:
        scale = torch.rand(n, k // 32) * 0.04 + 0.01
        return native.pack_q4(torch.randint(0, 16, (n, k)), scale, -7.5 * scale + 0.01 * torch.randn(n, k // 32))

    def norm() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(dim)

    def q8(n: int, k: int) -> native.PackedQ8:  # about the int4 weights' magnitude
        scale = (torch.rand(n, k // 32) * 0.04 + 0.01) * 7.5 / 127
        return native.PackedQ8(torch.randint(-127, 128, (n, k), dtype=torch.int8), scale)

    qkv_n = (n_heads + 2 * n_kv_heads) * head_dim
    layers = [native.NativeLayer(attn_norm=norm(), qkv=q4(qkv_n, dim), qkv_bias=0.1 * torch.randn(qkv_n) if bias else None,
                                 o=q4(dim, n_heads * head_dim), ffn_norm=norm(), gate_up=q4(2 * ffn_dim, dim),
                                 down=q4(dim, ffn_dim))
              for _ in range(n_layers)]
    inv_freq = 1e4 ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_pos, dtype=torch.float64), inv_freq).repeat(1, 2)
    return native.NativeWeights(layers=layers, norm=norm(), rope_cos=angles.cos().float(), rope_sin=angles.sin().float(),
                                head=q8(vocab, dim), n_heads=n_heads, n_kv_heads=n_kv_heads, eps=1e-5)


def caches(w: native.NativeWeights, cache_len: int, filled: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches whose first `filled` positions hold earlier tokens' k/v and whose other slots are NaN."""
    shape = (len(w.layers), 1, w.n_kv_heads, cache_len, w.head_dim)
    k, v = torch.full(shape, float("nan")), torch.full(shape, float("nan"))
    k[..., :filled, :], v[..., :filled, :] = torch.randn(*shape[:3], filled, shape[4]), torch.randn(*shape[:3], filled, shape[4])
    return k, v


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOLERANCE * scale, equal_nan=True)


def test_packing_round_trips_exactly():
    q = torch.randint(0, 16, (5, 96))
    scale, lo = torch.rand(5, 3), torch.randn(5, 3)
    packed = native.pack_q4(q, scale, lo)
    assert packed.qs.dtype == torch.uint8 and packed.qs.shape == (5, 48) and packed.shape == (5, 96)
    groups = packed.qs.view(5, 3, 16).int()
    assert torch.equal(groups & 15, q.view(5, 3, 32)[..., :16].int())  # byte j: element j low, element j + 16 high
    assert torch.equal(groups >> 4, q.view(5, 3, 32)[..., 16:].int())
    codes, s, m = packed.unpack()
    assert torch.equal(codes.long(), q) and torch.equal(s, scale) and torch.equal(m, lo)
    want = (q.view(5, 3, 32).float() * scale[..., None] + lo[..., None]).view(5, 96)
    assert torch.equal(packed.dequantize(), want)


def q8_0_like(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and scales as GGUF Q8_0 has them: fp16 scales, and a code of +-127 in every group."""
    q = torch.randint(-127, 128, (n, k // 32, 32), dtype=torch.int8)
    q[..., 5] = 127 * (torch.randint(0, 2, (n, k // 32), dtype=torch.int8) * 2 - 1)
    return q.view(n, k), (torch.rand(n, k // 32) * 0.01).half().float()


def test_q8_quantization_gives_back_q8_0_codes_exactly():
    q, d = q8_0_like(7, 96)
    d[2, 1] = 0  # an all-zero group (0 * q): codes 0, not NaN
    w = (q.view(7, 3, 32).float() * d[..., None]).view(7, 96)
    packed = native.quantize_q8(w)
    assert packed.qs.dtype == torch.int8 and packed.shape == (7, 96) and packed.d.shape == (7, 3)
    assert torch.equal(packed.d, d)
    want = torch.where(d[..., None] > 0, q.view(7, 3, 32), 0).view(7, 96)
    assert torch.equal(packed.qs, want) and torch.equal(packed.dequantize(), w)
    other = torch.randn(7, 96)  # any weights: within half a step of their group's scale
    back = native.quantize_q8(other)
    assert back.qs.abs().max() == 127
    assert ((back.dequantize() - other).abs().view(7, 3, 32) <= back.d[..., None] / 2 * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        native.quantize_q8(torch.randn(2, 48))


@pytest.mark.parametrize("march", MARCHES, ids=lambda m: m or "default")
@pytest.mark.parametrize("n_threads", [1, 2])
def test_int8_head_at_every_row_count(march, n_threads):
    """Head rows that are no multiple of a work unit (8), an odd number of groups per row (3), 1-8 rows and beyond."""
    torch.manual_seed(3)
    w = random_weights(dim=96, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=32, ffn_dim=64, vocab=1001, bias=False)
    decoder = native.NativeDecoder(w, n_threads=n_threads, march=march)
    k, v = caches(w, 64, 3)
    k_ref, v_ref = k.clone(), v.clone()
    start = 3
    for T in range(1, 10):
        x = torch.randn(T, w.dim)
        assert_close(decoder.forward(x, start, k, v, T), native.reference_forward(w, x, start, k_ref, v_ref, T))
        start += T


@pytest.mark.parametrize("march", MARCHES, ids=lambda m: m or "default")
@pytest.mark.parametrize("n_threads", [1, 2])
def test_head_alone_is_the_int8_head_of_the_rows_given(march, n_threads):
    """tradeoff_head: 1-8 rows and beyond (a second block), vocab rows no multiple of a work unit; no layer runs."""
    torch.manual_seed(4)
    w = random_weights(dim=96, n_layers=1, n_heads=3, n_kv_heads=1, head_dim=32, ffn_dim=64, vocab=1001, bias=False)
    decoder = native.NativeDecoder(w, n_threads=n_threads, march=march)
    for T in (1, 2, 8, 11):
        x = torch.randn(T, w.dim)
        assert_close(decoder.head(x), x @ w.head.dequantize().T)
    with pytest.raises(ValueError, match="contiguous fp32"):
        decoder.head(torch.randn(2, w.dim, dtype=torch.float64))


@pytest.mark.parametrize("march", MARCHES, ids=lambda m: m or "default")
@pytest.mark.parametrize("n_threads", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "qkv_bias"])
@pytest.mark.parametrize("head_dim", [16, 64])  # 64: the vector attention path; 16: its generic remainder
def test_step_matches_reference(march, n_threads, bias, head_dim):
    torch.manual_seed(head_dim + bias)
    w = random_weights(dim=64, n_layers=3, n_heads=6, n_kv_heads=2, head_dim=head_dim, ffn_dim=96, vocab=200, bias=bias)
    decoder = native.NativeDecoder(w, n_threads=n_threads, march=march)
    cache_len, start = 160, 37
    k, v = caches(w, cache_len, start)
    k_ref, v_ref = k.clone(), v.clone()
    # decode steps, verify steps, a block boundary (T > 8) and a span of keys split into several attention chunks
    for T, n_logits in [(1, 1), (4, 4), (8, 3), (3, 1), (11, 5), (1, 0), (2, 2), (5, 5), (7, 2), (6, 1), (1, 1)]:
        x = torch.randn(T, w.dim)
        got = decoder.forward(x, start, k, v, n_logits)
        want = native.reference_forward(w, x, start, k_ref, v_ref, n_logits)
        assert got.shape == (n_logits, w.vocab) and not got.isnan().any()
        assert_close(got, want)
        start += T
        assert_close(k[..., :start, :], k_ref[..., :start, :])
        assert_close(v[..., :start, :], v_ref[..., :start, :])
        assert k[..., start:, :].isnan().all() and v[..., start:, :].isnan().all(), "a slot past the new rows was written"
    assert start > 64  # the last steps attended over more than one chunk of 64 keys


def test_rewinding_the_cache_overwrites_rejected_rows():
    """Speculative decoding keeps the accepted prefix of a verify step and runs the next step from there."""
    torch.manual_seed(1)
    w = random_weights(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, ffn_dim=64, vocab=100, bias=False)
    decoder = native.NativeDecoder(w, n_threads=2)
    k, v = caches(w, 64, 20)
    k_ref, v_ref = k.clone(), v.clone()
    for x in (torch.randn(5, 64), torch.randn(5, 64)):  # both start at position 20: the second replaces the first
        got = decoder.forward(x, 20, k, v, 5)
        want = native.reference_forward(w, x, 20, k_ref, v_ref, 5)
        assert_close(got, want)
    assert_close(k[..., :25, :], k_ref[..., :25, :])


def test_rejects_mismatched_caches_and_positions():
    w = random_weights(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64, vocab=50, bias=False, max_pos=32)
    decoder = native.NativeDecoder(w, n_threads=1)
    k, v = caches(w, 40, 0)
    with pytest.raises(ValueError, match="caches"):
        decoder.forward(torch.randn(1, 64), 0, k[:1], v[:1], 1)
    with pytest.raises(ValueError, match="fit"):  # past the rope tables (32 positions)
        decoder.forward(torch.randn(2, 64), 31, k, v, 1)
    with pytest.raises(ValueError, match="fp32"):
        decoder.forward(torch.randn(1, 64).bfloat16(), 0, k, v, 1)


def test_a_missing_compiler_is_reported_not_raised_at_import(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(native.NativeUnavailable, match="no-such-cc"):
        native.build("x86-64" if X86 else "native")
