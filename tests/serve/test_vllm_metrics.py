"""`tradeoff serve` speaks vLLM's dialects: its /metrics has vLLM's series (names, types, labels and buckets as in
tests/serve/vllm_metrics_reference.py, read from vLLM's source) whose counters move with requests, and each
response carries vLLM's per-request speculative decoding metrics, equal to the engine's own counts."""

import json
import math

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine import Engine
from tests.conftest import wait_until
from tests.serve.conftest import APIServer, api_app
from tests.serve.vllm_metrics_reference import (
    FINISH_REASONS,
    REFERENCE,
    REQUEST_TOKENS,
    request_token_buckets,
)

# a prompt that repeats itself, so prompt lookup drafts, and its drafts are often right
REPEAT = "Repeat this list exactly: red, green, blue, red, green, blue, red, green, blue, red, green, blue"


@pytest.fixture(scope="module")
def spec_engine(default_model):
    e = Engine(default_model, spec="ngram")
    yield e
    e.close()


@pytest.fixture(scope="module")
def server(spec_engine):
    with APIServer(api_app(spec_engine)) as s:
        yield s


def scrape(server) -> dict:
    text = httpx.get(server.url.removesuffix("/v1") + "/metrics", timeout=30).text
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, family: str, sample: str, **labels) -> float:
    """The one sample of `family` named `sample` whose labels include `labels` (0 when there is none yet)."""
    found = [s.value for s in families[family].samples if s.name == sample and labels.items() <= s.labels.items()]
    assert len(found) <= 1, f"{sample} {labels}: {len(found)} series"
    return found[0] if found else 0.0


