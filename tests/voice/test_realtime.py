"""The whole loop on loopback with speech going in as audio, in real time: spoken turns, a barge-in, a
cancelled and a truncated reply. Every server event is also checked against the official `openai` SDK's
event models, so the payload shapes are the Realtime API's."""

import asyncio

import numpy as np
import pytest
from pydantic import TypeAdapter

from engine import Controls
from tests.voice.conftest import COMPLETE, closest
from voice.audio import WIRE_RATE
from voice.caller import QUESTIONS, SimulatedCaller, mixed_questions
from voice.client import RealtimeClient
from voice.wer import normalize

SDK_EVENTS = None


def check_shapes(log: list[tuple[float, dict]]) -> None:
    """Validate every server event but our own tradeoff.metrics against the SDK's RealtimeServerEvent union."""
    global SDK_EVENTS
    from openai.types.realtime import RealtimeServerEvent

    SDK_EVENTS = SDK_EVENTS or TypeAdapter(RealtimeServerEvent)
    for _, event in log:
        if event["type"] != "tradeoff.metrics":
            parsed = SDK_EVENTS.validate_python(event)
            assert parsed.type == event["type"]


def types_between(log, first: str, last: str) -> list[str]:
    kinds = [e["type"] for _, e in log]
    i = kinds.index(first)
    return kinds[i: kinds.index(last, i) + 1]


def events_of(log, kind: str) -> list[dict]:
    return [e for _, e in log if e["type"] == kind]


RESPONSE_EVENTS = [
    "response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added",
    "response.output_audio_transcript.delta",  # then audio deltas and more transcript deltas, clause by clause
]
RESPONSE_END = ["response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
                "response.output_item.done", "conversation.item.done", "tradeoff.metrics", "response.done"]


async def test_spoken_turns_end_to_end(server):
    questions = ("What is the capital of France?", "How many legs does a spider have?")
    async with RealtimeClient(server.url) as client:
        turns = await SimulatedCaller(client, questions, turns=2).run()
        log = list(client.log)
    assert len(turns) == 2
    check_shapes(log)
    for turn in turns:
        assert closest(turn.transcript, QUESTIONS) == turn.question, turn.transcript
        reply = turn.response
        assert reply.status == "completed"
        assert reply.audio_samples > 0.3 * WIRE_RATE and reply.transcript.strip()
        m = reply.metrics["timestamps"]
        # stages in order, and the breakdown adds up to the server's end-to-end time exactly
        assert m["speech_end"] < m["vad_decision"]
        assert m["asr_start"] < m["asr_final"]
        assert m["speech_end"] < m["llm_first_token"] <= m["first_clause"] <= m["tts_first_chunk"] <= m["first_audio_sent"]
        assert m["speech_end"] < m["llm_scheduled"] < m["llm_first_token"]  # queued, taken up, then answered
        llm = reply.metrics["llm"]  # the engine's own clock of the request: prefill = TTFT - queue
        assert (m["llm_first_token"] - m["llm_scheduled"]) * 1000 == pytest.approx(llm["ttft_ms"] - llm["queue_ms"], abs=1)
        parts = reply.metrics["breakdown_ms"]
        assert sum(parts.values()) == pytest.approx(reply.metrics["e2e_ms"])
        assert reply.metrics["e2e_ms"] == pytest.approx((m["first_audio_sent"] - m["speech_end"]) * 1000)
        assert parts["endpointing"] >= 300 - 32  # the configured silence, give or take one VAD chunk
        # both ends place the end of speech before the decision it led to, and the client hears the first audio
        # after the server sent it (how close the two clocks' E2E are is `tradeoff bench voice`'s business)
        assert turn.speech_end < m["vad_decision"] and turn.e2e_ms > 0
        assert reply.first_audio_at >= m["first_audio_sent"]
    # the conversation carries over: the second prompt holds the first exchange
    assert turns[1].response.metrics["llm"]["prompt_tokens"] > turns[0].response.metrics["llm"]["prompt_tokens"] + 10

    # event order of a spoken turn
    turn_events = types_between(log, "input_audio_buffer.speech_started", "response.done")
    deltas = 0  # one per part decoded: the speech up to a pause within the question, if the VAD heard one, the rest
    while turn_events[4 + deltas] == "conversation.item.input_audio_transcription.delta":
        deltas += 1
    assert deltas >= 1
    assert turn_events[:4] + turn_events[4 + deltas: 7 + deltas] == [
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.added", "conversation.item.input_audio_transcription.completed", "conversation.item.done",
        "response.created"]
    assert turn_events[6 + deltas: 11 + deltas] == RESPONSE_EVENTS
    assert turn_events[-7:] == RESPONSE_END
    for completed in events_of(log, "conversation.item.input_audio_transcription.completed"):  # deltas add up to it
        deltas = [e["delta"] for e in events_of(log, "conversation.item.input_audio_transcription.delta")
                  if e["item_id"] == completed["item_id"]]
        assert "".join(deltas) == completed["transcript"] and deltas
    started, stopped, committed, added = (events_of(log, k)[0] for k in (
        "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
        "conversation.item.added"))
    assert started["item_id"] == stopped["item_id"] == committed["item_id"] == added["item"]["id"]
    assert started["audio_start_ms"] < stopped["audio_end_ms"]
    done = events_of(log, "response.done")[0]["response"]
    assert done["status"] == "completed"
    assert done["usage"]["output_tokens"] > 0 and done["usage"]["input_tokens"] > 0
    assert done["output"][0]["content"][0]["transcript"] == turns[0].response.transcript


