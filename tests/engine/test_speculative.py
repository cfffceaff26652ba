"""Speculative decoding is lossless: greedy output is token-identical to plain decoding, and sampling keeps
the target's distribution (checked against the exact distribution of a tiny random model)."""

import itertools

import pytest
import torch

from engine import Engine, Request, SamplingParams
from engine.draft import DEFAULT_DRAFT_PATH, init_draft, save_draft
from engine.kv_cache import StaticKVCache
from engine.model import ModelConfig, Transformer
from engine.sampling import probabilities
from engine.speculative import AdaptiveK, ModelDrafter, NgramDrafter, choose_tokens

TEXT = ("The Amazon rainforest covers much of the Amazon basin of South America. Most of it lies in Brazil, "
        "followed by Peru and Colombia. It holds the largest variety of plants and animals of any rainforest.")
# Prompts where prompt lookup and the draft are mostly right (rewrites, summaries of a given text)
# mixed with open questions where drafts are mostly wrong. Twelve of them: fp32 decoding (exact, so greedy ties cannot
# split the runs) takes ~17 tok/s on an AVX2 CPU, and each drafter runs them all.
PROMPTS = [
    f"Summarise this text in one sentence: {TEXT}",
    f"Repeat the following text exactly: {TEXT}",
    f"Rewrite this text for a child: {TEXT}",
    f"List the countries named in this text: {TEXT}",
    "Rewrite in the passive voice: The cat chased the mouse around the kitchen.",
    "Repeat after me: one two three four five six seven eight nine ten.",
    "Correct the spelling: I recieved teh package yesturday and it was brokn.",
    "Translate to French: Good morning, how are you today?",
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "What is 17 times 23?",
    "Who wrote Romeo and Juliet?",
]
GREEDY = SamplingParams(max_tokens=64)  # 12 x 64 tokens per drafter: every path runs hundreds of times


def run_all(default_model, **engine_kw) -> tuple[list[list[int]], dict]:
    engine = Engine(default_model, dtype=torch.float32, quant="none", **engine_kw)
    try:
        outs = [engine.generate(Request(messages=[{"role": "user", "content": p}], sampling=GREEDY)) for p in PROMPTS]
        return [c.token_ids for c in outs], engine._latency.spec.summary()
    finally:
        engine.close()


@pytest.fixture(scope="module")
def baseline(default_model):
    return run_all(default_model, spec="off")[0]


@pytest.fixture(scope="module")
def wrong_draft_path(default_model, tmp_path_factory):
    """A draft that is mostly wrong: one untrained copy of the target's first layer."""
    target = Transformer(default_model.config)
    target.load_canonical(default_model.weights)
    path = tmp_path_factory.mktemp("draft") / "bad-draft.safetensors"
    save_draft(init_draft(target, (0,), torch.arange(default_model.config.vocab_size)), path, (0,), {"untrained": True})
    return path


@pytest.mark.parametrize("spec", ["ngram", "auto"])
def test_greedy_speculation_is_token_identical(default_model, baseline, spec):
    assert DEFAULT_DRAFT_PATH.is_file()
    outs, stats = run_all(default_model, spec=spec)
    for prompt, want, got in zip(PROMPTS, baseline, outs):
        assert got == want, f"{spec} diverged on {prompt!r}"
    assert stats["acceptance_rate"] > 0 and stats["tokens_per_target_forward"] > 1  # drafts were proposed and used


def test_greedy_with_a_mostly_wrong_draft_is_token_identical(default_model, baseline, wrong_draft_path):
    outs, stats = run_all(default_model, spec="draft", draft=str(wrong_draft_path))
    assert outs == baseline
    assert stats["acceptance_rate"] < 0.5  # the rejection path really ran


# ---- sampling: the output distribution is the target's -----------------------------------------

TINY = ModelConfig(arch="llama", vocab_size=4, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=32,
                   rope_theta=10000.0, norm_eps=1e-5, max_seq_len=16, tie_embeddings=False, qkv_bias=False)
SAMPLE = SamplingParams(temperature=1.0)
PROMPT = [1, 2, 3, 1, 2]


def tiny_model(seed: int, scale: float = 1.0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(TINY)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, scale)
    return m


