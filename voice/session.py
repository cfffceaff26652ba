"""One client's realtime session: dispatches its events, feeds its audio to the turn detector (voice/turns.py) and
the recognizer, keeps its conversation, and starts and stops responses.

Input audio (24 kHz) is resampled to 16 kHz and fed to the turn detector as it arrives. From speech start (minus the
prefix padding) the audio also goes to the recognizer. At a pause the recognizer transcribes; at a pause semantic_vad
judges, what was transcribed becomes settled: later decodes start after it (Whisper), and it goes out as a
transcription delta as soon as the turn is committed, the rest once decoded, then the completed transcript. Under
semantic_vad two judges read a pause: the LLM itself (voice/text_turn.py: how likely the transcript so far ends the
user's turn) and, only where its reading leaves the turn open, Smart Turn (the audio's prosody); their log odds add up
(voice/turns.py). When a pause's transcript is ready and the user is still silent, a reply is drafted (engine + TTS)
but nothing is sent. When the turn ends the draft, if the conversation still matches it, starts playing at once.
Speech that starts during a reply stops it within the chunk that detected it (barge-in).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from engine import Backend, EngineError, OverloadedError, SamplingParams
from voice import text_turn
from voice.asr import ASR, Recognizer, RecognizerLimitError, Transcript
from voice.audio import ASR_RATE, WIRE_RATE, Resampler, b64_to_pcm16, pcm16_to_float
from voice.conversation import MAX_BYTES, MAX_ITEMS, Conversation, Item
from voice.metrics import TurnTimes
from voice.protocol import (
    TRANSCRIPTION_MODELS,
    ProtocolError,
    SessionConfig,
    TurnDetection,
    error_event,
    max_output_tokens,
    new_id,
    parse_client_event,
    server_event,
)
from voice.responder import Disconnected, Response, Send
from voice.smart_turn import Judgment, SmartTurn
from voice.tts import TTS
from voice.turns import (
    PauseToJudge,
    SpeechPaused,
    SpeechResumed,
    SpeechStarted,
    TurnDetector,
    TurnEnded,
    TurnEvent,
    combined,
    complete_enough,
)

log = logging.getLogger("voice.session")


@dataclass
class Services:
    """What all sessions of a server share."""

    engine: Backend
    tts: TTS
    asr: Callable[[str], ASR]  # backend name -> the (cached) recognizer factory
    defaults: SessionConfig = SessionConfig()
    max_output_tokens: int = 200  # server cap per response
    max_buffer_s: float = 30.0  # longest input audio a turn may hold
    lead_ms: float = 100.0  # how far audio deltas run ahead of real time
    first_words: int = 3  # the first clause of a reply is cut after this many words
    max_conversation_items: int = MAX_ITEMS  # bounds on one session's conversation
    max_conversation_bytes: int = MAX_BYTES
    turn_model: SmartTurn | None = None  # semantic_vad's; None: only server_vad (turn_model_error says why)
    turn_model_error: str = "no turn model was loaded"
    text_turn: bool = True  # semantic_vad also asks the LLM whether the transcript ends the turn (voice/text_turn.py)


class Session:
    def __init__(self, services: Services, send: Send):
        self.services = services
        self.send = send
        self.config = replace(services.defaults, id=new_id("sess"))
        self.conversation = Conversation(services.max_conversation_items, services.max_conversation_bytes)
        # RecognizerLimitError when the default recognizer's workers are all in use: the server refuses the session
        self.recognizer: Recognizer = services.asr(TRANSCRIPTION_MODELS[self.config.transcription_model]).open()
        self.turns = TurnDetector(self.config.turn_detection or TurnDetection(), services.max_buffer_s)
        self.resampler = Resampler(WIRE_RATE, ASR_RATE)
        self.tasks: set[asyncio.Task] = set()
        self.active: Response | None = None  # the response being prepared or played
        self.active_task: asyncio.Task | None = None
        self.draft: Response | None = None  # a reply drafted during the end-of-turn wait
        self.draft_messages: list[dict] | None = None
        self.pending: list[asyncio.Task] = []  # transcriptions a new response must wait for
        # input audio
        self.manual: list[np.ndarray] = []  # 24 kHz buffer when turn detection is off
        self.fed_until = 0  # the recognizer has had the utterance's audio up to this sample
        self.speech_item_id: str | None = None
        self.asr_task: asyncio.Task | None = None  # transcript of the utterance up to its latest pause
        # semantic_vad: the turn models' judgments of the utterance at its latest pause (Smart Turn's of the audio, the
        # LLM's of the transcript), whether the LLM's is still on its way, whether Smart Turn waits for it, and which
        # pause that is (judgments that come back after the user went on are for an earlier one)
        self.judgment: Judgment | None = None
        self.text_judgment: Judgment | None = None
        self.text_judging = False
        self.audio_due = False
        self.pauses = 0
        # one client event at a time, and a text judgment that ends the turn waits its turn among them
        self.lock = asyncio.Lock()
        # server_vad's idle_timeout_ms counts silence from here (a 16 kHz sample of the turn detector's input: once the
        # last response has played); None: not counting (no response yet, or speech since)
        self.idle_from: int | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        await self.send(server_event("session.created", session=self.config.to_dict()))

    async def close(self) -> None:
        """The client is gone: stop generating, cancel every task, end the recognizer's worker (without waiting)."""
        for response in (self.active, self.draft):
            if response is not None:
                response.stop("client_disconnected")
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=2)
        self.recognizer.close()

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None and not isinstance(exc, Disconnected):
            log.error("session task failed", exc_info=exc)

    # ---- dispatch ---------------------------------------------------------------------------

    async def handle(self, raw: str | bytes) -> None:
        """Handle one client message. Client errors become `error` events; the session goes on."""
        event: dict = {}
        try:
            event = parse_client_event(raw)
            async with self.lock:
                await getattr(self, "_on_" + event["type"].replace(".", "_"))(event)
        except ProtocolError as e:
            if e.event_id is None and isinstance(event.get("event_id"), str):
                e.event_id = event["event_id"]  # so the client knows which of its events failed
            await self.send(error_event(e))
        except Exception as e:
            if isinstance(e, Disconnected):
                raise
            log.exception("error handling a client event")
            await self.send(error_event(ProtocolError("server_error", f"internal error: {type(e).__name__}: {e}"),
                                        kind="server_error"))

    async def _on_session_update(self, event: dict) -> None:
        new = self.config.updated(event["session"])
        if new.turn_detection is not None and new.turn_detection.semantic and self.services.turn_model is None:
            raise ProtocolError("unsupported", f"semantic_vad is unavailable on this server: "
                                f"{self.services.turn_model_error}; use server_vad", "session.audio.input.turn_detection.type")
        try:
            self.services.tts.check_voice(new.voice)
        except ValueError as e:
            raise ProtocolError("invalid_value", str(e), "session.audio.output.voice", event.get("event_id")) from None
        if new.transcription_model != self.config.transcription_model:
            asr = await asyncio.to_thread(self.services.asr, TRANSCRIPTION_MODELS[new.transcription_model])
            try:  # the new one first, so a refusal leaves the session as it was
                recognizer = await asyncio.to_thread(asr.open)  # a worker process starts: not on the loop
            except RecognizerLimitError as e:
                raise ProtocolError("recognizer_limit_reached", str(e), "session.audio.input.transcription.model") from None
            self.recognizer.close()
            self.recognizer = recognizer
            self._drop_utterance()
        if new.turn_detection != self.config.turn_detection:
            self._drop_utterance()
            self.manual.clear()
            if new.turn_detection:
                self.turns.configure(new.turn_detection)
        self.config = new
        await self.send(server_event("session.updated", session=self.config.to_dict()))

    async def _on_input_audio_buffer_append(self, event: dict) -> None:
        try:
            audio = pcm16_to_float(b64_to_pcm16(event["audio"]))
        except ValueError as e:
            raise ProtocolError("invalid_audio", f"{e} (expected base64 pcm16, 24 kHz, mono)", "audio") from None
        now = time.monotonic()
        if self.config.turn_detection is None:
            held = sum(len(a) for a in self.manual)
            if (held + len(audio)) / WIRE_RATE > self.services.max_buffer_s:
                raise ProtocolError("input_audio_buffer_full", f"the input audio buffer holds at most "
                                    f"{self.services.max_buffer_s:.0f} s; commit or clear it (this chunk was dropped)")
            self.manual.append(audio)
            return
        for turn_event in self.turns.feed(self.resampler(audio), now):
            await self._on_turn(turn_event)
        if self.turns.in_turn:
            self._feed_recognizer()
        await self._check_idle()

    async def _on_input_audio_buffer_commit(self, event: dict) -> None:
        if self.config.turn_detection is not None:
            if not self.turns.in_turn:
                raise ProtocolError("input_audio_buffer_commit_empty", "no speech in the input audio buffer to commit")
            await self._end_of_turn(self.turns.end_turn(), auto_response=False)
            return
        if not self.manual:
            raise ProtocolError("input_audio_buffer_commit_empty", "the input audio buffer is empty: append audio first")
        audio = np.concatenate(self.manual)
        self.manual.clear()
        self.recognizer.reset()
        self.recognizer.feed(Resampler(WIRE_RATE, ASR_RATE)(audio))
        item = Item(new_id("item"), "user", text=None, audio=True)
        times = TurnTimes()
        times.stamp(vad_decision=time.monotonic())
        await self._commit(item, self._spawn(self._transcribe()), times, False)

    async def _on_input_audio_buffer_clear(self, event: dict) -> None:
        self.manual.clear()
        self._drop_utterance()
        await self.send(server_event("input_audio_buffer.cleared"))

    async def _on_conversation_item_create(self, event: dict) -> None:
        spec = event["item"]
        previous = event.get("previous_item_id")
        if previous is not None and previous != self.conversation.last_id:
            raise ProtocolError("unsupported", "items can only be appended: previous_item_id must be the last item's id",
                                "previous_item_id")
        item_id = spec.get("id") or new_id("item")
        if self.conversation.find(item_id):
            raise ProtocolError("invalid_value", f"item id {item_id!r} is already in the conversation", "item.id")
        text = "".join(part["text"] for part in spec["content"])
        if not self.conversation.has_room(text):
            raise ProtocolError("conversation_full", f"the conversation holds at most {self.conversation.max_items} items "
                                f"and {self.conversation.max_bytes} bytes of text; delete items to make room "
                                "(conversation.item.delete)", "item")
        item = Item(item_id, spec["role"], text=text)
        prev = self.conversation.add(item)
        await self.send(server_event("conversation.item.added", previous_item_id=prev, item=item.to_dict()))
        await self.send(server_event("conversation.item.done", previous_item_id=prev, item=item.to_dict()))

    async def _on_conversation_item_truncate(self, event: dict) -> None:
        item = self.conversation.find(event["item_id"])
        if item is None or item.role != "assistant" or not item.audio:
            raise ProtocolError("invalid_value", f"no assistant audio item with id {event['item_id']!r}", "item_id")
        if self.active is not None and self.active.item is item:
            await self._stop_active("client_truncated", wait=True)
        samples = event["audio_end_ms"] * WIRE_RATE // 1000
        if samples > item.audio_samples:
            raise ProtocolError("invalid_value", f"audio_end_ms {event['audio_end_ms']} is past the item's audio "
                                f"({item.audio_samples * 1000 // WIRE_RATE} ms)", "audio_end_ms")
        item.text = item.text_until(samples)
        await self.send(server_event("conversation.item.truncated", item_id=item.id, content_index=0,
                                     audio_end_ms=event["audio_end_ms"]))

    async def _on_conversation_item_retrieve(self, event: dict) -> None:
        item = self.conversation.find(event["item_id"])
        if item is None:
            raise ProtocolError("invalid_value", f"no item with id {event['item_id']!r}", "item_id")
        await self.send(server_event("conversation.item.retrieved", item=item.to_dict()))

    async def _on_conversation_item_delete(self, event: dict) -> None:
        item = self.conversation.find(event["item_id"])
        if item is None:
            raise ProtocolError("invalid_value", f"no item with id {event['item_id']!r}", "item_id")
        if self.active is not None and self.active.item is item:
            raise ProtocolError("invalid_value", "that item is the response in progress: cancel it first", "item_id")
        self.conversation.remove(item)
        await self.send(server_event("conversation.item.deleted", item_id=item.id))

    async def _on_response_create(self, event: dict) -> None:
        if self.active is not None:
            raise ProtocolError("conversation_already_has_active_response",
                                f"response {self.active.id} is still in progress; cancel it or wait for response.done")
        spec = event.get("response") or {}
        times = TurnTimes()
        response = self._new_response(times, max_tokens=max_output_tokens(spec, "response."),
                                      modalities=spec.get("output_modalities"))
        self._start(response, instructions=spec.get("instructions"))

    async def _on_response_cancel(self, event: dict) -> None:
        wanted = event.get("response_id")
        if self.active is None or (wanted is not None and wanted != self.active.id):
            raise ProtocolError("response_cancel_not_active", "there is no active response" +
                                (f" with id {wanted!r}" if wanted else ""), "response_id")
        await self._stop_active("client_cancelled")

    # ---- speech turns -----------------------------------------------------------------------

    async def _on_turn(self, ev: TurnEvent) -> None:
        if isinstance(ev, SpeechStarted):
            if self.active is not None and self.config.turn_detection.interrupt_response:
                await self._stop_active("turn_detected")  # barge-in: stops before anything else is sent
            self._discard_draft()
            self.speech_item_id = new_id("item")
            self.idle_from = None  # the user spoke: no idle timeout until the next response has played
            self.recognizer.reset()
            self.asr_task = None
            self._forget_judgments()
            self._feed_recognizer(ev.start)
            await self.send(server_event("input_audio_buffer.speech_started", item_id=self.speech_item_id,
                                         audio_start_ms=ev.start * 1000 // ASR_RATE))
        elif isinstance(ev, SpeechPaused):
            self.asr_task = self._spawn(self._transcribe())
            self.pauses += 1
            if self.config.turn_detection.semantic and self.services.text_turn:
                self.text_judging = True
                self.asr_task.add_done_callback(lambda task, pause=self.pauses: self._spawn(self._judge_text(task, pause)))
            else:
                self.asr_task.add_done_callback(self._maybe_draft)
        elif isinstance(ev, PauseToJudge):
            self._spawn(self.recognizer.settle())  # a real pause: the speech before it is decoded once, now
            if self.text_judging:  # Smart Turn is asked only if the LLM's reading does not end the turn
                self.audio_due = True
            else:
                await self._judge()
        elif isinstance(ev, SpeechResumed):
            self._discard_draft()
            self.asr_task = None  # it covers the speech only up to the pause
            self._forget_judgments()
        elif isinstance(ev, TurnEnded):
            await self._end_of_turn(ev)

    async def _judge(self) -> None:
        """semantic_vad: Smart Turn judges the utterance so far (off the event loop: ~100 ms on 2 cores), then the turn
        ends if the judgments say so. Client events wait meanwhile (the session's lock), so the turn cannot change
        under it."""
        self.audio_due = False
        audio = self.turns.audio(self.turns.start)
        self.judgment = await asyncio.to_thread(self.services.turn_model.judge, audio)
        await self._decide()

    async def _judge_text(self, asr_task: asyncio.Task, pause: int) -> None:
        """semantic_vad: the pause's transcript is ready; the LLM judges it (voice/text_turn.py), then the turn ends if
        the judgments say so. The reply is drafted once the judgment's request is queued: in latency mode it runs
        next and prefills only the template's few tokens after the judgment's prefix."""
        if pause != self.pauses or not self.text_judging:  # the user went on before the transcript was ready
            return
        t0 = time.perf_counter()
        stream = None
        if not asr_task.cancelled() and asr_task.exception() is None and (text := asr_task.result()[0].text):
            system, history = _split_system(self._messages_with(text))
            try:
                stream = await asyncio.to_thread(text_turn.submit, self.services.engine, system, history,
                                                 asyncio.get_running_loop())
            except (OverloadedError, ValueError) as e:  # a full queue, a backend without log-probabilities
                log.info("no text judgment of the turn: %s", e)
        self._maybe_draft(asr_task)
        probability = None
        if stream is not None:
            try:
                probability = await text_turn.probability(self.services.engine, stream)
            except EngineError as e:
                log.warning("the text judgment of the turn failed: %s", e)
        async with self.lock:
            if pause != self.pauses or not self.text_judging:  # the user went on, or the turn ended
                return
            self.text_judging = False
            if probability is not None:
                self.text_judgment = Judgment(probability, time.perf_counter() - t0)
            await self._decide()
            if self.audio_due and self.turns.in_turn and self.turns.paused:
                await self._judge()

    async def _decide(self) -> None:
        """semantic_vad, at a pause: end the turn if P(complete) reaches the eagerness's threshold. P is the LLM's
        alone until Smart Turn has judged too, then both combined; Smart Turn's alone only when no text judgment is
        coming. The LLM reads first (the transcript is decoded from the pause's first silent chunk) and Smart Turn
        only where that does not end the turn: run side by side on 2 cores, Smart Turn's ~100 ms of inference slowed
        Whisper and the LLM's judgment, the turn's critical path, by as much (bench/RESULTS.md)."""
        text, audio = self.text_judgment, self.judgment
        if not (self.turns.in_turn and self.turns.paused) or (text is None and (audio is None or self.text_judging)):
            return
        if text is None or audio is None:
            probability = (text or audio).probability
        else:
            probability = combined(text.probability, audio.probability)
        if complete_enough(self.config.turn_detection, probability):
            await self._end_of_turn(self.turns.end_turn("semantic"))

    def _forget_judgments(self) -> None:
        self.judgment = self.text_judgment = None
        self.text_judging = self.audio_due = False

    def _feed_recognizer(self, start: int | None = None) -> None:
        """Feed the recognizer the audio it has not had yet (from `start` on a new utterance)."""
        if start is not None:
            self.fed_until = start
        if self.turns.received > self.fed_until:
            self.recognizer.feed(self.turns.audio(self.fed_until))
        self.fed_until = self.turns.received

    async def _transcribe(self) -> tuple[Transcript, float, float]:
        """(transcript, when asked, when answered)"""
        asked = time.monotonic()
        result = await self.recognizer.transcribe()
        return result, asked, time.monotonic()

    def _maybe_draft(self, task: asyncio.Task) -> None:
        """The pause's transcript is ready: if the user is still silent, draft the reply now."""
        td = self.config.turn_detection
        if (task is not self.asr_task or task.cancelled() or task.exception() is not None or not self.turns.paused
                or self.draft is not None or self.active is not None or td is None or not td.create_response):
            return
        transcript = task.result()[0]
        if not transcript.text:
            return
        messages = self._messages_with(transcript.text)
        self.draft = self._new_response(TurnTimes())
        self.draft_messages = messages
        system, history = _split_system(messages)
        self.draft.prepare(system, history)

    def _messages_with(self, transcript: str) -> list[dict]:
        """The conversation as the reply would read it if the turn ended with `transcript` (a pause's)."""
        return self.conversation.messages(self.config.instructions) + [{"role": "user", "content": transcript}]

    def _discard_draft(self) -> None:
        if self.draft is not None:
            self.draft.discard()
            self.draft = self.draft_messages = None

    async def _end_of_turn(self, ended: TurnEnded, auto_response: bool = True) -> None:
        """The turn is over (silence, a manual commit, or a full buffer): commit it and answer."""
        times = TurnTimes()
        times.stamp(speech_end=ended.sent_at, vad_decision=time.monotonic(), turn_reason=ended.reason)
        if self.judgment is not None:
            times.stamp(turn_probability=self.judgment.probability, turn_model_s=self.judgment.seconds)
        if self.text_judgment is not None:
            times.stamp(text_probability=self.text_judgment.probability, text_model_s=self.text_judgment.seconds)
        self._forget_judgments()
        item = Item(self.speech_item_id or new_id("item"), "user", text=None, audio=True)
        asr_task = self.asr_task or self._spawn(self._transcribe())  # no pause-time transcript covers the speech
        draft, draft_messages = self.draft, self.draft_messages
        self.draft = self.draft_messages = None
        self.speech_item_id = self.asr_task = None
        td = self.config.turn_detection
        respond = auto_response and td is not None and td.create_response and self.active is None
        await self.send(server_event("input_audio_buffer.speech_stopped", item_id=item.id,
                                     audio_end_ms=ended.end * 1000 // ASR_RATE))
        await self._commit(item, asr_task, times, respond, draft, draft_messages)

    async def _commit(self, item: Item, asr_task: asyncio.Task, times: TurnTimes, respond: bool,
                      draft: Response | None = None, draft_messages: list[dict] | None = None) -> None:
        if draft is not None and not respond:
            draft.discard()
            draft = draft_messages = None
        if draft is not None:  # the draft recorded its LLM and TTS times already: the turn's times are its
            draft.times.stamp(speech_end=times.speech_end, vad_decision=times.vad_decision, drafted=True,
                              turn_reason=times.turn_reason, turn_probability=times.turn_probability,
                              turn_model_s=times.turn_model_s, text_probability=times.text_probability,
                              text_model_s=times.text_model_s)
            times = draft.times
        previous = await self._add_item(item)
        await self.send(server_event("input_audio_buffer.committed", previous_item_id=previous, item_id=item.id))
        await self.send(server_event("conversation.item.added", previous_item_id=previous, item=item.to_dict()))
        settled = self.recognizer.settled  # now: the next utterance resets the recognizer
        self.pending = [t for t in self.pending if not t.done()] + [
            self._spawn(self._finish_transcript(item, asr_task, times, settled))]
        if respond:
            self._start(draft or self._new_response(times), draft_messages=draft_messages, answering=item)

    async def _finish_transcript(self, item: Item, asr_task: asyncio.Task, times: TurnTimes, settled: str) -> None:
        """The transcript as deltas (the settled start at once, the rest once decoded), then completed."""
        if settled:
            await self._transcription_delta(item, settled)
        try:
            transcript, asked, answered = await asr_task
        except Exception as e:  # a recognizer that failed (its worker died): the turn has no text
            log.exception("transcription failed")
            item.text = ""
            await self.send(server_event("conversation.item.input_audio_transcription.failed", item_id=item.id,
                                         content_index=0, error={"type": "server_error", "code": "transcription_failed",
                                                                 "message": f"{type(e).__name__}: {e}"}))
            return
        times.stamp(asr_start=asked, asr_final=answered, asr_compute_s=transcript.compute_s, asr_audio_s=transcript.audio_s)
        item.text = transcript.text
        if not transcript.text.startswith(settled):  # a recognizer that broke its promise: the completed text stands
            log.warning("the final transcript %r does not extend its settled start %r", transcript.text, settled)
        elif rest := transcript.text[len(settled):]:
            await self._transcription_delta(item, rest)
        await self.send(server_event("conversation.item.input_audio_transcription.completed", item_id=item.id,
                                     content_index=0, transcript=transcript.text,
                                     usage={"type": "duration", "seconds": round(transcript.audio_s, 3)}))
        await self.send(server_event("conversation.item.done", item=item.to_dict()))

    async def _transcription_delta(self, item: Item, delta: str) -> None:
        await self.send(server_event("conversation.item.input_audio_transcription.delta", item_id=item.id,
                                     content_index=0, delta=delta))

    async def _add_item(self, item: Item) -> str | None:
        """Append an input item, deleting the oldest items if the conversation is full (a turn is never refused);
        returns the id of the item before it."""
        for old in self.conversation.make_room():
            await self.send(server_event("conversation.item.deleted", item_id=old.id))
        return self.conversation.add(item)

    def _drop_utterance(self) -> None:
        self._discard_draft()
        self._forget_judgments()
        self.turns.reset()
        self.speech_item_id = self.asr_task = None
        self.recognizer.reset()

    async def _check_idle(self) -> None:
        """server_vad's idle_timeout_ms: once that much audio has come without speech since the last response played,
        commit the silence as an empty input item and respond (the model prompts the user to go on), as the Realtime
        API does. Counted in input audio, so a client streaming faster than real time gets the same events."""
        td = self.config.turn_detection
        if (td is None or td.idle_timeout_ms is None or self.idle_from is None or self.turns.in_turn
                or self.active is not None or self.turns.received - self.idle_from < td.idle_timeout_ms * ASR_RATE // 1000):
            return
        start, self.idle_from = self.idle_from, None
        item = Item(new_id("item"), "user", text="", audio=True)
        await self.send(server_event("input_audio_buffer.timeout_triggered", item_id=item.id,
                                     audio_start_ms=start * 1000 // ASR_RATE,
                                     audio_end_ms=self.turns.received * 1000 // ASR_RATE))
        previous = await self._add_item(item)
        await self.send(server_event("input_audio_buffer.committed", previous_item_id=previous, item_id=item.id))
        await self.send(server_event("conversation.item.added", previous_item_id=previous, item=item.to_dict()))
        await self.send(server_event("conversation.item.done", previous_item_id=previous, item=item.to_dict()))
        if td.create_response:
            self._start(self._new_response(TurnTimes()))

    # ---- responses --------------------------------------------------------------------------

    def _new_response(self, times: TurnTimes, max_tokens: int | None = None, modalities: list | None = None) -> Response:
        cap = self.services.max_output_tokens
        limit = min(cap, max_tokens or self.config.max_output_tokens or cap)
        modalities = modalities or list(self.config.output_modalities)
        sampling = SamplingParams(max_tokens=limit, temperature=self.config.temperature)
        return Response(self.services.engine, self.services.tts, self.send, sampling=sampling, voice=self.config.voice,
                        speed=self.config.speed, audio=modalities == ["audio"], times=times,
                        lead_ms=self.services.lead_ms, first_words=self.services.first_words)

    def _start(self, response: Response, instructions: str | None = None, draft_messages: list[dict] | None = None,
               answering: Item | None = None) -> None:
        self.active = response
        self.active_task = self._spawn(self._respond(response, list(self.pending), instructions, draft_messages, answering))
        self.pending = []

    async def _respond(self, response: Response, pending: list[asyncio.Task], instructions: str | None,
                       draft_messages: list[dict] | None, answering: Item | None) -> None:
        """Wait for pending transcripts, then play `response` (the draft if it still fits the conversation)."""
        try:
            for task in pending:  # the conversation must hold every transcript before the model reads it
                await asyncio.wait([task])
            if answering is not None and not answering.text:
                response.discard()  # the turn was noise: nothing was said, so nothing to answer
                return
            messages = self.conversation.messages(instructions or self.config.instructions)
            if response.stop_reason is None and draft_messages is not None and draft_messages != messages:
                response.discard()  # the transcript or the conversation changed since the draft: redo it
                response = self._new_response(response.times.speech_only())
                self.active = response
                draft_messages = None
            if draft_messages is None and response.stop_reason is None:
                response.prepare(*_split_system(messages))
            await response.run(self.conversation)
        finally:
            if self.active is response:
                self.active = self.active_task = None
            if response.stop_reason != "turn_detected":  # (a barge-in: the user is speaking, nothing to count)
                # the idle timeout counts from the end of its playback: audio runs lead_ms ahead of real time
                self.idle_from = self.turns.received + int(self.services.lead_ms * ASR_RATE / 1000)

    async def _stop_active(self, reason: str, wait: bool = False) -> None:
        """Stop the active response now; with `wait`, also let it send its closing events."""
        response, task = self.active, self.active_task
        if response is None:
            return
        response.stop(reason)
        self.active = self.active_task = None
        if wait and task is not None:
            await asyncio.wait([task])


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages
