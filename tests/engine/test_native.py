"""engine/native.py on the default model: the native step's logits equal the PyTorch fp32 model's (its int4 weights
are the GGUF's own Q4_1 blocks, its int8 head the GGUF's Q8_0 embedding, both exactly), over a prompt prefill, decode
steps and speculative verify steps, and it answers as fp32 does; and the models it refuses, with their reasons."""

from dataclasses import replace

import pytest
import torch

from engine import native as engine_native
from engine.kv_cache import StaticKVCache
from engine.model import Transformer
from engine.quant import quantize
from tests.engine.conftest import load_dequantized
from tradeoff_kernels import native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.why_unavailable()}")

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def int4_pair(default_model):
    """(the int4 model's native step, an fp32 model holding the same int4 weights dequantized and the fp32 head)."""
    model = Transformer(default_model.config)
    model.load_canonical(default_model.weights)
    quantize(model, "int4")  # from the fp32 weights: the GGUF's own Q4_1 codes
    fast, why = engine_native.build(model, n_threads=2)
    assert fast is not None and not why, why
    ref = Transformer(default_model.config)
    ref.load_canonical(default_model.weights)
    return fast, load_dequantized(ref, model)


def test_q8_is_exact_on_the_default_models_embedding(default_model, default_gguf):
    """The tied head: quantize -> dequantize is the identity on the loaded fp32 embedding, and the codes and scales are
    the GGUF file's own Q8_0 blocks."""
    np, gguf = pytest.importorskip("numpy"), pytest.importorskip("gguf")
    embed = default_model.weights["model.embed_tokens.weight"]
    packed = native.quantize_q8(embed)
    assert torch.equal(packed.dequantize(), embed)
    tensor = next(t for t in gguf.GGUFReader(str(default_gguf)).tensors if t.name == "token_embd.weight")
    assert tensor.tensor_type == gguf.GGMLQuantizationType.Q8_0
    blocks = np.asarray(tensor.data).reshape(-1, 34)  # per block of 32: an fp16 scale, then 32 int8 codes
    assert torch.equal(packed.d.flatten(), torch.from_numpy(blocks[:, :2].copy().view(np.float16)).float().flatten())
    assert torch.equal(packed.qs.view(-1, 32), torch.from_numpy(blocks[:, 2:].copy().view(np.int8)))


def test_logits_and_greedy_tokens_match_the_fp32_model(default_model, int4_pair):
    fast, ref = int4_pair
    ids = default_model.tokenizer.encode_chat(FRANCE)
    c_fast, c_ref = StaticKVCache(ref.cfg, 256, torch.float32), StaticKVCache(ref.cfg, 256, torch.float32)

    def both(step: list[int], rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        got = fast.forward(step, c_fast, rows)
        want = ref.logits(ref(torch.tensor(step), c_ref.extend(step), c_ref)[-rows:])
        # measured: max |difference| ~1e-4 on logits up to ~40 (summation order over 30 layers)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3)
        assert c_fast.length == c_ref.length and c_fast.ids == c_ref.ids
        return got, want

    got, want = both(ids, len(ids))  # prefill: blocks of 8 rows, logits for every row
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    tokens = []
    for i in range(12):
        tokens.append(int(want[-1].argmax()))
        assert int(got[-1].argmax()) == tokens[-1]
        if i % 3 == 2:  # a verify step: the next token plus 3 drafts, all rejected, then the cache rewinds
            kept = c_ref.length
            got, want = both([tokens[-1], 11, 12, 13], 4)
            c_fast.truncate(kept + 1)
            c_ref.truncate(kept + 1)
            got, want = got[:1], want[:1]
        else:
            got, want = both(tokens[-1:], 1)
    assert default_model.tokenizer.decode(tokens).strip()


def greedy(step, cfg, prompt: list[int], n: int, stop: frozenset[int]) -> list[int]:
    """Up to n greedy tokens after `prompt`, through step(ids, cache, logit rows) -> logits."""
    cache = StaticKVCache(cfg, len(prompt) + n, torch.float32)
    tokens, ids = [], prompt
    for _ in range(n):
        tokens.append(int(step(ids, cache, 1)[-1].argmax()))
        if tokens[-1] in stop:
            break
        ids = tokens[-1:]
    return tokens


def test_answers_the_france_prompt_as_the_fp32_model_does(default_model, int4_pair):
    """With an int4 head the native step answered "L'Étoile ..." here: the int8 head keeps fp32's answer."""
    fast, ref = int4_pair
    tok = default_model.tokenizer
    prompt = tok.encode_chat(FRANCE)

    def torch_step(ids: list[int], cache: StaticKVCache, rows: int) -> torch.Tensor:
        return ref.logits(ref(torch.tensor(ids), cache.extend(ids), cache)[-rows:])

    want = greedy(torch_step, ref.cfg, prompt, 20, tok.stop_ids)
    assert greedy(fast.forward, ref.cfg, prompt, 20, tok.stop_ids) == want
    assert "Paris" in tok.decode(want)


def test_builds_from_the_engines_bf16_weights_and_full_weights(default_model):
    model = Transformer(default_model.config, dtype=torch.bfloat16, act_dtype=torch.float32)
    model.load_canonical(default_model.weights)
    unquantized, why = engine_native.build(model)  # full weights: quantized to int4 on the way
    assert unquantized is not None and "not the checkpoint's head exactly" in why and "bfloat16" in why
    quantize(model, "int4")
    quantized, why = engine_native.build(model)
    assert quantized is not None and "not the checkpoint's head exactly" in why
    ids = default_model.tokenizer.encode("The capital of France is")
    logits = [m.forward(ids, StaticKVCache(model.cfg, 64, torch.float32), 1) for m in (unquantized, quantized)]
    assert torch.equal(logits[0], logits[1])  # the same codes either way, and the step is deterministic


@pytest.mark.parametrize("change, reason", [
    (dict(act_dtype=torch.bfloat16), "float32"),
    (dict(quant="int8"), "Int8Linear"),
    (dict(dim=48), "multiple of the int4 group"),
])
def test_refuses_what_it_cannot_run_and_says_why(tiny_loaded, change, reason):
    cfg = replace(tiny_loaded.config, dim=change.get("dim", tiny_loaded.config.dim))
    model = Transformer(cfg, act_dtype=change.get("act_dtype"))
    if "quant" in change:
        model.load_canonical(tiny_loaded.weights)
        quantize(model, change["quant"])
    fast, why = engine_native.build(model)
    assert fast is None and reason in why
