"""Shared fixtures for the voice tests: one engine, recognizer and synthesizer for all of them (each takes
seconds to load), a fresh server per test, and espeak speech with a noise floor as the spoken input."""

import pytest

from engine import Engine
from voice.asr import SphinxASR, WhisperASR
from voice.caller import spoken_question
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
    """Question text -> 24 kHz espeak speech with a 30 dB noise floor, as a microphone would record it."""
    return lambda text, seed=0: spoken_question(tts, text, seed)
