"""Text to speech backends. Each returns float32 mono audio at the wire rate (24 kHz) for one clause.

- `EspeakTTS` (default): libespeak-ng from the `espeakng-loader` wheel, driven through ctypes in a worker process
  (voice/tts_worker.py), so a fault in the C library costs one response, not the server. It synthesises ~1000x
  faster than real time, so a clause is ready in a few milliseconds.
- `PiperTTS`: a user-supplied Piper voice (`voice.onnx` + `voice.onnx.json`) run by the `piper`
  executable, which reads text on stdin and writes raw 16-bit PCM on stdout.

Voices come from a closed list, checked before anything native sees them: the OpenAI voice names, and for espeak
the installed languages with or without one of the installed variants (`en-us`, `en-us+m3`), as listed once by the
worker. Text is sent as valid UTF-8 in pieces of at most MAX_TEXT_CHARS characters.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from voice.audio import WIRE_RATE, pcm16_to_float, resample

# The OpenAI voice names map onto espeak-ng voice variants, so clients that pick a voice by name work.
OPENAI_VOICES = {
    "alloy": "en-us", "ash": "en-us+m3", "ballad": "en-us+m5", "coral": "en-us+f3", "echo": "en-us+m2",
    "sage": "en-us+f2", "shimmer": "en-us+f4", "verse": "en-us+m4", "marin": "en-us+f5", "cedar": "en-us+m7",
}
DEFAULT_VOICE = "alloy"
MAX_TEXT_CHARS = 2000  # longer text is spoken in pieces cut at spaces (a clause is far shorter)


class TTS(Protocol):
    name: str

    def check_voice(self, voice: str) -> None:
        """Raise ValueError if this backend cannot speak with `voice`."""

    def synthesize(self, text: str, voice: str = DEFAULT_VOICE, speed: float = 1.0, end_pause: bool = True) -> np.ndarray:
        """Speak `text`; `end_pause=False` drops the trailing pause (the clause continues a sentence)."""

    def close(self) -> None:
        """Release what the backend holds (a worker process)."""


class SynthesisError(RuntimeError):
    """The speech synthesizer failed on one piece of text (its worker crashed or hung); the next call starts anew."""


class EspeakTTS:
    """libespeak-ng in a worker process: one synthesis at a time (the library is a process-wide singleton), guarded by
    a lock. A worker that crashes or hangs is replaced on the next call; the call it failed raises SynthesisError."""

    name = "espeak"
    timeout_s = 30.0  # a clause takes milliseconds; a worker silent for this long is stuck

    def __init__(self, words_per_minute: int = 175):
        self.words_per_minute = words_per_minute  # at speed 1.0
        self._lock = threading.Lock()
        self._worker: subprocess.Popen | None = None
        self._buffer = b""
        with self._lock:
            info = self._start()
        self.rate = info["rate"]
        self.languages: frozenset[str] = frozenset(info["voices"])
        self.variants: frozenset[str] = frozenset(info["variants"])

    def _start(self) -> dict:
        self._worker = subprocess.Popen([sys.executable, "-m", "voice.tts_worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
        self._buffer = b""
        return json.loads(self._read_line())

    def _espeak_voice(self, voice: str) -> str:
        return OPENAI_VOICES.get(voice, voice)

    def check_voice(self, voice: str) -> None:
        base, plus, variant = self._espeak_voice(voice).partition("+")
        if base in self.languages and (not plus or variant in self.variants):
            return
        raise ValueError(f"unknown voice {voice!r}: use an OpenAI voice name ({', '.join(sorted(OPENAI_VOICES))}), or an "
                         f"espeak-ng language ({', '.join(sorted(self.languages))}), optionally followed by '+' and a "
                         f"variant ({', '.join(sorted(self.variants))}), as in 'en-us+m3'")

    def synthesize(self, text: str, voice: str = DEFAULT_VOICE, speed: float = 1.0, end_pause: bool = True) -> np.ndarray:
        self.check_voice(voice)
        # valid UTF-8 with no NUL (espeak reads a C string), in pieces of bounded size
        text = text.encode("utf-8", "replace").decode("utf-8").replace("\0", " ")
        pieces = _pieces(text, MAX_TEXT_CHARS)
        audio = [self._speak(piece, self._espeak_voice(voice), speed, end_pause and i == len(pieces) - 1)
                 for i, piece in enumerate(pieces)]
        return resample(np.concatenate(audio) if audio else np.zeros(0, np.float32), self.rate, WIRE_RATE)

    def _speak(self, text: str, voice: str, speed: float, end_pause: bool) -> np.ndarray:
        request = {"text": text, "voice": voice, "speed": speed, "words_per_minute": self.words_per_minute,
                   "end_pause": end_pause}
        with self._lock:
            try:
                if self._worker is None or self._worker.poll() is not None:
                    self._start()
                self._worker.stdin.write(json.dumps(request).encode() + b"\n")
                self._worker.stdin.flush()
                reply = json.loads(self._read_line())
                if "error" in reply:
                    raise ValueError(reply["error"])
                pcm = self._read(2 * reply["samples"])
            except (OSError, SynthesisError) as e:
                self._stop()
                raise SynthesisError(f"the espeak-ng worker failed on this text ({e}); it is restarted for the next") from None
        return pcm16_to_float(pcm)

    def _read_line(self) -> bytes:
        while b"\n" not in self._buffer:
            self._fill()
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def _read(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._fill()
        data, self._buffer = self._buffer[:n], self._buffer[n:]
        return data

    def _fill(self) -> None:
        """More bytes from the worker, or SynthesisError if it has exited or says nothing for `timeout_s`."""
        fd = self._worker.stdout.fileno()
        deadline = time.monotonic() + self.timeout_s
        while not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
            if time.monotonic() >= deadline:
                raise SynthesisError(f"no answer in {self.timeout_s:.0f} s")
        data = os.read(fd, 1 << 16)
        if not data:
            raise SynthesisError(f"it exited with code {self._worker.wait()}")
        self._buffer += data

    def _stop(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.wait()
            for pipe in (self._worker.stdin, self._worker.stdout):
                pipe.close()
            self._worker = None

    def close(self) -> None:
        """End the worker (it also ends by itself when this process exits: its stdin closes)."""
        with self._lock:
            self._stop()


def _pieces(text: str, limit: int) -> list[str]:
    """`text` cut into pieces of at most `limit` characters, at the last space before the limit where there is one."""
    pieces = []
    while len(text) > limit:
        cut = text.rfind(" ", 0, limit + 1)
        cut = cut if cut > 0 else limit
        pieces.append(text[:cut])
        text = text[cut:].lstrip(" ")
    return pieces + [text] if text else pieces


class PiperTTS:
    """A Piper voice model the user supplies; runs `piper --output-raw` once per clause."""

    name = "piper"

    def __init__(self, model: str | Path, executable: str = "piper"):
        self.model = Path(model).expanduser()
        config = Path(str(self.model) + ".json")
        if not self.model.is_file() or not config.is_file():
            raise FileNotFoundError(f"Piper needs {self.model} and {config}")
        self.rate = int(json.loads(config.read_text())["audio"]["sample_rate"])
        self.executable = shutil.which(executable)
        if self.executable is None:
            raise FileNotFoundError(f"{executable!r} not found on PATH (pip install piper-tts)")

    def check_voice(self, voice: str) -> None:
        """The voice is the model file; every OpenAI voice name maps onto it, and no other name is taken."""
        if voice not in OPENAI_VOICES:
            raise ValueError(f"unknown voice {voice!r}: this server speaks with one Piper voice; name it by one of "
                             f"the OpenAI voice names: {', '.join(sorted(OPENAI_VOICES))}")

    def synthesize(self, text: str, voice: str = DEFAULT_VOICE, speed: float = 1.0, end_pause: bool = True) -> np.ndarray:
        cmd = [self.executable, "--model", str(self.model), "--output-raw", "--length_scale", f"{1 / speed:.3f}"]
        out = subprocess.run(cmd, input=text.encode("utf-8", "replace"), capture_output=True, check=True)
        return resample(pcm16_to_float(out.stdout), self.rate, WIRE_RATE)

    def close(self) -> None:
        """Nothing to release: each clause runs its own `piper`."""


def make_tts(name: str, piper_model: str | None = None) -> TTS:
    if name == "espeak":
        return EspeakTTS()
    if name == "piper":
        if not piper_model:
            raise ValueError("the piper backend needs --piper-model PATH/voice.onnx")
        return PiperTTS(piper_model)
    raise ValueError(f"unknown TTS backend {name!r}: espeak or piper")
