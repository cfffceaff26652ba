"""The remote backend against a second in-process tradeoff API server on loopback (and the same server with
tradeoff's own routes removed, to stand for any other OpenAI-compatible server)."""

import asyncio
import random
import threading

import pytest

from engine import Controls, OverloadedError, Request, SamplingParams
from serve.loadgen import LoadGenerator, PromptSet, Workload
from serve.remote import RemoteEngine, RemoteError, base_url
from tests.conftest import idle, wait_until
from tests.serve.conftest import APIServer, api_app

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def remote(api_server, default_model):
    r = RemoteEngine(api_server.url.replace("http://", "openai://"), tokenizer=default_model.tokenizer)
    yield r
    r.close()


def read(stream) -> tuple[str, object]:
    return "".join(ev.text for ev in stream), stream.metrics


def test_backend_urls():
    assert base_url("openai://gpu-node:8000/v1") == "http://gpu-node:8000/v1"
    assert base_url("openai+https://api.example.com/v1/") == "https://api.example.com/v1"
    assert base_url("http://127.0.0.1:8765") == "http://127.0.0.1:8765/v1"
    with pytest.raises(ValueError, match="openai://HOST:PORT/v1"):
        base_url("gpu-node:8000")


def test_logprobs_are_refused_at_once(remote):
    """The server would name tokens by their text, not by the local tokenizer's ids: refused before anything is sent."""
    with pytest.raises(ValueError, match="logprobs"):
        remote.submit(Request(messages=QUESTION, sampling=SamplingParams(max_tokens=1, logprobs=5)))
    assert idle(remote)


def test_unreachable_or_wrong_endpoints_are_named(api_server):
    with pytest.raises(RemoteError, match="127.0.0.1:9/v1/models"):
        RemoteEngine("openai://127.0.0.1:9/v1", connect_timeout_s=2)
    with pytest.raises(RemoteError, match="does not serve 'llama-70b'"):
        RemoteEngine(api_server.url, model="llama-70b")


def test_streams_what_the_server_generates(served_engine, remote):
    assert remote.name == served_engine.name and remote.tradeoff
    served_engine.clear_cache()
    want = served_engine.generate(Request(messages=QUESTION, sampling=SamplingParams(max_tokens=16)))
    served_engine.clear_cache()
    text, m = read(remote.submit(Request(messages=QUESTION, sampling=SamplingParams(max_tokens=16))))
    assert text == want.text
    assert (m.prompt_tokens, m.output_tokens, m.finish_reason) == (want.metrics.prompt_tokens, len(want.token_ids),
                                                                   want.finish_reason)


def test_client_side_timing_brackets_the_servers(served_engine, remote, default_model):
    """The same requests timed at both ends: the client sends before the server's arrival and reads the first token
    after the server emitted it, so its TTFT is never shorter, and both count the same tokens. (How much longer --
    loopback HTTP -- is a benchmark's business: `tradeoff bench sweep --backend`.)"""
    server_side = []
    served_engine.finish_listeners.append(server_side.append)
    prompts = PromptSet(default_model.tokenizer)
    rng = random.Random(1)
    client_side = []
    try:
        for _ in range(4):
            served_engine.clear_cache()
            messages = prompts.messages(200, rng)
            client_side.append(read(remote.submit(Request(messages=messages, sampling=SamplingParams(max_tokens=4))))[1])
        # the server's listener runs after its stream has ended, so it may come after the client's last chunk
        wait_until(lambda: len(server_side) == 4, what="the server to finish all four requests")
    finally:
        served_engine.finish_listeners.remove(server_side.append)
    for client, server in zip(client_side, server_side):
        assert client.arrival <= server.arrival and client.ttft >= server.ttft and client.e2e >= server.e2e
        assert (client.prompt_tokens, client.output_tokens) == (server.prompt_tokens, server.output_tokens)


