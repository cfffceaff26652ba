"""Latency mode's step paths on the default model: the native kernel for decode and verify rows and, where the setup
chose it, for prompt chunks (cut into `prefill_rows`), against the same runner on a plain fp32 model. The default
GGUF's weights are exactly int4 (its Q4_1 blocks) and its head exactly int8 (Q8_0), so the two compute the same
numbers but for summation order."""

import pytest
import torch

from engine.latency import LatencyRunner
from engine.model import Transformer
from engine.native import build
from engine.setup import Setup, latency_model
from tradeoff_kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.why_unavailable()}")


def test_native_decode_verify_and_chunked_prefill_match_the_fp32_path(default_model):
    model = latency_model(default_model, Setup(decode="native", prefill="native", batched="fp32", threads=2))
    fast, why = build(model, 2)
    assert fast is not None, why
    calls = []
    forward = fast.forward
    fast.forward = lambda ids, cache, rows: calls.append((len(ids), rows)) or forward(ids, cache, rows)
    runner = LatencyRunner(model, 512, native=fast, native_prefill=True, prefill_rows=16)
    reference = Transformer(default_model.config)
    reference.load_canonical(default_model.weights)
    plain = LatencyRunner(reference, 512)

    ids = default_model.tokenizer.encode_chat([{"role": "user", "content": "Name three rivers of Europe and say "
                                                                             "which sea each one flows into."}])
    assert len(ids) > 32 and len(ids) % 16  # three chunks, the last one short
    steps = [(ids, 1), (ids[5:6], 1), (ids[6:10], 4), (ids[10:17], 7)]  # a prompt, a decode step, two verify steps
    for step, rows in steps:
        got, want = runner._forward(step, rows), plain._forward(step, rows)
        assert got.shape == want.shape == (rows, default_model.config.vocab_size)
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
        assert torch.equal(got.argmax(-1), want.argmax(-1))
    n = len(ids)
    assert calls == [(16, 0), (16, 0), (n - 32, 1), (1, 1), (4, 4), (7, 7)]  # only the last chunk's last row has logits
    assert runner.cache.ids == plain.cache.ids and runner.cache.length == plain.cache.length == n + 12


def test_without_native_prefill_prompt_chunks_take_the_dense_path(default_model):
    model = latency_model(default_model, Setup(decode="native", prefill="fp32", batched="fp32", threads=2))
    fast, _ = build(model, 2)
    calls = []
    forward = fast.forward
    fast.forward = lambda ids, cache, rows: calls.append(len(ids)) or forward(ids, cache, rows)
    runner = LatencyRunner(model, 256, native=fast, native_prefill=False)
    runner._forward(list(range(100, 140)), 1)  # a prompt: dense fp32 GEMMs
    runner._forward([7], 1)  # a decode step and a verify step: native
    runner._forward([8, 9, 10], 3)
    assert calls == [1, 3]
