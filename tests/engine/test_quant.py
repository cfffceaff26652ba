"""Weight-only quantization: per-element round-trip error bounds, kernels against a dequantized reference, and
greedy agreement with fp32 on the default model."""

import pytest
import torch
import torch.nn.functional as F

import tradeoff_kernels
from engine.kv_cache import StaticKVCache
from engine.model import Transformer
from engine.quant import INT4_GROUP, Int4Linear, Int8Linear, W4A16Linear, int4_quantize, quantize


def test_int8_round_trip_is_within_half_a_step_per_channel():
    w = torch.randn(96, 160) * torch.rand(96, 1) * 3
    lin = Int8Linear(w, None, torch.float32)
    deq = lin.qweight.float() * lin.scale[:, None]
    assert ((deq - w).abs() <= lin.scale[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 160)
    torch.testing.assert_close(lin(x), F.linear(x, deq), rtol=1e-5, atol=1e-4)


def test_int4_recovers_the_default_models_q4_1_weights_exactly(default_model):
    """The GGUF stores these projections as Q4_1 with 32-wide groups: requantizing loses nothing."""
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.17.mlp.down_proj.weight"):
        w = default_model.weights[name]
        q, scale, lo = int4_quantize(w)
        deq = (q.float().reshape(w.shape[0], -1, INT4_GROUP) * scale[..., None] + lo[..., None]).reshape(w.shape)
        assert torch.equal(deq, w), name


def test_the_cpu_and_gpu_int4_packings_hold_the_same_codes_scales_and_minima():
    """One quantization step, two packings: the native kernel's (GGUF Q4_1 order) and the Triton kernel's (nibble pairs)."""
    w = torch.randn(96, 4 * INT4_GROUP)
    q, scale, lo = int4_quantize(w)
    cpu, gpu = Int4Linear(w, None, torch.bfloat16), W4A16Linear(w, None, torch.bfloat16)
    codes, d, m = cpu.q4.unpack()
    assert torch.equal(codes, q) and torch.equal(d, scale.float()) and torch.equal(m, lo.float())
    assert torch.equal(torch.stack([gpu.qweight & 15, gpu.qweight >> 4], dim=-1).view(q.shape), q)
    assert torch.equal(gpu.scales, scale) and torch.equal(gpu.zeros, lo)
    deq = (q.float().view(96, -1, INT4_GROUP) * scale.float()[..., None] + lo.float()[..., None]).view(w.shape)
    assert torch.equal(cpu.q4.dequantize(), deq)
    assert torch.equal(tradeoff_kernels.dequantize_w4(gpu.qweight, gpu.scales, gpu.zeros, INT4_GROUP), deq)


def test_int4_kernel_matches_the_dequantized_matmul():
    w = torch.randn(96, 128)
    lin = Int4Linear(w, None, torch.bfloat16)
    q, scale, lo = int4_quantize(w)
    sz = lin.scales_zeros.float()  # [K/g, N, 2], bf16-rounded as the kernel sees them
    deq = (q.float().reshape(96, -1, INT4_GROUP) - 8) * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]
    x = torch.randn(5, 128).bfloat16()
    ref = x.float() @ deq.reshape(96, 128).t()
    torch.testing.assert_close(lin(x).float(), ref, rtol=2e-2, atol=0.15)


def test_int4_prefill_rows_use_the_dense_weight():
    w = torch.randn(96, 128)
    lin = Int4Linear(w, None, torch.bfloat16)
    x = torch.randn(Int4Linear.DENSE_ROWS, 128)
    torch.testing.assert_close(lin(x), F.linear(x.bfloat16(), w.bfloat16()))


@pytest.mark.parametrize("mode, min_agreement", [("int8", 0.9), ("int4", 0.95)])
def test_greedy_agreement_with_fp32_on_the_default_model(default_model, mode, min_agreement):
    prompts = ["What is the capital of France?", "Write a haiku about autumn.", "How do vaccines work?"]
    ref = Transformer(default_model.config)
    ref.load_canonical(default_model.weights)
    quant = Transformer(default_model.config, dtype=torch.bfloat16)
    quant.load_canonical(default_model.weights)
    quantize(quant, mode)
    agree = total = 0
    for p in prompts:
        ids = default_model.tokenizer.encode_chat([{"role": "user", "content": p}])
        cache = StaticKVCache(ref.cfg, len(ids) + 40, ref.dtype)
        new = ids
        for _ in range(40):  # fp32 greedy continuation as the reference sequence
            ids = ids + [int(ref.logits(ref(torch.tensor(new), cache.extend(new), cache))[-1].argmax())]
            new = ids[-1:]
        c1, c2 = (StaticKVCache(m.cfg, len(ids), m.dtype) for m in (ref, quant))
        a = ref.logits(ref(torch.tensor(ids), c1.extend(ids), c1))[-41:-1].argmax(-1)
        b = quant.logits(quant(torch.tensor(ids), c2.extend(ids), c2))[-41:-1].argmax(-1)
        agree += int((a == b).sum())
        total += len(a)
    assert agree / total >= min_agreement, f"{mode}: greedy agreement {agree / total:.3f}"
