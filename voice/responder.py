"""One assistant response: engine stream -> clauses -> TTS -> audio deltas paced at about real time.

Two halves, so a reply can be drafted before it is announced:
- `prepare()` starts the producer: it submits the request (on a worker thread: fitting a long conversation to the
  context and tokenizing it takes a while), then turns tokens into clauses and speech, into a queue. The session
  calls it while the VAD is still waiting out the user's silence; nothing is sent yet. Whatever goes wrong there
  (a refused request, an engine or TTS failure) ends the response as `failed`, and the session goes on.
- `run()` announces the response and plays the queue: each 20 ms frame is sent when the client's
  playback would be within `lead_ms` of running dry, so a barge-in has little buffered audio to chase.
`stop()` ends it at once (barge-in, `response.cancel`): no further frame is sent, the engine stream is
cancelled, and the item keeps only the text whose audio went out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from engine import Backend, ContextLengthError, Request, SamplingParams
from engine.sequence import Stream
from voice.audio import WIRE_RATE, float_to_pcm16, pcm16_to_b64
from voice.clauses import ClauseSplitter
from voice.conversation import Conversation, Item
from voice.metrics import TurnTimes
from voice.protocol import new_id, server_event
from voice.tts import TTS

FRAME = WIRE_RATE * 20 // 1000  # samples per audio delta (20 ms)

Send = Callable[[dict], Awaitable[None]]  # raises Disconnected once the client has gone


class Disconnected(ConnectionError):
    """The client went away; nothing more can be sent."""


class Response:
    def __init__(self, engine: Backend, tts: TTS, send: Send, *, sampling: SamplingParams, voice: str, speed: float,
                 audio: bool, times: TurnTimes, lead_ms: float, first_words: int):
        self.engine, self.tts, self.send = engine, tts, send
        self.sampling, self.voice, self.speed, self.audio = sampling, voice, speed, audio
        self.times, self.lead, self.first_words = times, lead_ms / 1000, first_words
        self.id = new_id("resp")
        self.item = Item(new_id("item"), "assistant", text="", audio=audio, status="in_progress")
        self.queue: asyncio.Queue = asyncio.Queue()  # ("audio", clause, pcm) | ("text", delta) | Exception | None
        self.stream: Stream | None = None
        self.producer: asyncio.Task | None = None
        self.player: asyncio.Task | None = None
        self.stop_reason: str | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    def prepare(self, system: str | None, history: list[dict]) -> None:
        """Start submitting and producing audio; sends nothing. Oldest history goes first if the conversation
        outgrows the model's context."""
        if self.stop_reason is not None:
            return
        self.producer = asyncio.create_task(self._produce(system, history, asyncio.get_running_loop()))

    def discard(self) -> None:
        """Drop a draft that was never announced."""
        self.stop("discarded")

    def stop(self, reason: str) -> None:
        """Stop now: called synchronously from the session, so no frame goes out after this returns."""
        if self.stop_reason is None:
            self.stop_reason = reason
        self._release()

    def _release(self) -> None:
        for task in (self.player, self.producer):
            if task is not None:
                task.cancel()
        if self.stream is not None:
            self.stream.cancel()

    async def run(self, conversation: Conversation) -> str:
        """Announce, play, and finish with `response.done`; return the final status."""
        for old in conversation.make_room():
            await self.send(server_event("conversation.item.deleted", item_id=old.id))
        previous = conversation.add(self.item)
        await self.send(server_event("response.created", response=self._response("in_progress")))
        await self.send(server_event("response.output_item.added", response_id=self.id, output_index=0,
                                     item=self.item.to_dict()))
        await self.send(server_event("conversation.item.added", previous_item_id=previous, item=self.item.to_dict()))
        await self.send(server_event("response.content_part.added", **self._where(), part=self._part()))
        error: Exception | None = None
        if self.stop_reason is None:  # a barge-in may have come while the events above went out
            self.player = asyncio.create_task(self._play())
            await asyncio.wait([self.player])
            if not self.player.cancelled():
                error = self.player.exception()
        if self.stop_reason is not None:
            status = "cancelled"
        elif error is not None:
            status = "failed"
        else:
            status = "completed"
        self._release()
        await self._finish(status, error)
        return status

    # ---- producer: tokens -> clauses -> speech ------------------------------------------------

    async def _produce(self, system: str | None, history: list[dict], loop: asyncio.AbstractEventLoop) -> None:
        splitter = ClauseSplitter(self.first_words)
        try:
            submitting = asyncio.ensure_future(asyncio.to_thread(submit_fitting, self.engine, system, history,
                                                                 self.sampling, loop))
            try:
                self.stream = await asyncio.shield(submitting)  # shielded: a thread cannot be cancelled mid-way
            except asyncio.CancelledError:  # stopped meanwhile: the request it is about to queue is cancelled at once
                submitting.add_done_callback(_cancel_queued)
                raise
            async for ev in self.stream:
                self.times.stamp(llm_scheduled=self.stream.metrics.scheduled, llm_first_token=ev.t)
                if not self.audio:
                    self.queue.put_nowait(("text", ev.text))
                    continue
                for clause, ends_sentence in splitter.feed(ev.text):
                    await self._speak(clause, ends_sentence)
            if self.audio and (rest := splitter.flush()):
                await self._speak(*rest)
            self.queue.put_nowait(None)
        except Exception as e:  # refused, EngineError, a TTS failure: the player reports it as a failed response
            self.queue.put_nowait(e)

    async def _speak(self, clause: str, ends_sentence: bool) -> None:
        self.times.stamp(first_clause=time.monotonic())
        audio = await asyncio.to_thread(self.tts.synthesize, clause, self.voice, self.speed, ends_sentence)
        self.times.stamp(tts_first_chunk=time.monotonic())
        self.queue.put_nowait(("audio", clause, float_to_pcm16(audio)))

    # ---- player: paced deltas -----------------------------------------------------------------

    async def _play(self) -> None:
        play_end = 0.0  # when the client will have played everything sent so far
        while (entry := await self.queue.get()) is not None:
            if isinstance(entry, Exception):
                raise entry
            if entry[0] == "text":
                self.item.text += entry[1]
                await self.send(server_event("response.output_text.delta", **self._where(), delta=entry[1]))
                continue
            _, clause, pcm = entry
            delta = clause if not self.item.clauses else " " + clause
            await self.send(server_event("response.output_audio_transcript.delta", **self._where(), delta=delta))
            self.item.clauses.append((clause, 0))
            for start in range(0, len(pcm) // 2, FRAME):
                wait = play_end - self.lead - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                frame = pcm[2 * start: 2 * (start + FRAME)]
                await self.send(server_event("response.output_audio.delta", **self._where(), delta=pcm16_to_b64(frame)))
                now = time.monotonic()
                self.times.stamp(first_audio_sent=now)
                n = len(frame) // 2
                self.item.clauses[-1] = (clause, self.item.clauses[-1][1] + n)
                play_end = max(play_end, now) + n / WIRE_RATE

    # ---- events -------------------------------------------------------------------------------

    def _where(self) -> dict:
        return {"response_id": self.id, "item_id": self.item.id, "output_index": 0, "content_index": 0}

    def _part(self) -> dict:
        if self.audio:
            return {"type": "audio", "transcript": self.item.text if self.item.clauses else ""}
        return {"type": "text", "text": self.item.text}

    async def _finish(self, status: str, error: Exception | None) -> None:
        if self.audio:
            self.item.text = " ".join(text for text, _ in self.item.clauses)
            if status == "cancelled":  # the last clause may have been cut mid-way: keep the words heard
                self.item.text = self.item.text_until(self.item.audio_samples)
        self.item.status = "completed" if status == "completed" else "incomplete"
        if self.audio:
            await self.send(server_event("response.output_audio.done", **self._where()))
            await self.send(server_event("response.output_audio_transcript.done", **self._where(),
                                         transcript=self.item.text))
        else:
            await self.send(server_event("response.output_text.done", **self._where(), text=self.item.text))
        await self.send(server_event("response.content_part.done", **self._where(), part=self._part()))
        await self.send(server_event("response.output_item.done", response_id=self.id, output_index=0,
                                     item=self.item.to_dict()))
        await self.send(server_event("conversation.item.done", item=self.item.to_dict()))
        details = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": self.stop_reason}
        elif status == "failed":
            details = {"type": "failed", "error": {"type": type(error).__name__, "message": str(error)}}
        m = self.stream.metrics if self.stream is not None else None
        await self.send(server_event("tradeoff.metrics", response_id=self.id, item_id=self.item.id,
                                     **self.times.event_payload(m)))
        await self.send(server_event("response.done", response=self._response(status, details)))

    def _response(self, status: str, details: dict | None = None) -> dict:
        m = self.stream.metrics if self.stream is not None and status != "in_progress" else None
        usage = None
        if m is not None:
            usage = {"total_tokens": m.prompt_tokens + m.output_tokens, "input_tokens": m.prompt_tokens,
                     "output_tokens": m.output_tokens,
                     "input_token_details": {"text_tokens": m.prompt_tokens, "cached_tokens": m.cached_tokens},
                     "output_token_details": {"text_tokens": m.output_tokens}}
        return {
            "id": self.id, "object": "realtime.response", "status": status, "status_details": details,
            "conversation_id": "conv_default", "output_modalities": ["audio" if self.audio else "text"],
            "max_output_tokens": self.sampling.max_tokens,
            "audio": {"output": {"format": {"type": "audio/pcm", "rate": WIRE_RATE}, "voice": self.voice}},
            "output": [] if status == "in_progress" else [self.item.to_dict()], "usage": usage,
        }


def _cancel_queued(submitted: asyncio.Future) -> None:
    if not submitted.cancelled() and submitted.exception() is None:
        submitted.result().cancel()


def submit_fitting(engine: Backend, system: str | None, history: list[dict], sampling: SamplingParams,
                   loop: asyncio.AbstractEventLoop) -> Stream:
    """Submit the newest part of `history` that fits the model's context (blocking: run it on a thread). One pass
    from the newest message back picks it, tokenizing about a context's worth of text however long the conversation
    is; if the template costs a little more than counted, the oldest kept message goes too, and so on."""
    head = [{"role": "system", "content": system}] if system else []
    history = newest_that_fit(engine, head, history)
    while True:
        try:
            return engine.submit(Request(messages=head + history, sampling=sampling), loop)
        except ContextLengthError:
            if len(history) <= 1:
                raise
            history = history[1:]


def newest_that_fit(engine: Backend, head: list[dict], history: list[dict]) -> list[dict]:
    """The longest tail of `history` whose tokens, with `head` and the template's own, leave one token of context
    (at least the last message, which may itself be too long). Counted with the engine's tokenizer when it has one."""
    tok, context = engine.tokenizer, engine.max_seq_len
    if tok is None or context is None or len(history) <= 1:
        return history
    probe = {"role": "user", "content": "x"}
    one, two = (len(tok.encode_chat(head + [probe] * n)) for n in (1, 2))
    around = two - one - len(tok.encode_text("x"))  # the template's tokens around one message
    budget = context - 1 - (one - around - len(tok.encode_text("x")))  # what is left beside head and the reply's start
    start = len(history)
    while start > 0:
        cost = around + len(tok.encode_text(history[start - 1]["content"], limit=budget))  # no further than the budget
        if cost > budget:
            break
        budget -= cost
        start -= 1
    return history[min(start, len(history) - 1):]
