"""Turn-taking, as its own object: a `TurnDetector` consumes a session's input audio (16 kHz) and emits typed turn
events (speech started, paused, resumed, turn ended, with sample positions); the session only reacts to them.

Two policies, as OpenAI's Realtime API names them. `server_vad`: Silero finds speech (voice/vad.py), and a silence of
`silence_duration_ms` ends the turn. `semantic_vad`: Silero finds speech and pauses, and two turn models judge each
pause: the LLM reads its transcript (voice/text_turn.py, as soon as the transcript is ready), and Smart Turn hears the
audio (voice/smart_turn.py) once the pause has lasted JUDGE_AFTER_MS (the detector's `PauseToJudge`) and the LLM's
reading has not ended the turn. The session ends the turn as soon as P(complete) reaches the eagerness's threshold:
the LLM's alone until Smart Turn has judged, then both `combined`. Otherwise the turn goes on until the user speaks
again or the eagerness's longest wait (8 / 4 / 2 s for low / medium / high, the API's documented maxima) has passed in
silence. Either way a pause (the first silent chunk) comes first, so the session can transcribe and draft a reply
meanwhile. A turn also ends when it outgrows the input buffer, or when the client commits it.

The detector keeps the last few seconds of audio (the utterance's prefix padding and the recognizer's input are
cut from it) and when each chunk arrived, so a turn's end is dated to when the client sent its last speech,
not to when the silence after it was noticed.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass

import numpy as np

from voice.audio import ASR_RATE
from voice.protocol import TurnDetection
from voice.vad import SileroVAD

HISTORY_S = 8  # audio kept: the turn model's window (8 s), and any prefix_padding_ms before speech
JUDGE_AFTER_MS = 200  # semantic_vad: the pause a judgment waits for (see EAGERNESS)
# semantic_vad's eagerness -> (P(complete) that ends the turn at a pause, the longest silence it waits). The thresholds
# were chosen for Smart Turn alone; read by the LLM, 16 sentences cut at a mid-sentence pause scored at most 0.07 and
# 43 of 48 complete questions at least 0.32, the rest misheard (bench/RESULTS.md), so they hold for its judgments too.
EAGERNESS = {"high": (0.3, 2000), "medium": (0.5, 4000), "low": (0.7, 8000)}
EAGERNESS["auto"] = EAGERNESS["medium"]


@dataclass(frozen=True)
class SpeechStarted:
    start: int  # first sample of the utterance, its prefix padding included


@dataclass(frozen=True)
class SpeechPaused:
    at: int  # where the speech last was


@dataclass(frozen=True)
class SpeechResumed:
    at: int


@dataclass(frozen=True)
class PauseToJudge:
    """semantic_vad: the pause has lasted JUDGE_AFTER_MS; the turn model should judge the utterance so far."""


@dataclass(frozen=True)
class TurnEnded:
    end: int  # where the speech ended
    sent_at: float  # when the client sent the audio holding that sample (time.monotonic())
    reason: str  # silence | semantic | too_long | commit


TurnEvent = SpeechStarted | SpeechPaused | PauseToJudge | SpeechResumed | TurnEnded


def end_silence_ms(config: TurnDetection) -> int:
    """The silence that ends a turn whatever else happens: server_vad's duration, semantic_vad's longest wait."""
    return EAGERNESS[config.eagerness][1] if config.semantic else config.silence_duration_ms


def complete_enough(config: TurnDetection, probability: float) -> bool:
    """semantic_vad: does this P(complete) end the turn at this pause?"""
    return probability >= EAGERNESS[config.eagerness][0]


def combined(text: float, audio: float) -> float:
    """P(complete) from both turn models at one pause, as independent evidence: their log-odds add. Each alone is
    wrong in its own way (Smart Turn hears "I was wondering," as complete; the LLM reads a misheard question as an
    unfinished statement), and one that is sure outweighs one that is unsure."""
    logit = sum(math.log(p / (1 - p)) for p in (min(max(q, 1e-4), 1 - 1e-4) for q in (text, audio)))
    return 1 / (1 + math.exp(-logit))


class TurnDetector:
    def __init__(self, config: TurnDetection, max_turn_s: float):
        self.config = config
        self.max_turn_s = max_turn_s
        self.vad = SileroVAD(config.threshold, end_silence_ms(config))
        self.received = 0  # samples received so far
        self.history = np.zeros(0, np.float32)  # the last HISTORY_S of audio, ending at `received`
        self.arrivals: list[tuple[int, float]] = []  # (samples received after a chunk, when it arrived)
        self.start: int | None = None  # first sample of the current utterance (None: no turn under way)
        self.judged = False  # semantic_vad: the current pause has been handed over for judgment

    @property
    def in_turn(self) -> bool:
        return self.start is not None

    @property
    def paused(self) -> bool:
        """The user went silent and has not resumed (the turn may still end or go on)."""
        return self.vad.pause_at is not None

    def configure(self, config: TurnDetection) -> None:
        """New parameters; the current utterance is forgotten."""
        self.config = config
        self.vad.configure(config.threshold, end_silence_ms(config))
        self.reset()

    def reset(self) -> None:
        """Forget the current utterance (the sample count goes on: it indexes the session's audio)."""
        self.vad.reset()
        self.start = None

    def feed(self, chunk: np.ndarray, arrived: float) -> list[TurnEvent]:
        """The next chunk of input audio, which arrived at `arrived`; returns the turn events it caused, in order."""
        self.received += len(chunk)
        self.arrivals.append((self.received, arrived))
        if len(self.arrivals) > 4096:  # only the current turn's chunks are ever looked up
            del self.arrivals[:2048]
        self.history = np.concatenate([self.history, chunk])[-HISTORY_S * ASR_RATE:]
        events: list[TurnEvent] = []
        for ev in self.vad.process(chunk):
            if ev.kind == "start":
                padding = self.config.prefix_padding_ms * ASR_RATE // 1000
                self.start = max(ev.sample - padding, self.received - len(self.history), 0)
                events.append(SpeechStarted(self.start))
            elif self.start is None:
                continue
            elif ev.kind == "pause":
                self.judged = False
                events.append(SpeechPaused(ev.sample))
            elif ev.kind == "resume":
                events.append(SpeechResumed(ev.sample))
            elif ev.kind == "end":
                events.append(self._ended(ev.sample, "silence"))
        if (self.config.semantic and self.start is not None and self.paused and not self.judged
                and self.vad.samples - self.vad.speech_end >= JUDGE_AFTER_MS * ASR_RATE // 1000):
            self.judged = True
            events.append(PauseToJudge())
        if self.start is not None and (self.received - self.start) / ASR_RATE > self.max_turn_s:
            events.append(self.end_turn("too_long"))
        return events

    def end_turn(self, reason: str = "commit") -> TurnEnded:
        """End the turn under way now (a commit, a judgment, or one that outgrew the buffer), where the speech last was."""
        if self.start is None:
            raise RuntimeError("no turn under way")
        end = self.vad.speech_end
        if self.vad.speaking:
            self.vad.reset()
        return self._ended(end, reason)

    def audio(self, start: int) -> np.ndarray:
        """The audio from sample `start` (at most HISTORY_S back) to the latest received."""
        return self.history[max(0, len(self.history) - (self.received - start)):]

    def _ended(self, end: int, reason: str) -> TurnEnded:
        self.start = None
        return TurnEnded(end, self._sent_time(end), reason)

    def _sent_time(self, sample: int) -> float:
        """When the client sent the chunk holding `sample`, for a client that streams in real time (as a
        microphone does). Each later chunk's arrival bounds it from above (arrival minus the audio in
        between); the tightest bound wins, so a moment when this loop was starved does not make it late."""
        i = min(bisect_left(self.arrivals, (sample + 1, 0.0)), len(self.arrivals) - 1)
        end = self.arrivals[i][0]
        return min(t - (n - end) / ASR_RATE for n, t in self.arrivals[i:])
