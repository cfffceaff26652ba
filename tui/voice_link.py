"""The dashboard's one contact with the voice package: the voice server (in-process on loopback, or a
remote `tradeoff serve`), a realtime client, the simulated caller, the microphone, and typed messages.
If the voice API changes, only this module changes.

It runs on an asyncio loop of its own, in a background thread, so VAD, ASR, TTS and audio pacing never run
on the UI thread and the UI never delays them. What happens in the conversation goes to the screen as
messages (tui/messages.py); the controls (`start`, `set_caller`, `set_added_callers`, `say`, `talk`, `stop`, `join`) may
be called from any thread.

Beside the caller whose conversation the transcript shows, callers can be added as load: each speaks on a session of
its own, and only its measured turns reach the screen.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from urllib.parse import urlsplit

from textual.message import Message

from engine import Backend
from serve.background import BackgroundLoop
from tui.messages import AgentSaid, TurnMeasured, UserSaid, VoiceStatus
from tui.model import VoiceTurn
from voice.caller import STAGGER_S, SimulatedCaller, call, mixed_questions
from voice.client import RealtimeClient
from voice.protocol import PATH, describe_turn_detection
from voice.server import VoiceServer, make_services
from voice.sound import open_devices
from voice.tts import EspeakTTS, make_tts

Post = Callable[[Message], object]
ENDLESS = 1_000_000  # turns for a caller that goes on until switched off
CALLER_PATIENCE_S = 120  # an overloaded engine (latency mode, many users) may take this long to answer a turn


def realtime_url(url: str) -> str:
    """ws://HOST:PORT -> ws://HOST:PORT/v1/realtime (a URL with a path is kept as it is)."""
    return url.rstrip("/") + PATH if urlsplit(url).path in ("", "/") else url


