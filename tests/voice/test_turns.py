"""Turn detection in a session (voice/turns.py through voice/session.py), asserted on the events a session sends and
on how much audio had been sent when it sent them, never on wall-clock time: audio goes in 20 ms chunks as fast as the
session takes it, so "after 300 ms of silence" means 300 ms of silent samples.

semantic_vad with Smart Turn alone judging each pause: a complete question ends its turn sooner than server_vad's 500 ms
of silence would; a server without a turn model refuses semantic_vad with a clear error and keeps serving server_vad.

semantic_vad as the server runs it, with the LLM reading each pause's transcript too (voice/text_turn.py): its judgment
comes back while audio goes on arriving, so these tests send the next chunk only once it is in (as if it took no audio
time). An utterance with a mid-sentence pause is not committed at its pause; each eagerness waits its longest silence,
and no longer, for an utterance judged incomplete; a question the LLM reads as complete is committed at the pause,
before Smart Turn would judge; a cut sentence that Smart Turn is sure is complete stays open (Smart Turn alone does
misjudge such cuts: "If you could," 0.88 on an AMD EPYC); Smart Turn hears a pause only once the LLM's reading has left
the turn open. How the two combine: `combined`'s own test."""

import asyncio
import json

import numpy as np
import pytest

from tests.voice.conftest import COMPLETE, PAUSED, PAUSED_CUT
from tests.voice.test_realtime import check_shapes
from voice.audio import WIRE_RATE, float_to_pcm16, pcm16_to_b64
from voice.caller import speak
from voice.server import make_services
from voice.session import Services, Session
from voice.smart_turn import Judgment, SmartTurn
from voice.turns import EAGERNESS, JUDGE_AFTER_MS, combined

CHUNK = WIRE_RATE // 50  # 20 ms, as a microphone sends it


@pytest.fixture(scope="module")
def smart_turn() -> SmartTurn:
    return SmartTurn()


@pytest.fixture(scope="module")
def semantic_services(engine, tts, whisper, smart_turn) -> Services:
    """semantic_vad judged by Smart Turn alone."""
    return Services(engine=engine, tts=tts, asr=lambda name: whisper, turn_model=smart_turn, text_turn=False)


@pytest.fixture(scope="module")
def judged_services(engine, tts, whisper, smart_turn) -> Services:
    """semantic_vad judged by Smart Turn and by the LLM reading the transcript (the server's default)."""
    return Services(engine=engine, tts=tts, asr=lambda name: whisper, turn_model=smart_turn)


class Recorder:
    """A session's sent events, each with how many input samples (24 kHz) had been sent when it came."""

    def __init__(self):
        self.sent = 0
        self.events: list[tuple[int, dict]] = []

    async def __call__(self, event: dict) -> None:
        self.events.append((self.sent, event))

    def at(self, kind: str) -> list[int]:
        return [n for n, e in self.events if e["type"] == kind]


async def session_with(services: Services, turn_detection: dict | None) -> tuple[Session, Recorder]:
    recorder = Recorder()
    session = Session(services, recorder)
    if turn_detection is not None:
        await session.handle(json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "turn_detection": {**turn_detection, "create_response": False}}}}}))
    return session, recorder


async def send(session: Session, recorder: Recorder, audio: np.ndarray, judged: bool = False) -> None:
    """`audio` in 20 ms chunks; `judged`: each chunk only once no text judgment of a pause is on its way."""
    for i in range(0, len(audio), CHUNK):
        chunk = audio[i:i + CHUNK]
        recorder.sent += len(chunk)
        await session.handle(json.dumps({"type": "input_audio_buffer.append", "audio": pcm16_to_b64(float_to_pcm16(chunk))}))
        if judged:
            await until(lambda: not session.text_judging)


async def until(condition, timeout: float = 60) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.005)
    await asyncio.wait_for(poll(), timeout)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * WIRE_RATE), np.float32)