def test_async_reader_and_cancel_frees_the_server(served_engine, remote):
    async def main():
        stream = remote.submit(Request(messages=QUESTION, sampling=SamplingParams(max_tokens=500, ignore_eos=True)),
                               asyncio.get_running_loop())
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break  # leaving the loop cancels the stream, which closes the HTTP request
        return stream

    stream = asyncio.run(main())
    wait_until(lambda: idle(served_engine), what="the server to drop the request")
    assert stream.metrics.finish_reason == "cancelled"


def test_overload_arrives_as_overloaded_error(served_engine, remote):
    served_engine.max_waiting = 0
    try:
        with pytest.raises(OverloadedError, match="429"):
            read(remote.submit(Request(messages=QUESTION, sampling=SamplingParams(max_tokens=4))))
    finally:
        served_engine.max_waiting = 64


def test_controls_reach_a_tradeoff_server(served_engine, remote):
    mode = lambda: served_engine.snapshot().state.mode  # noqa: E731
    remote.control(Controls(mode="batched"))
    wait_until(lambda: mode() == "batched")
    assert remote.snapshot().state.mode == "batched"  # the server's own state, read through the snapshot
    with pytest.raises(ValueError, match="max_batch_size"):
        remote.control(Controls(mode="latency", max_batch_size=1000))  # refused there, as a whole
    remote.control(Controls(mode="latency"))
    wait_until(lambda: mode() == "latency")


def test_latency_mode_is_emulated_for_other_servers(served_engine, default_model):
    """Without tradeoff's controls, latency mode means one request in flight; batched admits several at once."""
    with APIServer(api_app(served_engine, tradeoff_routes=False)) as plain:
        remote = RemoteEngine(plain.url, tokenizer=default_model.tokenizer)
        try:
            state = remote.snapshot().state
            assert not remote.tradeoff and state.mode == "batched"
            assert state.chunked_prefill is None  # unknowable here
            # what its /metrics tells in vLLM's names comes through (this one exports them; its speculation is off)
            assert state.kv == served_engine.snapshot().state.kv and state.speculation is None
            with pytest.raises(ValueError, match="not a tradeoff server"):
                remote.control(Controls(speculation=False))
            served_engine.control(Controls(mode="batched"))  # the "server" batches whatever it is sent
            for mode, most in (("latency", 1), ("batched", 3)):
                remote.control(Controls(mode=mode))
                streams = [remote.submit(Request(messages=QUESTION, sampling=SamplingParams(max_tokens=12, ignore_eos=True)))
                           for _ in range(3)]
                peak = [0]

                def done(streams=streams, peak=peak) -> bool:
                    peak[0] = max(peak[0], served_engine.snapshot().state.running)
                    return all(s.metrics.finish_reason is not None for s in streams)

                wait_until(done)
                assert peak[0] == most, mode
                assert all(s.metrics.finish_reason == "length" for s in streams)
        finally:
            remote.close()
            served_engine.control(Controls(mode="latency"))


def test_synthetic_users_drive_the_remote(served_engine, remote):
    gen = LoadGenerator(remote, Workload(think_time_s=0.0))
    gen.start(2)
    try:
        wait_until(lambda: len(gen.completed) >= 3, what="three synthetic requests")
    finally:
        gen.stop()
    assert gen.failed == 0
    snap = remote.snapshot().stats.synthetic
    assert snap.ttft_s.p50 is not None and snap.output_tok_s > 0
    assert threading.active_count() < 50  # no thread per request


def test_close_ends_the_streams_in_flight(api_server, served_engine, default_model):
    remote = RemoteEngine(api_server.url, tokenizer=default_model.tokenizer)
    stream = remote.submit(Request(messages=QUESTION, sampling=SamplingParams(max_tokens=500, ignore_eos=True)))
    events = iter(stream)
    next(events)  # streaming
    remote.close()
    list(events)  # ends instead of waiting forever
    assert stream.metrics.finish_reason == "cancelled"
    wait_until(lambda: idle(served_engine), what="the server to drop the request")
