"""The setup chooser: it picks the fastest candidate that keeps fp32's greedy choices, a cached choice is reused only
for the same CPU, torch and model, a corrupt entry is measured again, the user's --quant/--dtype win, and every
candidate it could pick agrees with fp32 on prompts it never measured."""

import json
from dataclasses import replace

import pytest
import torch

from engine import setup
from engine.setup import ACCURACY_BAR, Setup, Timing, impose, pick

NATIVE = Setup(decode="native", prefill="fp32", batched="bf16", threads=2, why="measured")


def test_pick_takes_the_fastest_candidate_that_meets_the_bar():
    timings = [Timing("native", 0.010, 0.90), Timing("int4", 0.015, 0.99), Timing("bf16", 0.030, 1.0),
               Timing("int8", 0.012, None)]
    assert pick(timings, bar=0.95).name == "int4"  # native is faster but loses greedy choices; int8 was never checked
    assert pick(timings, bar=0.85).name == "native"
    with pytest.raises(ValueError, match="no candidate"):
        pick([Timing("native", 0.01, 0.5)], bar=0.95)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TRADEOFF_CACHE", str(tmp_path))
    return tmp_path


def test_a_cached_choice_is_reused_only_for_the_same_machine_torch_and_model(cache, tiny_loaded, monkeypatch):
    measured = []
    monkeypatch.setattr(setup, "measure", lambda loaded, say: measured.append(loaded.name) or NATIVE)
    assert setup.choose(tiny_loaded) == NATIVE and measured == ["tiny-random"]
    assert setup.choose(tiny_loaded) == NATIVE and len(measured) == 1  # from the cache
    key = setup.cache_key(tiny_loaded)
    for field, other in (("cpu", "AMD EPYC 7B13|25/1|x86_64|avx2 fma|AVX2|"), ("torch", "9.9.9"), ("model", "another")):
        assert setup.load_cached({**key, field: other}) is None  # another CPU, torch or model: not this entry
    monkeypatch.setattr(setup, "cache_key", lambda loaded: {**key, "torch": "9.9.9"})
    setup.choose(tiny_loaded)
    assert len(measured) == 2  # a new torch is measured again


@pytest.mark.parametrize("damage", ["not json", json.dumps({"key": "wrong"}), json.dumps({}),
                                    "truncated: {\"key\": {", "setup with a bad field"])
def test_a_corrupt_cache_entry_is_measured_again(cache, tiny_loaded, monkeypatch, damage):
    monkeypatch.setattr(setup, "measure", lambda loaded, say: NATIVE)
    key = setup.cache_key(tiny_loaded)
    path = setup.cache_path(key)
    path.parent.mkdir(parents=True)
    if damage == "setup with a bad field":
        damage = json.dumps({"key": key, "setup": {**NATIVE.__dict__, "decode": "int3"}})
    path.write_text(damage)
    assert setup.load_cached(key) is None
    assert setup.choose(tiny_loaded) == NATIVE
    assert setup.load_cached(key) == NATIVE  # the fresh measurement replaced it


def test_quant_and_dtype_are_imposed():
    assert impose(NATIVE, None, None) is NATIVE
    bf16 = impose(NATIVE, None, torch.bfloat16)
    assert (bf16.decode, bf16.prefill, bf16.batched) == ("native", "bf16", "bf16")
    none = impose(NATIVE, "none", None)
    assert (none.decode, none.prefill) == ("fp32", "fp32")  # dense decode weights are the prefill weights too
    assert impose(NATIVE, "int8", torch.float32).decode == "int8"
    dense = replace(NATIVE, decode="bf16", prefill="bf16")
    assert impose(dense, "int4", None).decode in ("native", "int4")
    assert impose(replace(NATIVE, prefill="native"), "int4", None).prefill == "native"
    assert impose(replace(NATIVE, prefill="native"), "int8", None).prefill == "fp32"  # the kernel prefills for itself only
    with pytest.raises(ValueError, match="prefill weights"):
        Setup(decode="bf16", prefill="fp32", batched="fp32", threads=1)


HELD_OUT = ["Explain photosynthesis in simple terms.", "Give three tips for learning a language.",
            "Describe the water cycle.", "What does a CPU do?", "How do vaccines work?"]


def test_every_decode_candidate_the_chooser_would_pass_also_agrees_on_held_out_prompts(default_model):
    """What the chooser measures on one reply must hold on others: a candidate whose short check passes the bar
    keeps fp32's greedy choice on replies to prompts it never saw (within a small margin for the sample size)."""
    models: dict = {}
    reference = setup.dense_model(default_model, "fp32", models)
    tok = default_model.tokenizer
    held_out = []  # (prompt length, prompt + fp32's greedy reply, fp32's top-1 at each reply position): once for all
    for question in HELD_OUT:
        prompt = tok.encode_chat([{"role": "user", "content": question}])
        ids = prompt + greedy_reply(reference, prompt, 24)
        held_out.append((len(prompt), ids, setup.teacher_forced(reference, ids, len(prompt))))
    passed = 0
    for name in setup.DECODES:
        model, step = setup.decode_candidate(default_model, name, models, torch.get_num_threads())
        if step is None:
            continue  # the native kernel cannot run here
        prompt = tok.encode_chat([{"role": "user", "content": f"Summarise this in one sentence: {setup.PASSAGE}"}])
        ids = prompt + tok.encode(setup.REPLY)
        calibration = setup.agreement_of(step, model, ids, len(prompt), setup.teacher_forced(reference, ids, len(prompt)))
        if calibration < ACCURACY_BAR:
            continue  # never picked
        passed += 1
        agree = total = 0
        for prompt_len, ids, want in held_out:
            agree += round(setup.agreement_of(step, model, ids, prompt_len, want) * len(want))
            total += len(want)
        assert agree / total >= ACCURACY_BAR - 0.03, f"{name}: {agree}/{total} held-out positions agree with fp32"
    assert passed >= 2  # fp32 itself, and at least one faster format


def greedy_reply(model, prompt: list[int], n: int) -> list[int]:
    cache = setup.StaticKVCache(model.cfg, len(prompt) + n, model.dtype)
    step = setup.torch_step(model)
    ids, out = list(prompt), []
    logits = step(ids, cache, 1)
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = step(out[-1:], cache, 1)
    return out
