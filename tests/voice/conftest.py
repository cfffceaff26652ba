"""Shared fixtures for the voice tests: one engine, recognizer and synthesizer for all of them (each takes
seconds to load), a fresh server per test, and espeak speech with a noise floor as the spoken input."""

import numpy as np
import pytest

from engine import Engine
from voice.asr import SphinxASR, WhisperASR
from voice.audio import WIRE_RATE, with_noise_floor
from voice.caller import speak
from voice.server import VoiceServer
from voice.session import Services
from voice.tts import EspeakTTS

MAX_TOKENS = 8  # short replies keep the real-time tests short


@pytest.fixture(scope="session")
def engine(default_model):
    e = Engine(default_model)
    yield e
    e.close()


@pytest.fixture(scope="session")
def tts():
    return EspeakTTS()


@pytest.fixture(scope="session")
def whisper():
    return WhisperASR()


@pytest.fixture(scope="session")
def services(engine, tts, whisper):
    backends = {"whisper": whisper, "pocketsphinx": SphinxASR()}
    return Services(engine=engine, tts=tts, asr=backends.__getitem__, max_output_tokens=MAX_TOKENS)


@pytest.fixture
async def server(services):
    async with VoiceServer(services, port=0) as s:
        yield s


@pytest.fixture(scope="session")
def say(tts):
    """Question text -> 24 kHz espeak speech with a 30 dB noise floor (and 0.3 s of lead-in)."""

    def make(text: str, seed: int = 0) -> np.ndarray:
        speech = np.concatenate([np.zeros(WIRE_RATE * 3 // 10, np.float32), speak(tts, text)])
        return with_noise_floor(speech, 30.0, seed)

    return make
