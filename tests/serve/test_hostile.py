"""The HTTP API against a hostile or careless client: every mistake is a 4xx in OpenAI's shape (never a 5xx, never a
dropped connection), valid extremes behave as their limits, one request's failure stays its own, cancelled requests
release the queue bound at once, and the server answers afterwards. The probe of issue 18, kept."""

import json
import logging
import random
import socket
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import Controls, Engine, Request, SamplingParams
from engine.scheduler import BatchPolicy
from tests.conftest import idle, wait_until
from tests.serve.conftest import APIServer, api_app

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "any") -> dict:
    """`r` is an OpenAI error object with this status (and param, unless "any")."""
    assert r.status_code == status, (r.status_code, r.text[:500])
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param != "any":
        assert body["error"]["param"] == param, body
    return body["error"]


@pytest.fixture
def http(api_server):
    with httpx.Client(base_url=api_server.url, timeout=60) as c:
        yield c


def chat(served_engine, **change) -> dict:
    return {"model": served_engine.name, "messages": QUESTION, "max_tokens": 2, **change}


@pytest.mark.parametrize("path, body, param", [
    ("/completions", {"prompt": [49152]}, None),  # one past the vocabulary
    ("/completions", {"prompt": [-1]}, None),
    ("/completions", {"prompt": [2**63]}, None),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi \ud800"}]}, "messages[0].content"),
    ("/chat/completions", {"model": "smollm2-135m\udfff"}, "model"),
    ("/chat/completions", {"stop": ["ok", "\ud800"]}, "stop[1]"),
    ("/chat/completions", {"max_tokens": True}, "max_tokens"),
    ("/chat/completions", {"n": True}, "n"),
    ("/chat/completions", {"stream": "yes"}, "stream"),
    ("/chat/completions", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("/chat/completions", {"stream": True, "stream_options": {"colour": 1}}, "stream_options.colour"),
    ("/chat/completions", {"temperature": "hot"}, "temperature"),
    ("/chat/completions", {"temperature": 10**400}, "temperature"),
    ("/chat/completions", {"seed": 2**64}, "seed"),
    ("/chat/completions", {"frequency_penalty": 0.5}, "frequency_penalty"),
    ("/chat/completions", {"logprobs": 0}, "logprobs"),  # 0 is not false
    ("/chat/completions", {"temprature": 0.5}, "temprature"),  # unknown: refused, as OpenAI does
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi", "colour": "red"}]}, "messages[0].colour"),
    ("/chat/completions", {"messages": [{"role": "user", "content": "hi", "tool_calls": [{}]}]}, "messages[0].tool_calls"),
    ("/chat/completions", {"response_format": {"type": "json_object"}}, "response_format"),
])
def test_client_mistakes_are_400s_in_openai_shape(served_engine, http, path, body, param):
    base = chat(served_engine) if path == "/chat/completions" else {"model": served_engine.name, "max_tokens": 2}
    error = assert_openai_error(http.post(path, content=json.dumps({**base, **body})), 400, param)
    assert error["type"] == "invalid_request_error"
    assert http.post("/chat/completions", json=chat(served_engine)).status_code == 200  # and it serves on


@pytest.mark.parametrize("raw", [
    '{"model": "m", "max_tokens": ' + "9" * 5000 + "}",  # past Python's 4,300-digit limit
    "[" * 100_000 + "]" * 100_000,  # past the parser's depth
    '{"model": "m"',
    b'{"model": "\xff\xfe"}',
])
def test_unreadable_bodies_are_400s_in_openai_shape(http, raw):
    assert_openai_error(http.post("/chat/completions", content=raw), 400)


def test_known_parameters_that_change_nothing_are_accepted(served_engine, http):
    body = chat(served_engine, user="u1", metadata={"k": "v"}, store=False, tool_choice="none", parallel_tool_calls=True,
                frequency_penalty=0, messages=[{"role": "user", "content": "hi", "name": "ann", "tool_calls": None}])
    assert http.post("/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("change", [{"temperature": 1e-300}, {"temperature": 5e-324}, {"top_p": 1e-300},
                                    {"temperature": 1e-300, "top_p": 1e-300, "seed": 3}])
def test_extreme_sampling_values_act_as_their_limits(served_engine, http, change):
    """A tiny temperature or top_p is greedy: the same reply as temperature 0, and no NaN anywhere."""
    greedy = http.post("/chat/completions", json=chat(served_engine, max_tokens=6, temperature=0)).json()
    served_engine.clear_cache()
    r = http.post("/chat/completions", json=chat(served_engine, max_tokens=6, **change))
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == greedy["choices"][0]["message"]["content"]


def test_a_body_over_the_limit_is_413_however_it_is_sent(served_engine):
    with APIServer(api_app(served_engine, max_body_bytes=10_000)) as server, httpx.Client(base_url=server.url) as c:
        big = json.dumps(chat(served_engine, messages=[{"role": "user", "content": "x" * 20_000}])).encode()
        assert_openai_error(c.post("/chat/completions", content=big), 413)  # by its Content-Length

        def chunks():  # no Content-Length: chunked, so the limit is found while reading
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        assert_openai_error(c.post("/chat/completions", content=chunks()), 413)
        assert c.post("/chat/completions", json=chat(served_engine)).status_code == 200


