"""Protocol edges: the official `openai` SDK as a client, bad input (each case one `error` event, then the
session goes on), a fuzz test, handshake checks, limits, and a dropped client freeing what it held."""

import asyncio
import base64
import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.voice.conftest import closest
from voice.audio import WIRE_RATE, float_to_pcm16, pcm16_to_b64
from voice.caller import QUESTIONS
from voice.client import RealtimeClient
from voice.protocol import CLIENT_EVENTS
from voice.server import VoiceServer


async def test_openai_sdk_holds_a_spoken_turn(services, say):
    from openai import AsyncOpenAI

    question = "What is the capital of France?"
    async with VoiceServer(services, port=0, token="sdk-test-token") as server:
        client = AsyncOpenAI(api_key="sdk-test-token", websocket_base_url=f"ws://127.0.0.1:{server.port}/v1")
        async with client.realtime.connect(model="tradeoff") as conn:
            await conn.session.update(session={"type": "realtime", "instructions": "Answer briefly.",
                                               "audio": {"input": {"turn_detection": None}}})
            pcm = float_to_pcm16(say(question))
            for i in range(0, len(pcm), 9600):  # 200 ms per append; manual commit needs no real-time pacing
                await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + 9600]).decode())
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            seen, audio_bytes, transcript, done = [], 0, None, None
            async for event in conn:  # the test's timeout bounds this
                seen.append(event.type)
                if event.type == "response.output_audio.delta":
                    audio_bytes += len(base64.b64decode(event.delta))
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    transcript = event.transcript
                elif event.type == "response.done":
                    done = event.response
                    break
    assert seen[0] == "session.created" and "session.updated" in seen
    assert seen.index("input_audio_buffer.committed") < seen.index("response.created")
    assert closest(transcript, QUESTIONS) == question
    assert done.status == "completed" and done.usage.output_tokens > 0
    assert audio_bytes > 0.3 * WIRE_RATE * 2
    assert done.output[0].content[0].transcript


def append(audio: str) -> dict:
    return {"type": "input_audio_buffer.append", "audio": audio}


BAD_INPUT = [
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid_event"),
    ({"type": 5}, "invalid_event"),
    ({"type": "response.explode"}, "unknown_event"),
    ({"type": "input_audio_buffer.append"}, "missing_required_parameter"),
    (append("***not base64***"), "invalid_audio"),
    (append(base64.b64encode(b"\x00\x01\x02").decode()), "invalid_audio"),  # odd byte count: not pcm16
    ({"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcmu"}}}}}, "unsupported_format"),
    ({"type": "session.update", "session": {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 16000}}}}},
     "unsupported_format"),
    ({"type": "session.update", "session": {"colour": "blue"}}, "unknown_parameter"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad"}}}}},
     "unsupported"),  # this server has no turn model
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad",
                                                                                   "eagerness": "eager"}}}}}, "invalid_value"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad",
                                                                                   "eagerness": 2}}}}}, "invalid_type"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad",
                                                                                   "silence_duration_ms": 200}}}}},
     "unknown_parameter"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "push_to_talk"}}}}}, "unsupported"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": 7}}}}}, "invalid_type"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"threshold": 2}}}}}, "invalid_value"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"idle_timeout_ms": 0}}}}}, "invalid_value"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"idle_timeout_ms": "5s"}}}}},
     "invalid_type"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"idle_timeout_ms": True}}}}},
     "invalid_type"),
    ({"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "semantic_vad",
                                                                                   "idle_timeout_ms": 5000}}}}},
     "unknown_parameter"),  # idle_timeout_ms is server_vad's only, as in the Realtime API
    ({"type": "session.update", "session": {"audio": {"output": {"voice": "no-such-voice"}}}}, "invalid_value"),
    ({"type": "session.update", "session": {"instructions": 42}}, "invalid_type"),
    ({"type": "session.update", "session": "realtime"}, "invalid_type"),
    ({"type": "input_audio_buffer.commit"}, "input_audio_buffer_commit_empty"),
    ({"type": "response.cancel"}, "response_cancel_not_active"),
    ({"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 10}, "invalid_value"),
    ({"type": "conversation.item.retrieve", "item_id": "nope"}, "invalid_value"),
    ({"type": "conversation.item.retrieve"}, "missing_required_parameter"),
    ({"type": "conversation.item.truncate", "item_id": "x", "audio_end_ms": -1}, "invalid_value"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "robot", "content": []}}, "invalid_value"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                   "content": [{"type": "input_image", "image_url": "x"}]}}, "unsupported"),
    ({"type": "conversation.item.create", "previous_item_id": "elsewhere",
      "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}}, "unsupported"),
    ({"type": "response.create", "response": {"max_output_tokens": 0}}, "invalid_value"),
    ({"type": "response.create", "response": {"tools": []}}, "unknown_parameter"),
]


async def next_of(client: RealtimeClient, kinds: set[str], timeout: float = 10) -> dict:
    async def first() -> dict:
        while True:
            _, event = await client.next_event()
            if event["type"] in kinds:
                return event
    return await asyncio.wait_for(first(), timeout)


async def until(condition, timeout: float = 10) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), timeout)