class VoiceLink:
    def __init__(self, post: Post, url: str | None = None, asr: str = "whisper"):
        self.post = post
        self.url = url  # None: run a server in this process
        self.asr = asr
        self.caller_on = False
        self.added_callers = 0  # simulated callers beside the first, each on a session of its own
        self.talking = False
        self.mic_reason: str | None = None  # why there is no microphone (None: there is one)
        self._bg: BackgroundLoop | None = None
        self._run: concurrent.futures.Future | None = None
        self._stop: asyncio.Event | None = None
        self._stopped = False
        self._client = None
        self._devices = None
        self._caller: asyncio.Task | None = None
        self._drain: asyncio.Task | None = None
        self._mic: asyncio.Task | None = None
        self._url: str | None = None  # the realtime server, once connected
        self._added: list[asyncio.Task] = []  # the added callers, in the order they were added
        self._added_tts: EspeakTTS | None = None  # their voice (one worker process for all of them)
        self._adding = asyncio.Lock()  # key presses in quick succession change the added callers one after another
        self._responses: dict[str, dict] = {}  # response id -> {"text", "typed", "metrics"}
        self._user_text = ""
        self.turn_detection: dict | None = None  # the session's, as the server last confirmed it

    # ---- controls (any thread) ---------------------------------------------------------------

    def set_caller(self, on: bool) -> None:
        self._call(self._set_caller, on)

    def set_added_callers(self, n: int) -> None:
        """Run `n` simulated callers beside the first one (0 stops them); each asks the built-in questions, from a
        place of its own in them, on its own session."""
        self._call(self._set_added_callers, n)

    @property
    def added_running(self) -> int:
        """The added callers still running (they end a moment after `set_added_callers` lowers their number)."""
        return sum(not task.done() for task in self._added)

    def say(self, text: str) -> None:
        """A typed message: the same engine path as speech, without ASR and TTS (a text-only response)."""
        self._call(self._say, text)

    def talk(self, on: bool) -> None:
        """Push-to-talk: stream the microphone to the server while on."""
        self._call(self._talk, on)

    def set_turn_detection(self, turn_detection: dict) -> None:
        """Ask the server for another turn detection (a session.update); `turn_detection` changes once it confirms."""
        self._call(self._set_turn_detection, turn_detection)

    def start(self, engine: Backend | None, caller: bool | None, on_ready: Callable[[str | None], None]) -> None:
        """Start the link's loop and `run` on it (see `run`)."""
        if self._stopped:  # a quit during start-up
            return
        self._bg = BackgroundLoop("voice-link")
        self._run = self._bg.submit(self.run(engine, caller, on_ready))

    def stop(self) -> None:
        """End `run` (or keep it from starting); safe before, during and after it."""
        self._stopped = True
        if self._bg is not None and self._stop is not None:
            try:
                self._bg.loop.call_soon_threadsafe(self._stop.set)
            except RuntimeError:  # the loop has closed: run has ended
                pass

    def join(self) -> None:
        """After `stop`: wait until `run` has ended and its loop is gone (blocks: call it from a worker)."""
        if self._bg is None:
            return
        if self._run is not None:
            concurrent.futures.wait([self._run])
        self._bg.stop()

    def _call(self, fn: Callable, *args) -> None:
        """Run the coroutine function `fn(*args)` on the link's loop; a failure becomes a note, not a crash."""
        if self._bg is None:
            return

        async def run() -> None:
            try:
                await fn(*args)
            except Exception as e:
                self.post(VoiceStatus(f"{type(e).__name__}: {e}", error=True))

        self._bg.submit(run())

    # ---- on the link's own loop ---------------------------------------------------------------

    async def run(self, engine: Backend | None, caller: bool | None, on_ready: Callable[[str | None], None]) -> None:
        """Start the server (unless remote), connect, and run until `stop()`. `on_ready(error)` is called
        once, when connected or when start-up failed; `caller` None means on when there is no microphone."""
        self._stop = asyncio.Event()
        if self._stopped:  # stopped before the loop got going (a quit during start-up)
            return
        server = services = None
        ready_sent = False
        try:
            if self.url is None:
                server, services = await self._start_server(engine)
                url = server.url
            else:
                url = realtime_url(self.url)
            opened = await asyncio.to_thread(open_devices, asyncio.get_running_loop())
            if isinstance(opened, str):
                self.mic_reason = opened
            else:
                self._devices = opened
            async with RealtimeClient(url) as client:
                self._client, self._url = client, url
                forward = asyncio.create_task(self._forward(client))
                if self._devices is not None:
                    self._mic = asyncio.create_task(self._pump_mic())
                self.post(VoiceStatus(f"connected to {url}" + (f"; no microphone: {self.mic_reason}" if self.mic_reason else "")))
                on_ready(None)
                ready_sent = True
                await self._set_caller(self._devices is None if caller is None else caller)
                await self._stop.wait()
                tasks = [t for t in (self._caller, self._drain, self._mic, forward, *self._added) if t is not None]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        except Exception as e:
            message = f"voice loop: {type(e).__name__}: {e}"
            if ready_sent:
                self.post(VoiceStatus(message, error=True))
            else:
                on_ready(message)
        finally:
            self._client = self._url = None
            if self._added_tts is not None:
                self._added_tts.close()
            if self._devices is not None:
                self._devices.close()
            if server is not None:
                await server.close()
            if services is not None:
                executor = getattr(services.asr(self.asr), "executor", None)  # Whisper decodes on a thread pool
                if executor is not None:
                    executor.shutdown(wait=True)
                services.tts.close()  # its worker process

    async def _start_server(self, engine: Backend):
        self.post(VoiceStatus(f"loading speech recognition ({self.asr}) ..."))
        services = await asyncio.to_thread(make_services, engine, make_tts("espeak"), asr=self.asr)
        server = VoiceServer(services, port=0)  # loopback, any free port
        await server.start()
        return server, services

    # ---- caller, microphone, typed messages -------------------------------------------------------

    async def _set_caller(self, on: bool) -> None:
        if on == self.caller_on or self._client is None:
            return
        self.caller_on = on
        if on:
            await self._cancel(self._drain)
            self._drain = None
            self._caller = asyncio.create_task(self._run_caller())
            self.post(VoiceStatus("simulated caller on"))
        else:
            await self._cancel(self._caller)
            self._caller = None
            self._drain = asyncio.create_task(self._drain_events(self._client))
            self.post(VoiceStatus("simulated caller off"))

    async def _run_caller(self) -> None:
        while True:  # the caller gives up on a turn that gets no reply in time: then it asks the next question
            # the built-in questions, every third with a mid-sentence pause: what cuts a speaker off shows
            await SimulatedCaller(self._client, mixed_questions(), turns=ENDLESS,
                                  turn_timeout_s=CALLER_PATIENCE_S).run(self._on_caller_turn)
            self.post(VoiceStatus(f"the caller got no reply within {CALLER_PATIENCE_S} s", error=True))

    async def _set_added_callers(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"the number of added callers must be >= 0, got {n}")
        if self._url is None:
            raise RuntimeError("the voice loop is not connected")
        async with self._adding:
            if n > len(self._added) and self._added_tts is None:
                self._added_tts = await asyncio.to_thread(EspeakTTS)
            before = len(self._added)
            while len(self._added) < n:
                k = len(self._added) + 1
                self._added.append(asyncio.create_task(self._run_added_caller(k, (k - 1 - before) * STAGGER_S)))
            leaving, self._added = self._added[n:], self._added[:n]
            for task in leaving:  # all at once: each hangs up its own connection
                task.cancel()
            await asyncio.gather(*leaving, return_exceptions=True)
            self.added_callers = n
        self.post(VoiceStatus(f"{n} simulated caller{'s' if n != 1 else ''} added, each on a session of its own"
                              if n else "no added callers"))

    async def _run_added_caller(self, k: int, delay_s: float) -> None:
        """Caller k, until cancelled: it calls again after a turn that got no reply in time; a failed call (the server
        went away) ends it, with a note."""
        questions = mixed_questions(offset=7 * k)  # not in step with the first caller or each other
        while True:
            try:
                await call(self._url, questions, ENDLESS, delay_s=delay_s, tts=self._added_tts, seed=k,
                           turn_timeout_s=CALLER_PATIENCE_S, on_turn=lambda turn: self._on_caller_turn(turn, caller=k))
            except Exception as e:
                self.post(VoiceStatus(f"added caller {k} stopped: {type(e).__name__}: {e}", error=True))
                return
            delay_s = 0.0
            self.post(VoiceStatus(f"added caller {k} got no reply within {CALLER_PATIENCE_S} s", error=True))

    async def _set_turn_detection(self, turn_detection: dict) -> None:
        await self._client.send({"type": "session.update", "session": {"audio": {"input": {
            "turn_detection": turn_detection}}}})

    async def _say(self, text: str) -> None:
        await self._client.send({"type": "conversation.item.create",
                                 "item": {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}})
        await self._client.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
        self.post(UserSaid(text, typed=True))

    async def _talk(self, on: bool) -> None:
        if self._devices is None:
            raise RuntimeError(f"no microphone ({self.mic_reason}); m turns the simulated caller on instead")
        if on and self.caller_on:
            await self._set_caller(False)
        self.talking = on
        self.post(VoiceStatus("talking: speak now" if on else "microphone off"))

    async def _pump_mic(self) -> None:
        """The microphone's blocks go to the server while talking; the others are dropped, not queued."""
        while True:
            block = await self._devices.mic_blocks.get()
            if self.talking:
                await self._client.send_audio(block)

    @staticmethod
    async def _cancel(task: asyncio.Task | None) -> None:
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @staticmethod
    async def _drain_events(client) -> None:
        """Without the caller nobody reads the client's event queue (audio deltas pile up): empty it."""
        while True:
            await client.next_event()

    # ---- what the client hears -> messages -------------------------------------------------------

    async def _forward(self, client) -> None:
        """Turn the client's event log into messages (every 50 ms; the caller owns the client's event queue)."""
        seen = 0
        while True:
            log = client.log
            for _, event in log[seen:]:
                self._on_event(event)
            seen = len(log)
            await asyncio.sleep(0.05)

    def _on_event(self, event: dict) -> None:
        kind = event["type"]
        if kind == "conversation.item.input_audio_transcription.completed":
            self._user_text = event["transcript"]
            self.post(UserSaid(event["transcript"]))
        elif kind == "response.created":
            r = event["response"]
            self._responses[r["id"]] = {"text": "", "typed": r.get("output_modalities") == ["text"], "metrics": None}
        elif kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            if (r := self._responses.get(event["response_id"])) is not None:
                r["text"] += event["delta"]
                self.post(AgentSaid(event["response_id"], r["text"]))
        elif kind == "tradeoff.metrics":
            if (r := self._responses.get(event["response_id"])) is not None:
                r["metrics"] = event
        elif kind == "response.done":
            response = event["response"]
            r = self._responses.pop(response["id"], None)
            if r is None:
                return
            self.post(AgentSaid(response["id"], r["text"], done=True, status=response["status"]))
            # spoken turns of the caller are measured when it reports them (with its own E2E); the rest now
            if r["metrics"] is not None and (r["typed"] or not self.caller_on):
                self.post(TurnMeasured(VoiceTurn.from_metrics(r["metrics"], "" if r["typed"] else self._user_text,
                                                              r["text"], response["status"], typed=r["typed"])))
        elif kind in ("session.created", "session.updated"):
            td, before = event["session"]["audio"]["input"]["turn_detection"], self.turn_detection
            self.turn_detection = td  # before the message, which shows it
            if kind == "session.updated" and td != before:
                self.post(VoiceStatus(f"turn detection: {describe_turn_detection(td)}"))
        elif kind == "error":
            self.post(VoiceStatus(f"server: {event['error'].get('message')}", error=True))

    def _on_caller_turn(self, turn, caller: int = 0) -> None:
        reply = turn.response
        if reply is None or reply.metrics is None:
            return
        self.post(TurnMeasured(VoiceTurn.from_metrics(reply.metrics, turn.transcript or turn.question, reply.transcript,
                                                      reply.status or "?", client_e2e_ms=turn.e2e_ms,
                                                      cut_off=turn.cut_off, caller=caller)))