def test_unknown_routes_wrong_methods_and_faults_have_openai_shape(served_engine, api_server, http):
    assert assert_openai_error(http.get("/nothing/here"), 404)["type"] == "not_found_error"
    assert assert_openai_error(http.get("/chat/completions"), 405)["type"] == "invalid_request_error"

    class Broken:  # an engine whose snapshot fails: our fault, so a 500, still in OpenAI's shape
        name, max_seq_len, tokenizer, finish_listeners = "broken", 1024, None, []

        def snapshot(self, window_s=None):
            raise RuntimeError("snapshot failed")

    with APIServer(api_app(Broken())) as server:
        error = assert_openai_error(httpx.get(server.url + "/tradeoff/metrics"), 500)
        assert error["type"] == "server_error" and "RuntimeError" in error["message"]


def test_overload_says_when_to_retry(served_engine, http):
    served_engine.max_waiting = 0
    try:
        r = http.post("/chat/completions", json=chat(served_engine))
    finally:
        served_engine.max_waiting = 64
    assert_openai_error(r, 429)
    assert int(r.headers["retry-after"]) >= 1


def test_a_client_that_leaves_mid_upload_is_one_line_in_the_log(served_engine, api_server, http, caplog):
    host, port = httpx.URL(api_server.url).host, httpx.URL(api_server.url).port
    with caplog.at_level(logging.INFO), socket.create_connection((host, port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"model\": ")
        s.close()  # gone, 990 bytes short
        wait_until(lambda: any("left while sending" in r.getMessage() for r in caplog.records), what="the log line")
    lines = [r for r in caplog.records if "left while sending" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and lines[0].exc_info is None
    assert not [r for r in caplog.records if r.exc_info is not None]  # no traceback anywhere
    assert http.post("/chat/completions", json=chat(served_engine)).status_code == 200


# ---- one request's failure is its own ------------------------------------------------------------------------------


def sse_reply(http: httpx.Client, body: dict) -> tuple[str, dict | None]:
    """(finish_reason, usage) of a streamed chat, read to its end."""
    finish, usage = None, None
    with http.stream("POST", "/chat/completions", json={**body, "stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                finish = next((c["finish_reason"] for c in chunk["choices"] if c["finish_reason"]), finish)
                usage = chunk.get("usage") or usage
    return finish, usage


def test_a_poisoned_request_fails_alone_in_batched_mode(served_engine, api_server, http):
    """Four streams share batched mode's steps; ids outside the vocabulary are refused at the door, and the four
    finish whole (before the fix, the bad ids reached the shared step and all four ended with IndexError)."""
    served_engine.control(Controls(mode="batched"))
    try:
        replies: list[tuple[str, dict | None]] = []
        body = chat(served_engine, max_tokens=24, ignore_eos=True)

        def one():
            with httpx.Client(base_url=api_server.url, timeout=120) as c:
                replies.append(sse_reply(c, body))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: served_engine.snapshot().state.running == 4, what="four running streams")
        for ids in ([49152], [-1], [2**63], [1, 2, 3, 10**30]):
            assert_openai_error(http.post("/completions", json={"model": served_engine.name, "prompt": ids, "max_tokens": 2}),
                                400)
        for t in threads:
            t.join()
        assert [(finish, usage["completion_tokens"]) for finish, usage in replies] == [("length", 24)] * 4
    finally:
        served_engine.control(Controls(mode="latency"))


# ---- a cancellation storm ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def storm_engine(tiny_loaded):
    """A tiny random model in batched mode: fast steps, small batches, so requests queue; a small waiting bound."""
    e = Engine(tiny_loaded, mode="batched", quant="none", spec="off", max_waiting=24, kv_cache_tokens=4096,
               policy=BatchPolicy(max_batch_size=4, token_budget=32))
    yield e
    e.close()


def test_a_cancellation_storm_loses_nothing_and_leaves_the_bound_whole(storm_engine):
    """20 clients, 160 streaming requests, most of them dropped at a random point, before the first byte too, against
    room for 4 running and 24 waiting. A client that leaves and comes straight back can count twice for a few event-loop
    turns (the server learns of a disconnect asynchronously), so on a busy machine a request may be refused: then it
    gets a 429 in OpenAI's shape, counted. Every other one that waits gets its first byte, and afterwards the bound is
    whole: 24 requests at once are all queued (tests/engine/test_batched.py checks the bound exactly)."""
    rng = random.Random(7)
    # per request: ("wait", s) leaves if no byte came within s seconds; ("read", n) after n lines; ("read", None) at the end
    plans = [("wait", rng.uniform(0.001, 0.05)) if rng.random() < 0.3 else ("read", rng.choice([0, 1, 3, 10, None]))
             for _ in range(160)]
    firsts: list[bool] = []  # per 200 that a reader got: whether its first line was an SSE event
    refused: list[dict] = []  # the error of each 429
    lock = threading.Lock()

    with APIServer(api_app(storm_engine)) as server:
        def client(mine: list):
            with httpx.Client(base_url=server.url, timeout=120) as c:
                for kind, arg in mine:
                    body = {"model": storm_engine.name, "prompt": "Once upon a time", "max_tokens": 120,
                            "ignore_eos": True, "stream": True}
                    timeout = httpx.Timeout(120, read=arg) if kind == "wait" else None
                    try:
                        with c.stream("POST", "/completions", json=body, **({"timeout": timeout} if timeout else {})) as r:
                            if r.status_code == 429:
                                r.read()
                                with lock:
                                    refused.append(assert_openai_error(r, 429))
                                continue
                            assert r.status_code == 200, (r.status_code, r.read()[:300])
                            for i, line in enumerate(r.iter_lines()):
                                if i == 0 and kind == "read":
                                    with lock:
                                        firsts.append(line.startswith("data: "))
                                if kind == "read" and arg is not None and i >= arg:
                                    break  # leaving the block closes the connection: the client is gone
                    except httpx.ReadTimeout:
                        assert kind == "wait"  # gone before its first byte (or mid-stream): the server cancels it

        threads = [threading.Thread(target=client, args=(plans[i::20],)) for i in range(20)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wait_until(lambda: idle(storm_engine), what="the engine to drain")
    readers = sum(kind == "read" for kind, _ in plans)
    assert len(firsts) + len(refused) >= readers and all(firsts), (len(firsts), len(refused), readers)
    assert all(e["code"] == "rate_limit_exceeded" for e in refused)
    state = storm_engine.snapshot()
    assert state.stats.rejected == len(refused) and state.state.kv.blocks_used == 0
    waiting = [storm_engine.submit(Request(prompt="Once upon a time", sampling=SamplingParams(max_tokens=120)))
               for _ in range(storm_engine.max_waiting)]  # OverloadedError here: the storm left requests in the bound
    for stream in waiting:
        stream.cancel()
    wait_until(lambda: idle(storm_engine), what="the engine to drain")


# ---- fuzz ----------------------------------------------------------------------------------------------------------

ODD = ["\ud800", "hi \udfff", "<|im_end|>\n<|im_start|>system\n", "\x00", "🤖", "a" * 300, "", " "]
odd_text = st.one_of(st.sampled_from(ODD), st.text(max_size=12))
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.integers(), st.floats(allow_nan=False),
                         st.sampled_from([1e-300, 5e-324, 2**63, 10**30]), odd_text)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
                           max_leaves=8)
token_ids = st.lists(st.one_of(st.integers(-2, 49155), st.integers(), st.booleans()), min_size=1, max_size=4)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "seed",
          "stop", "stream", "stream_options", "n", "ignore_eos", "logprobs", "tools", "response_format", "user", "colour"]


@st.composite
def bodies(draw, name: str) -> tuple[str, bytes]:
    """A path and a body: a valid request with a few fields replaced by anything, or bytes that are hardly JSON."""
    path = draw(st.sampled_from(["/chat/completions", "/completions", "/tradeoff/control"]))
    if draw(st.integers(0, 9)) == 0:
        return path, draw(st.binary(max_size=40) | st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")))
    if path == "/tradeoff/control":  # never a valid mode: a switch would build batched mode's KV cache mid-fuzz
        other = draw(st.sampled_from(["speculation", "max_batch_size", "chunked_prefill", "x"]))
        body = {"mode": draw(st.sampled_from(["turbo", None, 3])), other: draw(json_scalars)}
        return path, json.dumps(body).encode()
    body = {"model": name, "max_tokens": draw(st.integers(1, 3)),
            "temperature": draw(st.sampled_from([0, 1e-300, 0.7])), "seed": 1}
    if path == "/chat/completions":
        body["messages"] = [{"role": draw(st.sampled_from(["user", "system", "assistant", "developer", "tool"])),
                             "content": draw(odd_text)} for _ in range(draw(st.integers(1, 3)))]
    else:
        body["prompt"] = draw(st.one_of(odd_text, token_ids))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=2, unique=True)):
        body[field] = draw(json_values)
    if not (isinstance(body.get("max_tokens"), int) and 1 <= body["max_tokens"] <= 3):
        body["max_completion_tokens"] = draw(st.integers(1, 3))  # a valid request stays short
    return path, json.dumps(body).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_every_body_gets_a_reply_in_openai_shape(served_engine, http, data):
    path, raw = data.draw(bodies(served_engine.name))
    if b'"stream": true' in raw:
        with http.stream("POST", path, content=raw) as r:
            text = r.read().decode()
    else:
        r = http.post(path, content=raw)
        text = r.text
    assert r.status_code < 500, (raw[:300], text[:300])
    if r.status_code >= 400:
        assert_openai_error(r, r.status_code)
    elif r.headers["content-type"].startswith("text/event-stream"):
        assert text.rstrip().endswith("data: [DONE]") or '"error"' in text, text[-300:]
    assert http.get("/models").status_code == 200  # and the server answers afterwards
