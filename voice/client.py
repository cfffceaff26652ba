"""The realtime client: sends 20 ms pcm16 frames, plays the reply audio, and measures latency itself.

Playback runs on a clock of its own (the audio plays from the moment it arrives, back to back), so the
client knows when audio is heard even with no speaker. A device, if there is one, plays the same audio.
On `input_audio_buffer.speech_started` the client stops playback at once and drops the rest of that
response's audio, as a real client must. Everything sent and heard is recorded, so `save()` writes the
conversation as a stereo WAV (left: the user, right: the agent).

Latency as the user experiences it: from the moment the frame holding the last speech sample was sent
(`mark_speech_end`) to the first reply audio received; and for barge-in, from the first sent frame of
new speech (`mark_speech_start`) to the moment the agent's audio stopped playing.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from voice.audio import WIRE_RATE, b64_to_pcm16, float_to_pcm16, pcm16_to_b64, pcm16_to_float
from voice.sound import Devices


@dataclass
class Heard:
    """One response as the client saw it."""

    id: str
    created_at: float
    first_audio_at: float | None = None
    last_audio_at: float | None = None
    audio_samples: int = 0
    transcript: str = ""
    status: str | None = None
    done_at: float | None = None
    metrics: dict | None = None  # the server's tradeoff.metrics payload
    interrupted_at: float | None = None  # speech_started arrived while this response was current
    playback_stopped_at: float | None = None  # when its audio stopped playing because of the interruption
    late_deltas: int = 0  # audio deltas that arrived after the interruption (a correct server sends none)


@dataclass
class Recording:
    sent: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (time, frame)
    heard: list[tuple[float, np.ndarray]] = field(default_factory=list)  # (playback start time, audio)


class RealtimeClient:
    def __init__(self, url: str, token: str | None = None, devices: Devices | None = None):
        self.url, self.token, self.devices = url, token, devices
        self.ws: ClientConnection | None = None
        self.events: asyncio.Queue[tuple[float, dict]] = asyncio.Queue()  # (receive time, event), for the caller
        self.log: list[tuple[float, dict]] = []  # every event except audio deltas
        self.responses: list[Heard] = []
        self.session: dict | None = None
        self.play_end = 0.0  # when everything received so far will have finished playing
        self.recording = Recording()
        self.started = time.monotonic()
        self._receiver: asyncio.Task | None = None

    async def __aenter__(self) -> RealtimeClient:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.ws = await connect(self.url, additional_headers=headers, max_size=None, compression=None)
        self._receiver = asyncio.create_task(self._receive())
        try:
            while True:
                _, event = await self.next_event()
                if event["type"] == "session.created":
                    self.session = event["session"]
                    return self
                if event["type"] == "client.closed":
                    raise ConnectionError(f"{self.url} closed the connection before session.created")
        except BaseException:  # cancelled (or failed) before the session began: hang up, or the connection outlives us
            await self.__aexit__()
            raise

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        if self._receiver is not None:
            await asyncio.wait([self._receiver])

    @property
    def current(self) -> Heard | None:
        return self.responses[-1] if self.responses else None

    @property
    def playing(self) -> bool:
        return time.monotonic() < self.play_end

    # ---- sending ----------------------------------------------------------------------------

    async def send(self, event: dict) -> None:
        await self.ws.send(json.dumps(event))

    async def send_audio(self, frame: np.ndarray) -> float:
        """Send one frame of 24 kHz float audio; return when it was sent."""
        await self.send({"type": "input_audio_buffer.append", "audio": pcm16_to_b64(float_to_pcm16(frame))})
        now = time.monotonic()
        self.recording.sent.append((now, frame))
        return now

    # ---- receiving --------------------------------------------------------------------------

    async def next_event(self, timeout: float | None = None) -> tuple[float, dict]:
        # asyncio.timeout where there is one (3.11+): wait_for loses a cancel that lands as it times out (it raises
        # TimeoutError instead), and a caller polling every 20 ms then runs on after it was stopped
        if sys.version_info < (3, 11):
            return await asyncio.wait_for(self.events.get(), timeout)
        async with asyncio.timeout(timeout):
            return await self.events.get()

    async def _receive(self) -> None:
        """Read events until the connection closes (`client.closed` ends the queue; ws.close_code says why)."""
        try:
            async for message in self.ws:
                now = time.monotonic()
                event = json.loads(message)
                self._on_event(now, event)
                if event["type"] != "response.output_audio.delta":
                    self.log.append((now, event))
                self.events.put_nowait((now, event))
        except ConnectionClosed:
            pass
        finally:
            self.events.put_nowait((time.monotonic(), {"type": "client.closed"}))

    def _on_event(self, now: float, event: dict) -> None:
        kind = event["type"]
        heard = self.current
        if kind == "response.created":
            self.responses.append(Heard(event["response"]["id"], now))
        elif kind == "response.output_audio.delta" and heard is not None:
            if heard.interrupted_at is not None:
                heard.late_deltas += 1
                return
            audio = pcm16_to_float(b64_to_pcm16(event["delta"]))
            if heard.first_audio_at is None:
                heard.first_audio_at = now
            heard.last_audio_at = now
            heard.audio_samples += len(audio)
            start = max(now, self.play_end)
            self.play_end = start + len(audio) / WIRE_RATE
            self.recording.heard.append((start, audio))
            if self.devices is not None:
                self.devices.play(audio)
        elif kind == "response.output_audio_transcript.delta" and heard is not None:
            heard.transcript += event["delta"]
        elif kind == "input_audio_buffer.speech_started":
            self._stop_playback(now)
        elif kind == "tradeoff.metrics" and heard is not None and event.get("response_id") == heard.id:
            heard.metrics = event
        elif kind == "response.done" and heard is not None:
            heard.status = event["response"]["status"]
            heard.done_at = now

    def _stop_playback(self, now: float) -> None:
        heard = self.current
        if heard is not None and heard.done_at is None and heard.interrupted_at is None:
            heard.interrupted_at = now
            heard.playback_stopped_at = min(self.play_end, now)
        if self.play_end > now:
            self._cut_recording(now)
            self.play_end = now
        if self.devices is not None:
            self.devices.stop_playback()

    def _cut_recording(self, now: float) -> None:
        kept = []
        for start, audio in self.recording.heard:
            if start < now:
                kept.append((start, audio[: int((now - start) * WIRE_RATE)]))
        self.recording.heard = kept

    # ---- output -----------------------------------------------------------------------------

    def save(self, path: str | Path) -> Path:
        """Write the conversation as heard: a stereo 24 kHz WAV, user left, agent right."""
        import soundfile

        tracks = [self.recording.sent, self.recording.heard]
        end = max((t + len(a) / WIRE_RATE for track in tracks for t, a in track), default=self.started)
        out = np.zeros((int((end - self.started) * WIRE_RATE) + 1, 2), np.float32)
        for channel, track in enumerate(tracks):
            for t, audio in track:
                i = int((t - self.started) * WIRE_RATE)
                out[i: i + len(audio), channel] = audio[: len(out) - i]
        path = Path(path)
        soundfile.write(path, out, WIRE_RATE, subtype="PCM_16")
        return path