def run(model: Transformer, cache: StaticKVCache, ids: list[int]) -> torch.Tensor:
    return model.logits(model(torch.tensor(ids), cache.extend(ids), cache))


def first_two_tokens(target, drafter, cache, first_logits, generator) -> tuple[int, int]:
    """The real draft-then-verify step (k = 2) after a sampled first token, as the latency runner runs it."""
    cache.truncate(len(PROMPT))
    ids = PROMPT + choose_tokens([], None, first_logits[None], SAMPLE, generator)
    drafts, q = drafter.propose(ids, 2, SAMPLE, generator)
    out = choose_tokens(drafts, q, run(target, cache, [ids[-1], *drafts]), SAMPLE, generator)
    return ids[-1], out[0]


@pytest.mark.parametrize("drafter_kind", ["model", "ngram"])
def test_sampling_preserves_the_target_distribution(drafter_kind):
    # A nearly flat draft against a peaked target: rejections are frequent and the residual is far from the
    # target, so resampling from the wrong distribution shifts the output by TV ~0.1 (noise is ~0.02).
    target, draft = tiny_model(0, scale=0.5), tiny_model(1, scale=0.05)
    V = TINY.vocab_size
    cache = StaticKVCache(TINY, 16, torch.float32)
    first_logits = run(target, cache, PROMPT)[-1]
    p1 = probabilities(first_logits, SAMPLE)
    exact = torch.stack([p1[a] * probabilities(run(target, StaticKVCache(TINY, 16, torch.float32), PROMPT + [a])[-1],
                                               SAMPLE) for a in range(V)]).flatten()
    drafter = ModelDrafter(draft, 16) if drafter_kind == "model" else NgramDrafter()
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(V * V)
    for _ in range(n):
        a, b = first_two_tokens(target, drafter, cache, first_logits, g)
        counts[a * V + b] += 1
    tv = 0.5 * (counts / n - exact).abs().sum().item()
    # Threshold from the null distribution: the largest TV of 300 exact multinomial samples of the same size.
    null = torch.distributions.Multinomial(n, probs=exact).sample((300,), ) / n
    limit = 0.5 * (null - exact).abs().sum(dim=1).max().item()
    assert tv <= limit, f"total variation {tv:.4f} between speculative samples and the target (noise max {limit:.4f})"


def test_greedy_choice_accepts_matching_drafts_then_corrects_or_adds_a_bonus():
    logits = torch.full((4, 5), -10.0)
    for row, best in enumerate([2, 3, 1, 4]):
        logits[row, best] = 10.0
    params = SamplingParams()
    assert choose_tokens([2, 3, 1], None, logits, params, None) == [2, 3, 1, 4]  # all accepted + bonus
    assert choose_tokens([2, 0, 1], None, logits, params, None) == [2, 3]  # first mismatch -> correction
    assert choose_tokens([], None, logits[:1], params, None) == [2]  # k = 0 is a plain decode step
    assert choose_tokens([2, 0], None, logits[:3], params, None, best=torch.tensor([2, 1, 0])) == [2, 1]  # given argmax


def frequencies(tokens: list[int], V: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=V).double() / len(tokens)


def test_sampling_draws_from_the_sampling_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, -3.0]])
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=0)
    p = probabilities(logits, params)[0].double()
    assert (p == 0).any()  # top-p cut some tokens
    g = torch.Generator().manual_seed(0)
    drawn = [choose_tokens([], None, logits, params, g)[0] for _ in range(8000)]
    freq = frequencies(drawn, 6)
    torch.testing.assert_close(freq, p, atol=0.02, rtol=0)
    assert (freq[p == 0] == 0).all()
    # the request's generator makes the draws reproducible
    assert [choose_tokens([], None, logits, params, torch.Generator().manual_seed(5))[0] for _ in range(3)] == \
        [choose_tokens([], None, logits, params, torch.Generator().manual_seed(5))[0] for _ in range(3)]