async def silence_before_commit(services: Services, turn_detection: dict, speech: np.ndarray, wait_s: float,
                                judged: bool = False) -> float:
    """Seconds of silence after `speech` that had been sent when the turn was committed (inf: not within `wait_s`)."""
    session, recorder = await session_with(services, turn_detection)
    try:
        await send(session, recorder, np.concatenate([silence(0.3), speech]), judged)
        speech_end = recorder.sent
        await send(session, recorder, silence(wait_s), judged)
        commits = recorder.at("input_audio_buffer.committed")
        assert len(commits) <= 1
        return (commits[0] - speech_end) / WIRE_RATE if commits else float("inf")
    finally:
        await session.close()


async def test_a_complete_question_ends_its_turn_before_server_vad_at_500_ms_would(semantic_services, spoken):
    question = spoken[COMPLETE]
    semantic = await silence_before_commit(semantic_services, {"type": "semantic_vad"}, question, 2.0)
    server = await silence_before_commit(semantic_services, {"type": "server_vad", "silence_duration_ms": 500}, question, 2.0)
    assert JUDGE_AFTER_MS / 1000 <= semantic < 0.5 <= server < 1.0, (semantic, server)


async def test_an_utterance_is_not_committed_at_its_mid_sentence_pause(judged_services, spoken):
    speech = spoken[PAUSED]  # a 0.5-0.7 s pause before "how"
    session, recorder = await session_with(judged_services, {"type": "semantic_vad", "eagerness": "auto"})
    try:
        await send(session, recorder, np.concatenate([silence(0.3), speech, silence(5.0)]), judged=True)
        end_of_speech = int(0.3 * WIRE_RATE) + len(speech)
        assert len(recorder.at("input_audio_buffer.speech_started")) == 1
        commits = recorder.at("input_audio_buffer.committed")
        assert len(commits) == 1 and commits[0] >= end_of_speech, (commits, end_of_speech)
        await asyncio.gather(*session.pending)  # the transcript: its deltas add up to it
        completed = [e for _, e in recorder.events if e["type"] == "conversation.item.input_audio_transcription.completed"]
        deltas = [e["delta"] for _, e in recorder.events if e["type"] == "conversation.item.input_audio_transcription.delta"]
        assert len(completed) == 1 and deltas and "".join(deltas) == completed[0]["transcript"]
        settled = session.recognizer.settled  # the judged pauses settled what was said before them
        assert settled and completed[0]["transcript"].startswith(settled)
        updated = next(e for _, e in recorder.events if e["type"] == "session.updated")
        assert updated["session"]["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
        check_shapes(recorder.events)  # the semantic_vad session and the turn's events are the SDK's shapes
    finally:
        await session.close()


@pytest.mark.parametrize("eagerness", ["high", "medium", "low"])
async def test_each_eagerness_waits_its_longest_silence_for_an_utterance_judged_incomplete(judged_services, spoken,
                                                                                           eagerness):
    cut = spoken[PAUSED_CUT]
    longest_s = EAGERNESS[eagerness][1] / 1000
    waited = await silence_before_commit(judged_services, {"type": "semantic_vad", "eagerness": eagerness}, cut,
                                         longest_s + 1.0, judged=True)
    # the VAD dates the end of speech to within a few 10 ms frames of the voice's end, and decides per 32 ms chunk
    assert longest_s - 0.1 <= waited <= longest_s + 0.15, (eagerness, waited)


async def test_a_server_without_a_turn_model_refuses_semantic_vad_and_keeps_server_vad(engine, tts, tmp_path):
    bad = tmp_path / "turn.onnx"
    bad.write_bytes(b"not a model")
    services = make_services(engine, tts, asr="pocketsphinx", turn_model=str(bad))
    assert services.turn_model is None and str(bad) in services.turn_model_error
    session, recorder = await session_with(services, None)
    try:
        await session.handle(json.dumps({"type": "session.update", "event_id": "evt_1", "session": {"audio": {"input": {
            "turn_detection": {"type": "semantic_vad"}}}}}))
        error = recorder.events[-1][1]
        assert error["type"] == "error" and error["error"]["code"] == "unsupported"
        assert "semantic_vad is unavailable" in error["error"]["message"] and str(bad) in error["error"]["message"]
        assert error["error"]["event_id"] == "evt_1"
        assert session.config.turn_detection.type == "server_vad"  # unchanged, and still working:
        await send(session, recorder, np.concatenate([silence(0.3), speak(tts, "How far away is the moon?"), silence(1.0)]))
        assert len(recorder.at("input_audio_buffer.committed")) == 1
    finally:
        await session.close()


async def test_a_question_the_llm_reads_as_complete_is_committed_before_smart_turn_would_judge(judged_services, spoken,
                                                                                              smart_turn, monkeypatch):
    heard = []
    judge = smart_turn.judge
    monkeypatch.setattr(smart_turn, "judge", lambda audio: heard.append(len(audio)) or judge(audio))
    waited = await silence_before_commit(judged_services, {"type": "semantic_vad", "eagerness": "auto"}, spoken[COMPLETE],
                                         2.0, judged=True)
    assert waited < JUDGE_AFTER_MS / 1000 and heard == [], (waited, heard)


async def test_the_llm_keeps_open_a_cut_sentence_that_smart_turn_is_sure_is_complete(judged_services, spoken,
                                                                                    smart_turn, monkeypatch):
    heard = []
    monkeypatch.setattr(smart_turn, "judge", lambda audio: heard.append(len(audio)) or Judgment(0.95, 0.0))
    speech = spoken[PAUSED]
    session, recorder = await session_with(judged_services, {"type": "semantic_vad", "eagerness": "high"})
    try:
        await send(session, recorder, np.concatenate([silence(0.3), speech, silence(2.5)]), judged=True)
        end_of_speech = int(0.3 * WIRE_RATE) + len(speech)
        commits = recorder.at("input_audio_buffer.committed")
        assert heard and len(commits) == 1 and commits[0] >= end_of_speech, (heard, commits, end_of_speech)
    finally:
        await session.close()


async def test_smart_turn_hears_a_pause_only_after_the_llm_has_read_it_and_left_the_turn_open(judged_services, spoken,
                                                                                                smart_turn, monkeypatch):
    """Sent as fast as the session takes it, the pause lasts JUDGE_AFTER_MS while the transcript is still being read."""
    asked = []  # at each of Smart Turn's judgments: was the LLM's still on its way, and had it come back
    judge = smart_turn.judge
    monkeypatch.setattr(smart_turn, "judge", lambda audio: asked.append(
        (session.text_judging, session.text_judgment is not None)) or judge(audio))
    session, recorder = await session_with(judged_services, {"type": "semantic_vad", "eagerness": "low"})
    try:
        await send(session, recorder, np.concatenate([silence(0.3), spoken[PAUSED_CUT], silence(0.5)]))
        await until(lambda: session.judgment is not None)
        assert asked == [(False, True)], asked  # once, after the LLM's judgment of the cut sentence kept the turn open
        assert session.text_judgment.probability < EAGERNESS["low"][0] and not recorder.at("input_audio_buffer.committed")
    finally:
        await session.close()


def test_combined_judgment_adds_log_odds():
    assert combined(0.8, 0.5) == pytest.approx(0.8)  # an unsure judgment changes nothing
    assert combined(0.3, 0.7) == pytest.approx(0.5)  # equal and opposite evidence cancels
    assert combined(0.9, 0.9) > 0.9 > combined(0.9, 0.3) > 0.5  # agreement strengthens; the surer one outweighs
    assert combined(0.01, 0.95) < 0.2 and combined(0.0, 1.0) == pytest.approx(0.5)  # sure of both: clamped, no NaN
    assert combined(0.2, 0.6) == pytest.approx(combined(0.6, 0.2))
