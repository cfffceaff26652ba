"""The committed trained draft (engine.draft.Draft) on the native step: the kernel's head is its int8 subset head, the
logits come back full-vocabulary with -inf outside the subset (as Draft.logits returns them), and a ModelDrafter
drafting natively proposes what the torch draft with the same weights proposes."""

import pytest
import torch

from engine import native as engine_native
from engine.draft import DEFAULT_DRAFT_PATH, load_draft
from engine.kv_cache import StaticKVCache
from engine.model import Transformer
from engine.quant import quantize
from engine.sampling import SamplingParams
from engine.speculative import ModelDrafter
from tests.engine.conftest import load_dequantized
from tradeoff_kernels import native

pytestmark = [pytest.mark.skipif(not native.available(), reason=f"native kernel unavailable: {native.why_unavailable()}"),
              pytest.mark.skipif(not DEFAULT_DRAFT_PATH.is_file(), reason="no committed draft")]

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a CPU cache is in two sentences."]


@pytest.fixture(scope="module")
def drafts(default_model):
    """(the int4 draft's native step, an fp32 draft holding the same int4 weights dequantized and the fp32 subset head)."""
    target = Transformer(default_model.config)
    target.load_canonical(default_model.weights)
    draft = quantize(load_draft(target), "int4")  # as build_drafter makes it
    fast, why = engine_native.build(draft, n_threads=2)
    assert fast is not None and not why, why
    ref = load_draft(target)
    return fast, load_dequantized(ref, draft)


def test_logits_are_full_vocabulary_and_match_the_torch_draft(default_model, drafts):
    fast, ref = drafts
    ids = default_model.tokenizer.encode_chat([{"role": "user", "content": PROMPTS[0]}])
    c_fast, c_ref = StaticKVCache(ref.cfg, 128, torch.float32), StaticKVCache(ref.cfg, 128, torch.float32)
    outside = torch.ones(ref.cfg.vocab_size, dtype=torch.bool).index_fill_(0, ref.vocab_ids, False)
    for step, rows in [(ids, len(ids)), ([11], 1), ([12, 13, 14, 15], 4), ([16], 1)]:
        got = fast.forward(step, c_fast, rows)
        want = ref.logits(ref(torch.tensor(step), c_ref.extend(step), c_ref)[-rows:])
        assert got.shape == (rows, ref.cfg.vocab_size)
        assert (got[:, outside] == float("-inf")).all() and got[:, ~outside].isfinite().all()
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)  # measured: ~3e-5 on logits up to ~25; -inf matches -inf
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_a_native_model_drafter_proposes_what_the_torch_one_does(default_model, drafts, monkeypatch):
    fast, ref = drafts
    greedy = SamplingParams()
    native_steps = []
    monkeypatch.setattr(fast, "forward", lambda *args: native_steps.append(args[0]) or type(fast).forward(fast, *args))
    for prompt in PROMPTS:
        ids = default_model.tokenizer.encode_chat([{"role": "user", "content": prompt}])
        on, off = ModelDrafter(ref, 256, native=fast), ModelDrafter(ref, 256)
        for k in (5, 3, 6, 4):
            proposed, probs = on.propose(ids, k, greedy, None)
            assert (proposed, probs) == off.propose(ids, k, greedy, None) and len(proposed) == k
            assert on.cache.ids == off.cache.ids
            ids = ids + proposed[:2] + [int(ref.vocab_ids[k])]  # two accepted, then a correction: the rest is rewound
    assert len(native_steps) == len(PROMPTS) * (5 + 3 + 6 + 4)  # every drafted token came from the native step
