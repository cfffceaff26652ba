"""The OpenAI HTTP API, driven by the official `openai` SDK (and raw HTTP where the SDK would hide the bytes).
Replies are compared with the engine's own output for the same request, so the API adds and loses nothing."""

import json

import httpx
import openai
import pytest

from engine import Controls, Engine, Request, SamplingParams, Snapshot
from tests.conftest import idle, wait_until
from tests.serve.conftest import APIServer, api_app

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def client(api_server):
    with openai.OpenAI(base_url=api_server.url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def local(engine: Engine, request: Request):
    """The engine's own completion, from an empty cache (a reused prefix may flip a near-tie: see test_engine)."""
    engine.clear_cache()
    return engine.generate(request)


def test_models_health_and_errors_shape(served_engine, api_server, client):
    assert [m.id for m in client.models.list().data] == [served_engine.name]
    assert httpx.get(api_server.url.removesuffix("/v1") + "/health").json() == {"status": "ok", "model": served_engine.name}
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-9", messages=QUESTION)
    assert e.value.body["code"] == "model_not_found" and "smollm2" in e.value.body["message"]


def test_chat_matches_the_engine_with_usage(served_engine, client):
    want = local(served_engine, Request(messages=QUESTION, sampling=SamplingParams(max_tokens=12)))
    served_engine.clear_cache()
    got = client.chat.completions.create(model=served_engine.name, messages=QUESTION, max_tokens=12, temperature=0)
    assert got.choices[0].message.content == want.text
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == want.finish_reason
    assert got.usage.prompt_tokens == len(served_engine.tokenizer.encode_chat(QUESTION))
    assert got.usage.completion_tokens == len(want.token_ids)
    assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens


def test_streamed_chat_matches_the_engine(served_engine, client):
    want = local(served_engine, Request(messages=QUESTION, sampling=SamplingParams(max_tokens=24)))
    served_engine.clear_cache()
    chunks = list(client.chat.completions.create(model=served_engine.name, messages=QUESTION, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # streamed, not sent whole
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)
    assert all(c.usage is None for c in chunks[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_cuts_the_reply(served_engine, client, stream):
    full = local(served_engine, Request(messages=QUESTION, sampling=SamplingParams(max_tokens=12))).text
    words = full.split(" ")
    assert len(words) >= 4 and len(words[2]) >= 2, full
    stop = words[2][-2:] + " " + words[3][:2]  # spans two tokens: its first part must be held back, then dropped
    served_engine.clear_cache()
    reply = client.chat.completions.create(model=served_engine.name, messages=QUESTION, max_tokens=12, temperature=0,
                                           stop=[stop, "never appears"], stream=stream)
    if stream:
        chunks = list(reply)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
    assert text == full[: full.index(stop)]
    assert finish == "stop"


def test_completions_take_a_raw_prompt(served_engine, client):
    prompt = "The three primary colours are"
    want = local(served_engine, Request(prompt=prompt, sampling=SamplingParams(max_tokens=10)))
    served_engine.clear_cache()
    got = client.completions.create(model=served_engine.name, prompt=prompt, max_tokens=10, temperature=0)
    assert got.choices[0].text == want.text
    assert got.usage.prompt_tokens == len(served_engine.tokenizer.encode(prompt))
    served_engine.clear_cache()
    streamed = client.completions.create(model=served_engine.name, prompt=prompt, max_tokens=10, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want.text


@pytest.mark.parametrize("change, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0]"),
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"top_p": "high"}, "top_p"),
])
def test_bad_requests_get_400_in_openai_shape(served_engine, client, change, param):
    body = {"model": served_engine.name, "messages": QUESTION, **change}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["message"]


def test_malformed_json_and_too_long_prompts(served_engine, api_server, client):
    r = httpx.post(api_server.url + "/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=served_engine.name, messages=[{"role": "user", "content": "word " * 9000}])
    assert e.value.body["code"] == "context_length_exceeded"


def test_overload_gets_429(served_engine, client):
    served_engine.max_waiting = 0  # every request now finds the queue full
    try:
        with pytest.raises(openai.RateLimitError) as e:
            client.chat.completions.create(model=served_engine.name, messages=QUESTION, max_tokens=4)
        assert "overloaded" in e.value.body["message"]
        with pytest.raises(openai.RateLimitError):  # a streaming request is refused before any chunk
            client.chat.completions.create(model=served_engine.name, messages=QUESTION, max_tokens=4, stream=True)
    finally:
        served_engine.max_waiting = 64
    assert client.chat.completions.create(model=served_engine.name, messages=QUESTION, max_tokens=2).choices  # serving again


def test_client_disconnect_frees_the_request(served_engine, api_server):
    """Mid-stream in batched mode: the sequence is cancelled and its KV blocks return to the pool."""
    served_engine.control(Controls(mode="batched"))
    wait_until(lambda: served_engine.snapshot().state.mode == "batched")
    try:
        body = {"model": served_engine.name, "messages": QUESTION, "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as http, http.stream("POST", api_server.url + "/chat/completions", json=body) as r:
            contents = 0
            for line in r.iter_lines():
                if line.startswith("data:") and json.loads(line[5:])["choices"][0]["delta"].get("content"):
                    contents += 1
                    if contents == 3:
                        break
            assert served_engine.snapshot().state.kv.blocks_used > 0  # the request is running and holds blocks
        wait_until(lambda: idle(served_engine), what="the request to be dropped")
        assert served_engine.snapshot().state.kv.blocks_used == 0
    finally:
        served_engine.control(Controls(mode="latency"))


def test_disconnect_while_queued_cancels_too(served_engine, api_server):
    """Latency mode runs one request at a time: a client that leaves while queued behind it is dropped at once,
    without ever running."""
    ended = []
    served_engine.finish_listeners.append(ended.append)
    long = {"model": served_engine.name, "messages": QUESTION, "max_tokens": 2000, "ignore_eos": True}
    try:
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", api_server.url + "/chat/completions", json={**long, "stream": True}) as first:
                lines = first.iter_lines()  # kept: a dropped line iterator would close the response
                next(lines)  # running, for half a minute
                with pytest.raises(httpx.ReadTimeout):
                    http.post(api_server.url + "/chat/completions", json=long, timeout=0.5)  # queued; the client leaves
                wait_until(lambda: ended, what="the queued request to end")
                assert [(m.finish_reason, m.output_tokens) for m in ended] == [("cancelled", 0)]
    finally:
        served_engine.finish_listeners.remove(ended.append)
    wait_until(lambda: idle(served_engine), what="the server to be idle")


def test_prometheus_metrics_count_requests(served_engine, api_server, client):
    url = api_server.url.removesuffix("/v1") + "/metrics"

    def count(text: str, name: str) -> float:
        lines = [ln for ln in text.splitlines() if ln.startswith(name + "{") and 'user_class="user"' in ln]
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines)

    before = httpx.get(url).text
    client.chat.completions.create(model=served_engine.name, messages=QUESTION, max_tokens=5, temperature=0)
    after = httpx.get(url).text
    ttft_count = "tradeoff:time_to_first_token_seconds_count"
    assert count(after, ttft_count) == count(before, ttft_count) + 1
    assert count(after, "tradeoff:generation_tokens_total") > count(before, "tradeoff:generation_tokens_total")
    assert "tradeoff:num_requests_waiting{" in after and "tradeoff:batched_mode{" in after


def test_control_and_engine_metrics(served_engine, api_server):
    with httpx.Client(base_url=api_server.url) as http:
        assert http.post("/tradeoff/control", json={"mode": "batched"}).status_code == 200
        wait_until(lambda: served_engine.snapshot().state.mode == "batched")
        snapshot = Snapshot.from_json(http.get("/tradeoff/metrics").json())  # the JSON is the typed snapshot, whole
        assert snapshot.state.mode == "batched" and snapshot.state.kv is not None
        assert http.get("/tradeoff/metrics?window_s=2").json()["stats"]["window_s"] <= 2
        assert http.get("/tradeoff/metrics?window_s=-1").status_code == 400
        assert http.post("/tradeoff/control", json={"mode": "turbo"}).status_code == 400
        assert http.post("/tradeoff/control", json={"warp": 9}).json()["error"]["param"] == "warp"
        # refused whole: the bad batch size keeps the mode from changing too, and a bool is not a number
        r = http.post("/tradeoff/control", json={"mode": "latency", "max_batch_size": 0})
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_batch_size"
        assert http.post("/tradeoff/control", json={"max_batch_size": True}).json()["error"]["param"] == "max_batch_size"
        assert served_engine.snapshot().state.mode == "batched"
        assert http.post("/tradeoff/control", json={"mode": "latency"}).status_code == 200
        wait_until(lambda: served_engine.snapshot().state.mode == "latency")


def test_api_key_and_loading(served_engine):
    with APIServer(api_app(served_engine, token="s3cret")) as s:
        with openai.OpenAI(base_url=s.url, api_key="wrong", max_retries=0) as bad:
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
        with openai.OpenAI(base_url=s.url, api_key="s3cret", max_retries=0) as good:
            assert good.models.list().data[0].id == served_engine.name
    with APIServer(api_app(None)) as s:  # no engine yet: still loading
        r = httpx.get(s.url + "/models")
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
        assert httpx.get(s.url.removesuffix("/v1") + "/health").status_code == 503


def test_usage_reports_prefix_cache_hits(served_engine, client):
    served_engine.clear_cache()
    first = client.chat.completions.create(model=served_engine.name, messages=QUESTION, max_tokens=3, temperature=0)
    again = client.chat.completions.create(model=served_engine.name, messages=QUESTION, max_tokens=3, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    # latency mode kept the first request's k/v: all but the last prompt token (which must run to give logits)
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
