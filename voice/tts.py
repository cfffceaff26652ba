"""Text to speech backends. Each returns float32 mono audio at the wire rate (24 kHz) for one clause.

- `EspeakTTS` (default): libespeak-ng from the `espeakng-loader` wheel, driven through ctypes. It
  synthesises ~1000x faster than real time, so a clause is ready in a few milliseconds.
- `PiperTTS`: a user-supplied Piper voice (`voice.onnx` + `voice.onnx.json`) run by the `piper`
  executable, which reads text on stdin and writes raw 16-bit PCM on stdout.
"""

from __future__ import annotations

import ctypes
import json
import shutil
import subprocess
import threading
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


class TTS(Protocol):
    name: str

    def check_voice(self, voice: str) -> None:
        """Raise ValueError if this backend cannot speak with `voice`."""

    def synthesize(self, text: str, voice: str = DEFAULT_VOICE, speed: float = 1.0, end_pause: bool = True) -> np.ndarray:
        """Speak `text`; `end_pause=False` drops the trailing pause (the clause continues a sentence)."""


# espeak-ng's speak_lib.h
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_CHARS_UTF8 = 1
_ENDPAUSE = 0x1000
_POS_CHARACTER = 1
_RATE = 1
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class EspeakTTS:
    """libespeak-ng is a process-wide singleton: one synthesis at a time, guarded by a lock."""

    name = "espeak"
    _lock = threading.Lock()
    _lib: ctypes.CDLL | None = None
    _rate = 0

    def __init__(self, words_per_minute: int = 175):
        self.words_per_minute = words_per_minute  # at speed 1.0
        with self._lock:
            if EspeakTTS._lib is None:
                EspeakTTS._lib, EspeakTTS._rate = self._load()
        self._chunks: list[np.ndarray] = []
        self._callback = _SYNTH_CALLBACK(self._on_audio)  # keep a reference: ctypes must not collect it

    @staticmethod
    def _load() -> tuple[ctypes.CDLL, int]:
        import espeakng_loader

        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.restype = ctypes.c_int
        data_parent = str(Path(espeakng_loader.get_data_path()).parent).encode()
        rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_parent, _INITIALIZE_DONT_EXIT)
        if rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise (data in {data_parent.decode()})")
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int, ctypes.c_uint,
                                     ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        return lib, rate

    def _on_audio(self, wav, n: int, events) -> int:
        if wav and n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).astype(np.float32) / 32768.0)
        return 0

    def _espeak_voice(self, voice: str) -> str:
        return OPENAI_VOICES.get(voice, voice)

    def check_voice(self, voice: str) -> None:
        with self._lock:
            self._select(voice)

    def _select(self, voice: str, speed: float = 1.0) -> None:
        name = self._espeak_voice(voice)
        if self._lib.espeak_SetVoiceByName(name.encode()) != 0:
            raise ValueError(f"unknown voice {voice!r}: use one of {sorted(OPENAI_VOICES)} or an espeak-ng voice name")
        self._lib.espeak_SetParameter(_RATE, round(self.words_per_minute * speed), 0)

    def synthesize(self, text: str, voice: str = DEFAULT_VOICE, speed: float = 1.0, end_pause: bool = True) -> np.ndarray:
        data = text.encode("utf-8") + b"\0"
        with self._lock:
            self._select(voice, speed)  # every call: another session may have switched the shared library's voice
            self._chunks = []
            self._lib.espeak_SetSynthCallback(self._callback)
            flags = _CHARS_UTF8 | (_ENDPAUSE if end_pause else 0)
            self._lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, flags, None, None)
            audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32)
        return resample(audio, self._rate, WIRE_RATE)


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
        """The voice is the model file; every OpenAI voice name maps onto it."""

    def synthesize(self, text: str, voice: str = DEFAULT_VOICE, speed: float = 1.0, end_pause: bool = True) -> np.ndarray:
        cmd = [self.executable, "--model", str(self.model), "--output-raw", "--length_scale", f"{1 / speed:.3f}"]
        out = subprocess.run(cmd, input=text.encode(), capture_output=True, check=True)
        return resample(pcm16_to_float(out.stdout), self.rate, WIRE_RATE)


def make_tts(name: str, piper_model: str | None = None) -> TTS:
    if name == "espeak":
        return EspeakTTS()
    if name == "piper":
        if not piper_model:
            raise ValueError("the piper backend needs --piper-model PATH/voice.onnx")
        return PiperTTS(piper_model)
    raise ValueError(f"unknown TTS backend {name!r}: espeak or piper")