async def test_each_bad_input_gets_one_error_and_the_session_goes_on(server):
    async with RealtimeClient(server.url) as client:
        for i, (message, code) in enumerate(BAD_INPUT):
            if isinstance(message, dict):
                message = json.dumps({**message, "event_id": f"evt_{i}"})
            await client.ws.send(message)
            error = (await next_of(client, {"error", "session.updated"}))
            assert error["type"] == "error" and error["error"]["code"] == code, (message, error)
            assert error["error"]["message"]
            if message.startswith("{") and '"type": 5' not in message:
                assert error["error"]["event_id"] == f"evt_{i}"
        await client.ws.send(b"\x00binary")
        assert (await next_of(client, {"error"}))["error"]["code"] == "invalid_event"
        # nothing was changed by the refused updates, and the session still answers
        await client.send({"type": "session.update", "session": {"type": "realtime"}})
        updated = (await next_of(client, {"session.updated", "error"}))
        assert updated["type"] == "session.updated"
        assert updated["session"]["audio"]["output"]["voice"] == client.session["audio"]["output"]["voice"]
        assert updated["session"]["instructions"] == client.session["instructions"]
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Say hi."}]}})
        await client.send({"type": "response.create"})
        await client.send({"type": "response.create"})  # out of order: one is already running
        assert (await next_of(client, {"error"}))["error"]["code"] == "conversation_already_has_active_response"
        assert (await next_of(client, {"response.done"}, 60))["response"]["status"] == "completed"


async def test_manual_buffer_has_a_limit_and_keeps_what_it_holds(services):
    async with VoiceServer(replace(services, max_buffer_s=1.0), port=0) as server, RealtimeClient(server.url) as client:
        await client.send({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
        await next_of(client, {"session.updated"})
        second = pcm16_to_b64(float_to_pcm16(np.zeros(WIRE_RATE // 2, np.float32)))
        for _ in range(2):
            await client.send(append(second))
        await client.send(append(second))  # 1.5 s > 1 s
        assert (await next_of(client, {"error"}))["error"]["code"] == "input_audio_buffer_full"
        await client.send({"type": "input_audio_buffer.commit"})
        committed = await next_of(client, {"input_audio_buffer.committed", "error"})
        assert committed["type"] == "input_audio_buffer.committed"  # the first second was kept
        await client.send({"type": "input_audio_buffer.clear"})
        await next_of(client, {"input_audio_buffer.cleared"})


async def test_handshake_checks_path_token_and_bind_address(services):
    with pytest.raises(ValueError, match="--token"):
        VoiceServer(services, host="0.0.0.0")
    async with VoiceServer(services, port=0, token="s3cret") as server:
        with pytest.raises(InvalidStatus) as e:
            await connect(server.url)
        assert e.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as e:
            await connect(server.url, additional_headers={"Authorization": "Bearer wrong"})
        assert e.value.response.status_code == 401
        with pytest.raises(InvalidStatus) as e:
            await connect(f"ws://127.0.0.1:{server.port}/elsewhere", additional_headers={"Authorization": "Bearer s3cret"})
        assert e.value.response.status_code == 404
        async with RealtimeClient(server.url + "?model=x", token="s3cret") as client:
            assert client.session["type"] == "realtime"


async def test_oversized_message_closes_only_that_connection(services):
    async with VoiceServer(services, port=0, max_message_bytes=64 * 1024) as server:
        async with RealtimeClient(server.url) as client:
            await client.send(append("A" * 100_000))
            await next_of(client, {"client.closed"})
            assert client.ws.close_code == 1009  # message too big
        async with RealtimeClient(server.url) as client:
            assert client.session is not None


async def test_dropped_client_frees_everything(server):
    async with RealtimeClient(server.url) as client:
        await client.send({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"model": "pocketsphinx"}}}}})
        await next_of(client, {"session.updated"}, 30)
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "Tell me a very long story."}]}})
        await client.send({"type": "response.create"})
        await next_of(client, {"response.output_audio.delta"}, 60)
        session = next(iter(server.sessions))
        response, worker = session.active, session.recognizer.process
        client.ws.transport.abort()  # gone without a close handshake
    await until(lambda: not server.sessions and not session.tasks and worker.poll() is not None)
    assert response.stream.cancelled
    await until(lambda: response.stream.metrics.finish_reason is not None)
    assert response.stream.metrics.finish_reason in ("cancelled", "length", "stop")


# ---- fuzz -------------------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
                           max_leaves=12)
known_types = st.sampled_from(sorted(CLIENT_EVENTS) + ["response.explode", ""])
events = st.one_of(
    st.text(max_size=50),
    st.binary(max_size=50),
    json_values.map(json.dumps),
    st.fixed_dictionaries({"type": known_types}, optional={
        "audio": st.one_of(st.binary(max_size=2000).map(lambda b: base64.b64encode(b).decode()), st.text(max_size=20)),
        "session": json_values, "response": json_values, "item": json_values, "item_id": st.text(max_size=8),
        "audio_end_ms": st.integers(-10, 10**6), "response_id": st.text(max_size=8),
    }).map(json.dumps),
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(events, max_size=12))
async def test_fuzz_never_crashes_or_hangs(server, messages):
    async with RealtimeClient(server.url) as client:
        for message in messages:
            await client.ws.send(message)
        # whatever came before, the session still answers within a few seconds
        await client.send({"type": "session.update", "session": {"type": "realtime"}})
        await next_of(client, {"session.updated"}, timeout=20)
