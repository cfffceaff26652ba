"""Sound devices through `sounddevice` (PortAudio): a microphone that yields 20 ms pcm blocks and a speaker
that plays reply audio and can be silenced at once (barge-in).

`import sounddevice` raises OSError where PortAudio is missing, and PortAudio without devices raises on
the first query; `open_devices()` turns both into a reason string so the client can fall back to WAV.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np

from voice.audio import WIRE_RATE

BLOCK = WIRE_RATE * 20 // 1000  # 20 ms


class Devices:
    def __init__(self, sd, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.mic_blocks: asyncio.Queue[np.ndarray] = asyncio.Queue()
        self._out = np.zeros(0, np.float32)
        self._lock = threading.Lock()
        self.mic = sd.InputStream(samplerate=WIRE_RATE, channels=1, dtype="float32", blocksize=BLOCK,
                                  callback=self._on_mic)
        self.speaker = sd.OutputStream(samplerate=WIRE_RATE, channels=1, dtype="float32", blocksize=BLOCK,
                                       callback=self._on_speaker)
        self.mic.start()
        self.speaker.start()

    def _on_mic(self, data, frames, time_info, status) -> None:
        self.loop.call_soon_threadsafe(self.mic_blocks.put_nowait, data[:, 0].copy())

    def _on_speaker(self, out, frames, time_info, status) -> None:
        with self._lock:
            n = min(frames, len(self._out))
            out[:n, 0] = self._out[:n]
            out[n:, 0] = 0
            self._out = self._out[n:]

    def play(self, audio: np.ndarray) -> None:
        with self._lock:
            self._out = np.concatenate([self._out, audio])

    def stop_playback(self) -> None:
        with self._lock:
            self._out = np.zeros(0, np.float32)

    def close(self) -> None:
        for stream in (self.mic, self.speaker):
            stream.stop()
            stream.close()


def open_devices(loop: asyncio.AbstractEventLoop) -> Devices | str:
    """Open the default microphone and speaker, or return why not."""
    try:
        import sounddevice as sd
    except OSError as e:  # no PortAudio library
        return f"sounddevice is unavailable ({e})"
    try:
        sd.query_devices(kind="input")
        sd.query_devices(kind="output")
        return Devices(sd, loop)
    except Exception as e:  # PortAudioError (no device), ValueError (no default device)
        return f"no usable audio device ({type(e).__name__}: {e})"
