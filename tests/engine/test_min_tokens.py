"""min_tokens (vLLM's sampling parameter): before that many tokens, no stop token can be chosen, in either mode,
with or without speculation, and no stop string ends the output; past it, both stop generation as usual."""

import pytest
import torch

from engine import Controls, Engine
from engine.loader import load_tokenizer
from engine.registry import DEFAULT_MODEL
from engine.sampling import SamplingParams
from engine.sequence import Request, Sequence, StopStrings, Stream

# a question the default model answers in a few tokens and then ends with its stop token
SHORT = [{"role": "user", "content": "What is 2 + 2? Answer with the number only."}]


@pytest.fixture(scope="module")
def engine(default_model):
    e = Engine(default_model, spec="ngram")
    yield e
    e.close()


def generate(engine: Engine, **sampling):
    engine.clear_cache()  # both runs of a comparison compute the same way: nothing reused from the one before
    return engine.generate(Request(messages=SHORT, sampling=SamplingParams(max_tokens=48, **sampling)))


@pytest.mark.parametrize("mode,speculation", [("latency", False), ("latency", True), ("batched", False)])
def test_generation_never_stops_before_min_tokens(engine, mode, speculation):
    engine.control(Controls(mode=mode, speculation=speculation))
    free = generate(engine)
    assert free.finish_reason == "stop" and len(free.token_ids) < 24, "the model should end its answer itself"
    n = len(free.token_ids) + 6
    held = generate(engine, min_tokens=n)
    # a stop token chosen early would end the request there, so the length is the check
    assert len(held.token_ids) >= n
    if not speculation:  # greedy and computed alike: only the masked stop token differs, so the answer is kept
        assert held.token_ids[: len(free.token_ids)] == free.token_ids
    # past min_tokens the stop token ends the output again (or the limit does)
    assert held.finish_reason in ("stop", "length")


def test_min_tokens_past_max_tokens_is_refused():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(min_tokens=-1)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEFAULT_MODEL)


def run(tokenizer, words: list[str], **sampling) -> tuple[str, int, str | None]:
    """Feed one token per word through a sequence, as a runner would; (text out, tokens taken, finish reason)."""
    stream = Stream(Request(prompt="x", sampling=SamplingParams(max_tokens=64, **sampling)), None)
    seq = Sequence(stream, tokenizer.encode_text("x"), tokenizer)
    for word in words:
        (tok,) = tokenizer.encode_text(word)
        seq.append([tok], "latency")
        if seq.finished:
            break
    else:
        seq.finish("length")
    return "".join(ev.text for ev in stream), len(seq.output_ids), seq.metrics.finish_reason


WORDS = [" one", " two", " one", " two", " one", " two"]


def test_a_stop_string_ends_the_output_only_past_min_tokens(tokenizer):
    assert run(tokenizer, WORDS, stop=(" two",)) == (" one", 2, "stop")
    # the first two " two"s come within the first 4 tokens: they are text; the third ends past them
    assert run(tokenizer, WORDS, stop=(" two",), min_tokens=4) == (" one two one two one", 6, "stop")
    # one that begins within min_tokens and ends past it counts (vLLM checks where a stop string ends)
    assert run(tokenizer, WORDS, stop=(" one two",), min_tokens=3) == (" one two", 4, "stop")


def test_an_unarmed_stop_string_is_released_as_text():
    s = StopStrings(("STOP",))
    assert s.feed("a STO", armed=False) == ("a ", False)  # "STO" may begin a STOP that ends later: held
    assert s.feed("P", armed=False) == ("STOP", False)  # it ended within min_tokens: just text
    assert s.feed(" b STOP c") == (" b ", True)


def test_stop_tokens_are_masked_only_in_the_rows_before_min_tokens(tokenizer):
    stream = Stream(Request(prompt="x", sampling=SamplingParams(max_tokens=64, min_tokens=3)), None)
    seq = Sequence(stream, tokenizer.encode_text("x"), tokenizer)
    seq.output_ids = [5]  # one token out: rows 0 and 1 (output tokens 2 and 3) may not stop, row 2 may
    logits = torch.zeros(4, 49152)
    masked = seq.mask_stops(logits)
    stops = sorted(seq.stop_ids)
    assert torch.isinf(masked[:2, stops]).all() and torch.isinf(masked).sum() == 2 * len(stops)  # nothing else
    assert not torch.isinf(logits).any()  # a copy: the runner's logits are left as they were
    seq.output_ids = [5, 6, 7]
    assert seq.mask_stops(logits) is None  # past min_tokens: the logits as they are
