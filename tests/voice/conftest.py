"""Shared fixtures for the voice tests: one engine, recognizer and synthesizer for all of them (each takes
seconds to load), a fresh server per test, espeak speech with a noise floor as the spoken input, and `closest`,
which tells which of the known questions a transcript was."""

import numpy as np
import pytest

from engine import Engine
from voice.asr import SphinxASR, WhisperASR
from voice.audio import WIRE_RATE
from voice.caller import MID_PAUSE, speak, spoken_question
from voice.server import VoiceServer
from voice.session import Services
from voice.tts import EspeakTTS
from voice.wer import wer

MAX_TOKENS = 8  # short replies keep the real-time tests short
COMPLETE = "What is the capital of France?"
PAUSED = f"I would like to know{MID_PAUSE}how far away the moon is."
PAUSED_CUT = "I would like to know,"  # PAUSED up to its pause: a sentence cut before its object


def closest(hypothesis: str, candidates: list[str] | tuple[str, ...]) -> str:
    """The candidate with the lowest WER against `hypothesis`: matching against a closed set of sentences."""
    return min(candidates, key=lambda c: wer([c], [hypothesis]))


@pytest.fixture(scope="session")
def engine(default_model):
    e = Engine(default_model)
    yield e
    e.close()


@pytest.fixture(scope="session")
def tts():
    t = EspeakTTS()
    yield t
    t.close()


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


@pytest.fixture
def fresh_tts():
    """An espeak worker that has spoken nothing yet: its audio is the same every run, whatever ran before (see `spoken`)."""
    t = EspeakTTS()
    yield t
    t.close()


@pytest.fixture(scope="session")
def spoken() -> dict:
    """24 kHz espeak speech of the turn tests' sentences (COMPLETE, PAUSED, PAUSED_CUT cut from it), from a worker of
    their own. espeak's output varies a little with what it spoke before (Smart Turn's P(complete) of "If you could,"
    cut at its pause ranged 0.07-0.25 over six orders on one CPU, 0.65-0.88 on another), so a fresh worker speaks them
    first: the same audio every run, whatever ran before. PAUSED_CUT is a cut Smart Turn scored unfinished on the AMD
    EPYC for either pause drawn (0.04-0.05)."""
    fresh = EspeakTTS()
    try:
        spoken = {text: speak(fresh, text) for text in (COMPLETE, PAUSED)}
    finally:
        fresh.close()
    voiced = np.flatnonzero(spoken[PAUSED] != 0)  # the stretched pause is exact silence
    spoken[PAUSED_CUT] = spoken[PAUSED][: voiced[np.flatnonzero(np.diff(voiced) > 0.4 * WIRE_RATE)[0]] + 1]
    return spoken


@pytest.fixture(scope="session")
def say(tts):
    """Question text -> 24 kHz espeak speech with a 30 dB noise floor, as a microphone would record it."""
    return lambda text, seed=0: spoken_question(tts, text, seed)