@pytest.mark.parametrize("mode", ["latency", "batched"])
async def test_several_callers_at_once_each_get_each_turn_answered_once(server, engine, mode):
    """Three callers on sessions of their own speak at the same time, so their turns and replies overlap (latency
    mode queues the replies' requests, batched mode runs them together): each caller's every turn is answered, once,
    from its own speech, and every response ends with response.done, after which nothing of it arrives."""
    questions = [mixed_questions(2, paused_every=0, offset=2 * k) for k in range(3)]

    async def caller(k: int) -> tuple[list, list]:
        async with RealtimeClient(server.url) as client:
            turns = await SimulatedCaller(client, questions[k], turns=2, seed=k).run()
            return turns, list(client.log)

    engine.control(Controls(mode=mode))
    try:
        results = await asyncio.gather(*(caller(k) for k in range(3)))
    finally:
        engine.control(Controls(mode="latency"))
    for k, (turns, log) in enumerate(results):
        check_shapes(log)
        assert [t.question for t in turns] == list(questions[k])  # no turn lost
        assert [closest(t.transcript, QUESTIONS) for t in turns] == list(questions[k])  # its own speech, no one else's
        flow = [e["type"] for _, e in log if e["type"] in ("input_audio_buffer.committed", "response.created",
                                                           "response.done")]
        assert flow == ["input_audio_buffer.committed", "response.created", "response.done"] * 2  # one reply a turn
        created = [e["response"]["id"] for e in events_of(log, "response.created")]
        assert [e["response"]["id"] for e in events_of(log, "response.done")] == created
        assert [e["response"]["status"] for e in events_of(log, "response.done")] == ["completed"] * 2
        for rid in created:
            ids = [e.get("response_id", e.get("response", {}).get("id")) for _, e in log]
            last = max(i for i, x in enumerate(ids) if x == rid)
            assert log[last][1]["type"] == "response.done"
        for t in turns:  # the breakdown has the queue stage, and still sums to the server's end-to-end time
            parts = t.response.metrics["breakdown_ms"]
            assert list(parts) == ["endpointing", "asr", "queue", "llm_ttft", "first_clause", "tts", "send"]
            assert sum(parts.values()) == pytest.approx(t.response.metrics["e2e_ms"])


