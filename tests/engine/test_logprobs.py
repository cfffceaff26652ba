"""SamplingParams.logprobs: each output token comes with its position's most likely tokens and their
log-probabilities, in every mode, against a plain fp32 forward of the whole sequence; the rows a sequence emits are
exactly its accepted tokens' (a remote backend refuses them: tests/serve/test_remote.py).

The engines run named setups, not the one measured for this machine: the measured one may run bf16 weights, whose
log-probabilities are the model's only to bf16's precision (0.14-0.38 nats off fp32 seen on the Xeon), and which
setup a noisy machine measures varies run to run. Its accuracy is the setup's agreement bar's to vouch for."""

import math

import pytest
import torch

from engine import Controls, Engine
from engine.kv_cache import StaticKVCache
from engine.sampling import SamplingParams
from engine.sequence import Request, Sequence, Stream
from engine.setup import Setup
from tradeoff_kernels import native

# fp32 weights everywhere; and the native int4 kernel's decode steps (exact: the GGUF's int4 and Q8_0 codes, fp32
# activations), whose prompt rows run on fp32 dense copies and then the kernel's head, so the first token's row is exact too
SETUPS = {"fp32": Setup(decode="fp32", prefill="fp32", batched="fp32", threads=1),
          "native": Setup(decode="native", prefill="fp32", batched="fp32", threads=1)}

NATS = 2e-3  # fp32 summation order

PROMPT = [{"role": "user", "content": "Name the three primary colours."}]
K = 5


@pytest.fixture(scope="module", params=list(SETUPS))
def engine(request, default_model):
    if request.param == "native" and not native.available():
        pytest.skip(f"the native kernel is unavailable here: {native.why_unavailable()}")
    e = Engine(default_model, spec="ngram", setup=SETUPS[request.param])
    yield e
    e.close()


def reference_logprobs(fp32_model, ids: list[int]) -> torch.Tensor:
    """log_softmax of one full fp32 forward: row i is the distribution of the token after ids[: i + 1]."""
    cache = StaticKVCache(fp32_model.cfg, len(ids), torch.float32)
    with torch.no_grad():
        return torch.log_softmax(fp32_model.logits(fp32_model(torch.tensor(ids), cache.begin(len(ids)), cache)), -1)


@pytest.mark.parametrize("mode,speculation", [("latency", False), ("latency", True), ("batched", False)])
def test_each_token_carries_its_positions_top_logprobs(engine, fp32_model, default_model, mode, speculation):
    engine.control(Controls(mode=mode, speculation=speculation))
    engine.clear_cache()
    prompt = default_model.tokenizer.encode_chat(PROMPT)
    events = list(engine.submit(Request(prompt_ids=prompt, sampling=SamplingParams(max_tokens=12, logprobs=K))))
    tokens = [t for ev in events for t in ev.token_ids]
    rows = [row for ev in events for row in ev.logprobs]
    assert len(tokens) >= 4 and len(rows) == len(tokens)  # one per token, however many a step emitted
    ref = reference_logprobs(fp32_model, prompt + tokens)
    for i, (token, row) in enumerate(zip(tokens, rows)):
        assert len(row) == K
        assert max(row, key=row.get) == token  # greedy: the emitted token is its position's likeliest
        want = ref[len(prompt) - 1 + i]
        for tid, lp in row.items():
            assert abs(lp - want[tid].item()) <= NATS, (i, tid, lp, want[tid].item())
        assert sorted(row.values(), reverse=True) == pytest.approx(want.topk(K).values.tolist(), abs=NATS)
    engine.control(Controls(mode="latency", speculation=True))


def test_without_logprobs_events_carry_none(engine, default_model):
    engine.control(Controls(mode="latency"))
    events = list(engine.submit(Request(messages=PROMPT, sampling=SamplingParams(max_tokens=4))))
    assert events and all(ev.logprobs == () for ev in events)


def test_only_accepted_tokens_get_rows(default_model):
    """A step's rows beyond a stop token (or the token limit) are not emitted: row i stays with token i."""
    tok = default_model.tokenizer
    stop = next(iter(tok.stop_ids))
    stream = Stream(Request(prompt="x", sampling=SamplingParams(max_tokens=8, logprobs=2)), None)
    seq = Sequence(stream, tok.encode_text("x"), tok)
    logits = torch.full((4, tok.vocab_size), -30.0)
    for row, (a, b) in enumerate([(10, 11), (12, 13), (stop, 14), (15, 16)]):
        logits[row, a], logits[row, b] = 2.0, 1.0
    seq.append([10, 12, stop, 15], "latency", logits=logits)
    ev = stream._events.get()
    assert ev.token_ids == [10, 12] and len(ev.logprobs) == 2
    others = (tok.vocab_size - 2) * math.exp(-30.0)
    norm = math.log(math.exp(2.0) + math.exp(1.0) + others)
    assert ev.logprobs[0] == pytest.approx({10: 2.0 - norm, 11: 1.0 - norm})
    assert ev.logprobs[1] == pytest.approx({12: 2.0 - norm, 13: 1.0 - norm})
    assert seq.finished and seq.metrics.finish_reason == "stop"


def test_bad_logprobs_are_refused():
    for bad in (-1, 21):
        with pytest.raises(ValueError, match="logprobs"):
            SamplingParams(logprobs=bad)
