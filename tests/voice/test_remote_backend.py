"""The voice loop with its LLM on another server (`--backend`): a second in-process tradeoff server on loopback
serves the OpenAI API, and this server's sessions reach it through serve/remote.py. Also: the realtime
WebSocket and the HTTP API share one port."""

import asyncio
from dataclasses import replace

import openai

from serve.remote import RemoteEngine
from tests.voice.conftest import closest
from voice.caller import QUESTIONS, SimulatedCaller
from voice.client import RealtimeClient
from voice.server import VoiceServer


async def test_spoken_turn_through_a_remote_backend(services, engine, default_model):
    async with VoiceServer(services, port=0) as llm_server:  # the "other machine": its engine answers
        ended = []
        engine.finish_listeners.append(ended.append)
        # made on a thread: it asks the server for its models, and that server runs on this test's loop
        remote = await asyncio.to_thread(RemoteEngine, llm_server.http_url, tokenizer=default_model.tokenizer)
        try:
            async with VoiceServer(replace(services, engine=remote), port=0) as voice_server:
                async with RealtimeClient(voice_server.url) as client:
                    turns = await SimulatedCaller(client, ("What is the capital of France?",), turns=1).run()
        finally:
            remote.close()
            engine.finish_listeners.remove(ended.append)
    turn = turns[0]
    assert closest(turn.transcript, QUESTIONS) == turn.question
    reply = turn.response
    assert reply.status == "completed" and reply.transcript.strip()
    # the reply came from the other server's engine, and was timed here, from its stream
    [served] = [m for m in ended if m.user_class == "user"]
    llm = reply.metrics["llm"]
    assert llm["prompt_tokens"] == served.prompt_tokens and llm["output_tokens"] == served.output_tokens
    assert llm["ttft_ms"] >= served.ttft * 1000  # the client's clock starts before the server's


async def test_http_api_on_the_realtime_port(server, engine):
    assert server.http_url.removesuffix("/v1") == server.url.removesuffix("/v1/realtime").replace("ws://", "http://")
    async with openai.AsyncOpenAI(base_url=server.http_url, api_key="unused", max_retries=0) as client:
        reply = await client.chat.completions.create(model=engine.name, max_tokens=4, temperature=0,
                                                     messages=[{"role": "user", "content": "Say hi."}])
    assert reply.choices[0].message.content