async def test_barge_in_stops_the_reply_and_keeps_only_what_was_heard(server):
    questions = ("Can you recommend a good book to read?", "What is the capital of France?")
    async with RealtimeClient(server.url) as client:
        caller = SimulatedCaller(client, questions, turns=2, barge_in_every=1, barge_in_after_ms=300)
        first, second = await caller.run()
        log = list(client.log)
        session = next(iter(server.sessions))
        history = [(item.role, item.text) for item in session.conversation.items]
    check_shapes(log)
    interrupted = first.response
    assert second.barge_in and interrupted.status == "cancelled"
    assert interrupted.interrupted_at is not None and interrupted.late_deltas == 0  # no audio after speech_started
    assert second.barge_in_stop_ms is not None
    assert second.response.status == "completed"
    cancelled = next(e["response"] for e in events_of(log, "response.done") if e["response"]["id"] == interrupted.id)
    assert cancelled["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    # after speech_started the interrupted response only closes: no more deltas, then response.done
    after = types_between(log, "input_audio_buffer.speech_started", "response.done")
    assert after[0] == "input_audio_buffer.speech_started" and after[-7:] == RESPONSE_END
    # the assistant item keeps only the words whose audio went out, and the model's history agrees
    heard = cancelled["output"][0]["content"][0]["transcript"]
    assert normalize(heard) == normalize(interrupted.transcript)[: len(normalize(heard))]
    assert ("assistant", heard) in history or not heard
    assert history[-2][0] == "user" and closest(history[-2][1], QUESTIONS) == second.question


async def text_turn(client: RealtimeClient, text: str) -> None:
    await client.send({"type": "conversation.item.create",
                       "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
    await client.send({"type": "response.create"})


async def wait_until(client: RealtimeClient, condition, timeout: float = 30) -> None:
    async def loop():
        while not condition():
            await client.next_event()
    await asyncio.wait_for(loop(), timeout)


async def test_cancelled_turn(server):
    async with RealtimeClient(server.url) as client:
        await text_turn(client, "Tell me a long story about a dragon.")
        await wait_until(client, lambda: client.current is not None and client.current.first_audio_at is not None)
        reply = client.current
        await client.send({"type": "response.cancel", "response_id": reply.id})
        await wait_until(client, lambda: reply.done_at is not None)
        done = events_of(client.log, "response.done")[-1]["response"]
        assert done["status"] == "cancelled" and done["status_details"]["reason"] == "client_cancelled"
        assert done["output"][0]["status"] == "incomplete"
        # cancelling again: nothing is active. Its error comes after anything the server sent before it, so a
        # stray audio delta after response.done would be in the log by then
        await client.send({"type": "response.cancel"})
        await wait_until(client, lambda: client.log[-1][1]["type"] == "error")
        assert client.log[-1][1]["error"]["code"] == "response_cancel_not_active"
        assert reply.last_audio_at < reply.done_at  # nothing after response.done
        # and the session goes on
        await text_turn(client, "Say hello.")
        await wait_until(client, lambda: client.current is not reply and client.current.done_at is not None)
        assert client.current.status == "completed"
        check_shapes(client.log)


async def test_client_truncates_what_it_played(server):
    async with RealtimeClient(server.url) as client:
        await text_turn(client, "What is the capital of France?")
        await wait_until(client, lambda: client.current is not None and client.current.done_at is not None)
        item = events_of(client.log, "response.done")[-1]["response"]["output"][0]
        words = item["content"][0]["transcript"].split()
        total_ms = client.current.audio_samples * 1000 // WIRE_RATE
        await client.send({"type": "conversation.item.truncate", "item_id": item["id"], "content_index": 0,
                           "audio_end_ms": total_ms + 1000})
        await wait_until(client, lambda: client.log[-1][1]["type"] == "error")
        assert "past the item's audio" in client.log[-1][1]["error"]["message"]
        await client.send({"type": "conversation.item.truncate", "item_id": item["id"], "content_index": 0,
                           "audio_end_ms": total_ms // 2})
        await wait_until(client, lambda: client.log[-1][1]["type"] == "conversation.item.truncated")
        assert client.log[-1][1]["audio_end_ms"] == total_ms // 2
        session = next(iter(server.sessions))
        kept = session.conversation.find(item["id"]).text.split()
        assert 0 < len(kept) < len(words) and kept == words[: len(kept)]


async def test_text_only_response(server):
    async with RealtimeClient(server.url) as client:
        await client.send({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is the capital of France?"}]}})
        await client.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
        await wait_until(client, lambda: client.current is not None and client.current.done_at is not None)
        check_shapes(client.log)
        assert client.current.audio_samples == 0
        deltas = "".join(e["delta"] for e in events_of(client.log, "response.output_text.delta"))
        done = events_of(client.log, "response.done")[-1]["response"]
        assert done["status"] == "completed" and done["output_modalities"] == ["text"]
        assert deltas and done["output"][0]["content"][0] == {"type": "output_text", "text": deltas}
        assert events_of(client.log, "response.output_text.done")[-1]["text"] == deltas


async def test_idle_timeout_prompts_the_user_after_silence_counted_in_input_audio(server):
    """server_vad's idle_timeout_ms: after a response has played, that much input audio without speech commits an
    empty input item and starts a response. Silence shorter than the timeout triggers nothing; the silence is sent
    faster than real time, since the timeout is counted in audio, not on a clock."""
    timeout_ms = 1500
    async with RealtimeClient(server.url) as client:
        await client.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "idle_timeout_ms": timeout_ms}}}}})
        await wait_until(client, lambda: events_of(client.log, "session.updated"))
        assert events_of(client.log, "session.updated")[-1]["session"]["audio"]["input"]["turn_detection"][
            "idle_timeout_ms"] == timeout_ms
        await text_turn(client, "Say hello.")
        await wait_until(client, lambda: client.current is not None and client.current.done_at is not None)
        first = client.current
        frame = np.zeros(WIRE_RATE // 50, dtype=np.float32)  # 20 ms of silence
        for _ in range(50):  # 1 s
            await client.send_audio(frame)
        user_item = events_of(client.log, "conversation.item.added")[0]["item"]["id"]
        await client.send({"type": "conversation.item.retrieve", "item_id": user_item})  # answered after the audio
        await wait_until(client, lambda: events_of(client.log, "conversation.item.retrieved"))
        assert not events_of(client.log, "input_audio_buffer.timeout_triggered")
        for _ in range(50):  # 1 s more: past the timeout (counted from the end of the reply's playback)
            await client.send_audio(frame)
        await wait_until(client, lambda: client.current is not first and client.current is not None
                         and client.current.done_at is not None)
        (triggered,) = events_of(client.log, "input_audio_buffer.timeout_triggered")
        assert timeout_ms <= triggered["audio_end_ms"] - triggered["audio_start_ms"] <= timeout_ms + 40  # one frame
        kinds = types_between(client.log, "input_audio_buffer.timeout_triggered", "response.created")
        assert kinds == ["input_audio_buffer.timeout_triggered", "input_audio_buffer.committed", "conversation.item.added",
                         "conversation.item.done", "response.created"]
        committed = events_of(client.log, "input_audio_buffer.committed")[-1]
        assert committed["item_id"] == triggered["item_id"]
        assert client.current.status == "completed"
        check_shapes(client.log)


async def test_retrieve_returns_the_servers_item_and_an_unknown_id_is_an_error(server):
    async with RealtimeClient(server.url) as client:
        await text_turn(client, "What is the capital of France?")
        await wait_until(client, lambda: client.current is not None and client.current.done_at is not None)
        done = events_of(client.log, "response.done")[-1]["response"]["output"][0]
        await client.send({"type": "conversation.item.retrieve", "item_id": done["id"]})
        await wait_until(client, lambda: events_of(client.log, "conversation.item.retrieved"))
        item = events_of(client.log, "conversation.item.retrieved")[-1]["item"]
        assert item["id"] == done["id"] and item["role"] == "assistant"
        assert item["content"][0]["transcript"] == done["content"][0]["transcript"]
        await client.send({"type": "conversation.item.retrieve", "item_id": "item_nope", "event_id": "evt_r"})
        await wait_until(client, lambda: client.log[-1][1]["type"] == "error")
        error = client.log[-1][1]["error"]
        assert (error["code"], error["param"], error["event_id"]) == ("invalid_value", "item_id", "evt_r")
        check_shapes(client.log)


async def test_speech_stops_the_idle_clock_until_a_reply_has_played(server, spoken):
    """With create_response off, a spoken turn gets no reply: so after it no silence, however long, may trigger the
    idle timeout (the clock restarts only when a response has played)."""
    frame = np.zeros(WIRE_RATE // 50, dtype=np.float32)
    async with RealtimeClient(server.url) as client:
        await client.send({"type": "session.update", "session": {"type": "realtime", "audio": {"input": {
            "turn_detection": {"type": "server_vad", "idle_timeout_ms": 1500, "create_response": False}}}}})
        await text_turn(client, "Say hello.")
        await wait_until(client, lambda: client.current is not None and client.current.done_at is not None)
        speech = spoken[COMPLETE]
        for chunk in [frame] * 25 + [speech[i:i + len(frame)] for i in range(0, len(speech), len(frame))] + [frame] * 150:
            await client.send_audio(chunk)  # 0.5 s silence, the question, 3 s silence
        await wait_until(client, lambda: events_of(client.log, "conversation.item.input_audio_transcription.completed"))
        turn = events_of(client.log, "input_audio_buffer.committed")[-1]["item_id"]
        await client.send({"type": "conversation.item.retrieve", "item_id": turn})  # answered after all the audio
        await wait_until(client, lambda: events_of(client.log, "conversation.item.retrieved"))
        assert events_of(client.log, "input_audio_buffer.speech_started")
        assert not events_of(client.log, "input_audio_buffer.timeout_triggered")