def complete(server, chat: bool, stream: bool, max_tokens: int = 24) -> dict:
    """One greedy request; (for a stream) the final usage chunk, which carries usage and metrics."""
    body = {"model": "smollm2-135m", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body |= {"messages": [{"role": "user", "content": REPEAT}]} if chat else {"prompt": REPEAT + ", red,"}
    path = "/chat/completions" if chat else "/completions"
    if not stream:
        r = httpx.post(server.url + path, json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", server.url + path, json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    assert all("metrics" not in c for c in chunks[:-1])  # as vLLM: only in the usage chunk
    assert chunks[-1]["choices"] == []
    return chunks[-1]


def test_vllm_names_types_labels_and_buckets_match_vllms(spec_engine, server):
    complete(server, chat=True, stream=False)  # one request that speculated, so speculation's series exist
    families = scrape(server)
    for ref in REFERENCE:
        assert ref.name in families, f"{ref.name} is not exported"
        family = families[ref.name]
        assert family.type == ref.type, f"{ref.name} is a {family.type}, vLLM's is a {ref.type}"
        assert family.samples, f"{ref.name} has no series"
        for s in family.samples:
            assert set(s.labels) - {"le"} == set(ref.labels), f"{s.name} labels {sorted(s.labels)}, vLLM's {ref.labels}"
            assert s.labels["model_name"] == "smollm2-135m" and s.labels["engine"] == "0"
        if ref.type == "histogram":
            buckets = request_token_buckets(spec_engine.max_seq_len) if ref.buckets == REQUEST_TOKENS else ref.buckets
            bounds = sorted(float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket"))
            assert bounds == [*map(float, buckets), math.inf], f"{ref.name} buckets"
    reasons = {s.labels["finished_reason"] for s in families["vllm:request_success"].samples}
    assert reasons == set(FINISH_REASONS)
    positions = {s.labels["position"] for s in families["vllm:spec_decode_num_accepted_tokens_per_pos"].samples}
    assert positions == {str(p) for p in range(6)}  # latency mode drafts at most k_max = 6 tokens a step
    # the gauges are the engine's state, read at scrape time
    state = spec_engine.snapshot().state
    assert value(families, "vllm:num_requests_running", "vllm:num_requests_running") == state.running
    assert value(families, "vllm:num_requests_waiting", "vllm:num_requests_waiting") == state.waiting


def test_counters_move_with_requests(spec_engine, server):
    before = scrape(server)
    reply = complete(server, chat=False, stream=True, max_tokens=20)
    ended = value(before, "vllm:request_success", "vllm:request_success_total", finished_reason="length") + 1

    def after() -> dict:
        return scrape(server)

    # the counters take a request when it ends, on the engine's thread: soon after its answer
    wait_until(lambda: value(after(), "vllm:request_success", "vllm:request_success_total",
                             finished_reason="length") == ended, 30, "the request to be counted")
    now = after()

    def moved(family: str, sample: str, **labels) -> float:
        return value(now, family, sample, **labels) - value(before, family, sample, **labels)

    usage, spec = reply["usage"], reply["metrics"]["speculative_decoding"]
    assert moved("vllm:prompt_tokens", "vllm:prompt_tokens_total") == usage["prompt_tokens"]
    assert moved("vllm:generation_tokens", "vllm:generation_tokens_total") == usage["completion_tokens"] == 20
    assert moved("vllm:e2e_request_latency_seconds", "vllm:e2e_request_latency_seconds_count") == 1
    assert moved("vllm:time_to_first_token_seconds", "vllm:time_to_first_token_seconds_count") == 1
    assert moved("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_drafts_total") == spec["num_spec_steps"]
    assert moved("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_draft_tokens_total") == spec["num_draft_tokens"]
    assert moved("vllm:spec_decode_num_accepted_tokens", "vllm:spec_decode_num_accepted_tokens_total") == \
        spec["num_accepted_draft_tokens"] > 0
    # position p counts the steps that accepted more than p drafts
    hist = spec["acceptance_histogram"]
    for p in range(6):
        assert moved("vllm:spec_decode_num_accepted_tokens_per_pos", "vllm:spec_decode_num_accepted_tokens_per_pos_total",
                     position=str(p)) == sum(hist[p + 1:])
    # the ITL histogram took one gap per emission after the first; generated tokens are more (speculation)
    gaps = moved("vllm:inter_token_latency_seconds", "vllm:inter_token_latency_seconds_count")
    assert 1 <= gaps < usage["completion_tokens"] - 1


@pytest.mark.parametrize("chat,stream", [(True, False), (True, True), (False, False), (False, True)])
def test_a_responses_speculation_metrics_are_the_engines_counts(spec_engine, server, chat, stream):
    ended = []
    spec_engine.finish_listeners.append(ended.append)
    try:
        reply = complete(server, chat, stream)
        wait_until(lambda: ended, 30, "the request's final metrics")
    finally:
        spec_engine.finish_listeners.remove(ended.append)
    (m,) = ended
    got = reply["metrics"]["speculative_decoding"]
    hist = m.spec.accepted_hist
    assert hist and sum(hist) > 0, "the request should have speculated"
    steps, accepted = sum(hist), sum(j * n for j, n in enumerate(hist))
    assert got == {"mean_acceptance_length": 1 + accepted / steps, "draft_acceptance_rate": accepted / m.spec.drafted,
                   "acceptance_histogram": hist, "num_spec_steps": steps, "num_accepted_draft_tokens": accepted,
                   "num_draft_tokens": m.spec.drafted, "num_spec_tokens": len(hist) - 1}
    # and those counts are the engine's: every accepted draft was emitted, one target token per decode step besides
    assert accepted == m.spec.accepted
    assert reply["usage"]["completion_tokens"] == m.output_tokens <= 1 + m.spec.steps + accepted


def test_no_speculation_metrics_without_speculation(spec_engine, server):
    from engine import Controls

    spec_engine.control(Controls(speculation=False))
    try:
        reply = complete(server, chat=True, stream=False)
    finally:
        spec_engine.control(Controls(speculation=True))
    assert "metrics" not in reply  # as vLLM launched without a speculative config


def test_min_tokens_reaches_the_engine_and_is_checked(server):
    from serve.openai_api import APIError, parse_sampling

    short = {"model": "smollm2-135m", "max_tokens": 40, "temperature": 0,
             "messages": [{"role": "user", "content": "What is 2 + 2? Answer with the number only."}]}
    free = httpx.post(server.url + "/chat/completions", json=short, timeout=120).json()
    assert free["choices"][0]["finish_reason"] == "stop"
    n = free["usage"]["completion_tokens"] + 5
    held = httpx.post(server.url + "/chat/completions", json={**short, "min_tokens": n}, timeout=120).json()
    assert held["usage"]["completion_tokens"] >= n
    for bad in (-1, 41, True, 2.5):
        with pytest.raises(APIError) as e:
            parse_sampling({"max_tokens": 40, "min_tokens": bad}, 2048)
        assert e.value.status == 400 and e.value.param == "min_tokens"
