"""The committed draft of the default model: it loads onto the target, shares its embedding, predicts the target's
greedy tokens far better than its untrained start, and refuses a target it was not trained for."""

from __future__ import annotations

import pytest
import torch

from engine.draft import DEFAULT_DRAFT_PATH, init_draft, load_draft, read_metadata, save_draft
from engine.kv_cache import StaticKVCache
from engine.loader import ModelLoadError, load
from engine.model import ModelConfig, Transformer

# Chat turns on subjects the distillation prompts never mention (engine/distill.py), with replies written
# by hand: the reference is the target's own greedy choice at every position of the reply.
CONVERSATIONS = [
    ("How do bicycles stay upright?",
     "Bicycles stay upright mainly because the rider keeps steering the front wheel under the bike's centre of mass. "
     "When the bike starts to lean, the rider turns slightly in that direction, which brings the wheels back under "
     "the body. Speed helps, because small steering changes have a bigger effect when the bike is moving quickly."),
    ("Give me three tips for writing clear emails.",
     "1. Start with the main point: say what you need in the first sentence.\n"
     "2. Keep it short: use short paragraphs and remove words that do not add meaning.\n"
     "3. End with a clear next step, such as a question, a deadline or an action you expect."),
    ("Write a Python function that returns the last element of a list.",
     "Here is a simple function:\n\n```python\ndef last_element(items):\n    if not items:\n        return None\n"
     "    return items[-1]\n```\n\nIt returns None for an empty list, and otherwise the element at index -1."),
]


@pytest.fixture(scope="module")
def model():
    loaded = load("smollm2-135m")
    target = Transformer(loaded.config, torch.float32)
    target.load_canonical(loaded.weights)
    return target, loaded.tokenizer


def next_token_guesses(m: Transformer, ids: list[int], reply_from: int) -> torch.Tensor:
    """Top token after every position from `reply_from - 1` on, through the ordinary batch-1 interface."""
    cache = StaticKVCache(m.cfg, len(ids), m.dtype)
    hidden = m(torch.tensor(ids), cache.begin(len(ids)), cache)
    return m.logits(hidden[reply_from - 1 : -1]).argmax(-1)


@pytest.fixture(scope="module")
def conversations(model):
    """(token ids, where the reply starts, the target's top token after each reply position) per conversation."""
    target, tokenizer = model
    out = []
    for question, reply in CONVERSATIONS:
        prompt = tokenizer.encode_chat([{"role": "user", "content": question}])
        ids = prompt + tokenizer.encode(reply)
        out.append((ids, len(prompt), next_token_guesses(target, ids, len(prompt))))
    return out


def agreement(draft: Transformer, conversations: list) -> float:
    hits = sum((next_token_guesses(draft, ids, start) == want).sum().item() for ids, start, want in conversations)
    return hits / sum(len(want) for _, _, want in conversations)


def test_committed_draft_loads_and_shares_the_embedding(model):
    target, _ = model
    draft = load_draft(target)
    assert draft.embed.data_ptr() == target.embed.data_ptr()  # the same storage, not a copy
    meta = read_metadata(DEFAULT_DRAFT_PATH)
    assert draft.cfg.n_layers == len(meta["source_layers"]) < target.cfg.n_layers
    assert DEFAULT_DRAFT_PATH.stat().st_size < 8_500_000

    cache = StaticKVCache(draft.cfg, 8, draft.dtype)
    logits = draft.logits(draft(torch.tensor([1, 9690, 198]), cache.begin(3), cache))
    assert logits.shape == (3, target.cfg.vocab_size)
    outside = torch.ones(target.cfg.vocab_size, dtype=torch.bool)
    outside[draft.vocab_ids] = False
    assert torch.isneginf(logits[:, outside]).all() and torch.isfinite(logits[:, ~outside]).all()


def test_trained_draft_predicts_the_target_far_better_than_its_untrained_start(model, conversations):
    target, _ = model
    trained = load_draft(target)
    untrained = init_draft(target, tuple(read_metadata(DEFAULT_DRAFT_PATH)["source_layers"]), trained.vocab_ids)
    trained_agreement = agreement(trained, conversations)
    untrained_agreement = agreement(untrained, conversations)
    assert trained_agreement > 0.25, (trained_agreement, untrained_agreement)
    assert trained_agreement > untrained_agreement + 0.15, (trained_agreement, untrained_agreement)


def tiny_target(vocab_size: int = 300, dim: int = 32) -> Transformer:
    cfg = ModelConfig(arch="llama", vocab_size=vocab_size, dim=dim, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8,
                      ffn_dim=64, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=64, tie_embeddings=True, qkv_bias=False)
    torch.manual_seed(0)
    target = Transformer(cfg)
    for p in target.parameters():
        p.copy_(torch.randn_like(p) * 0.1)
    return target


def test_a_draft_made_for_another_target_is_refused_with_its_path(model, tmp_path):
    with pytest.raises(ModelLoadError, match=r"smollm2-135m-draft\.safetensors.*another target.*dim 576 != 32"):
        load_draft(tiny_target())
    path = save_draft(init_draft(tiny_target(), (2,), torch.arange(100)), tmp_path / "tiny.safetensors", (2,), {})
    with pytest.raises(ModelLoadError, match=r"tiny\.safetensors.*another target.*vocab_size 300 != 49152"):
        load_draft(model[0], path)
    with pytest.raises(ModelLoadError, match=r"missing\.safetensors: no such draft file"):
        load_draft(model[0], tmp_path / "missing.safetensors")


def test_save_and_load_round_trip(tmp_path):
    target = tiny_target()
    draft = init_draft(target, (1, 2), torch.tensor([0, 5, 7, 299]))
    path = save_draft(draft, tmp_path / "d.safetensors", (1, 2), {"note": "test"})
    again = load_draft(target, path)
    assert again.cfg.n_layers == 2 and again.vocab_ids.tolist() == [0, 5, 7, 299]
    assert read_metadata(path)["training"] == {"note": "test"}
    for (name, a), b in zip(draft.layers.state_dict().items(), again.layers.state_dict().values()):
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0, msg=name)
    for (name, a), b in zip(target.layers[2].state_dict().items(), again.layers[1].state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)  # started as target layer 2, fp16 in the file
    assert again.lm_head.shape == (4, 32) and torch.equal(again.lm_head, target.lm_head[[0, 5, 7, 299]])