@pytest.mark.parametrize("drafter", ["prompt lookup", "model"])
def test_speculative_sampling_keeps_the_target_distribution_row_by_row(drafter):
    """The first emitted token follows p[0]; after an accepted draft the next one follows p[1], and after two p[2]."""
    V = 5
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, V, generator=g) * 1.5
    params = SamplingParams(temperature=1.0, seed=0)
    p = probabilities(logits, params).double()
    q = torch.softmax(logits[:2] + torch.randn(2, V, generator=g), dim=-1)  # a draft near the target: most steps go on
    firsts, seconds, thirds = [], [], []
    for _ in range(12000):
        if drafter == "model":
            drafts, draft_probs = torch.multinomial(q, 1, generator=g)[:, 0].tolist(), q
        else:
            drafts, draft_probs = [0, 2], None  # likely enough that both acceptance and rejection happen often
        out = choose_tokens(drafts, draft_probs, logits, params, g)
        assert 1 <= len(out) <= 3 and out[:-1] == drafts[: len(out) - 1]
        firsts.append(out[0])
        if len(out) > 1 and out[0] == drafts[0]:  # a rejected draft's residual has no mass on it: it was accepted
            seconds.append(out[1])
        if len(out) > 2 and out[1] == drafts[1]:
            thirds.append(out[2])  # the bonus token
    torch.testing.assert_close(frequencies(firsts, V), p[0], atol=0.02, rtol=0)
    assert len(seconds) > 5000
    torch.testing.assert_close(frequencies(seconds, V), p[1], atol=0.02, rtol=0)
    assert len(thirds) > 3000
    torch.testing.assert_close(frequencies(thirds, V), p[2], atol=0.025, rtol=0)


def test_ngram_drafter_copies_what_followed_the_last_match():
    d = NgramDrafter(max_n=3)
    ids = [5, 6, 7, 8, 9, 1, 5, 6, 7]
    assert d.propose(ids, 3, SamplingParams(), None)[0] == [8, 9, 1]
    assert d.propose([1, 2, 3, 4], 3, SamplingParams(), None)[0] == []


def test_adaptive_k_stops_speculating_when_drafts_fail_and_resumes_when_they_succeed():
    a = AdaptiveK(k_max=4, probe_every=8)
    for _ in range(50):
        k = a.choose()
        a.update(k, k, 0, draft_s=0.002 * k, verify_s=0.010 * (1 + 0.05 * k))
    picks = [a.choose() for _ in range(16)]
    assert picks.count(0) >= 14  # no speculation, but an occasional probe
    for _ in range(60):
        k = max(a.choose(), 1)
        a.update(k, k, k, draft_s=0.002 * k, verify_s=0.010 * (1 + 0.05 * k))
    assert a.choose() >= 3


def test_adaptive_k_stops_speculating_where_a_verify_step_costs_nearly_its_rows_in_plain_steps():
    """A compute-bound CPU (AVX2: a step of T rows costs ~1 + 0.9 (T - 1) plain steps): drafts accepted half the time
    do not pay for their rows, so it settles at k = 0, however costly its first guess was."""
    a = AdaptiveK(k_max=6, probe_every=16)
    ks = []
    for _ in range(64):
        k = a.choose()
        ks.append(k)
        a.update(k, k, k // 2, draft_s=0.0005 * k, verify_s=0.010 * (1 + 0.9 * k))
    assert ks[1] == 0  # after the first guess it times a plain step
    assert ks[-32:].count(0) >= 30  # then no speculation, but an occasional probe


def test_cancellation_mid_speculation_leaves_caches_reusable(default_model):
    engine = Engine(default_model, dtype=torch.float32, quant="none", spec="auto")
    try:
        req = Request(messages=[{"role": "user", "content": PROMPTS[1]}], sampling=SamplingParams(max_tokens=100))
        stream = engine.submit(req)
        for _ in itertools.islice(stream, 3):
            pass
        stream.cancel()
        list(stream)
        assert stream.metrics.finish_reason == "cancelled"
        again = engine.generate(Request(messages=[{"role": "user", "content": PROMPTS[8]}], sampling=GREEDY))
        first = engine.generate(req)
    finally:
        engine.close()
    fresh = Engine(default_model, dtype=torch.float32, quant="none", spec="off")
    try:
        assert again.token_ids == fresh.generate(Request(messages=[{"role": "user", "content": PROMPTS[8]}],
                                                          sampling=GREEDY)).token_ids
        assert first.token_ids == fresh.generate(req).token_ids
    finally:
        fresh.close()
