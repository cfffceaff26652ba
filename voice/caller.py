"""The simulated caller: speaks built-in questions (espeak plus a noise floor) through the real audio path,
in real time, waits for each reply, and barges in on some of them.

The microphone never stops: every 20 ms it sends a frame, of speech when there is some queued and of
the noise floor otherwise, as a real microphone would. This is how the loop runs and is measured on a
machine with no microphone (`tradeoff talk --simulate`, `tradeoff bench voice`, the dashboard).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from voice.audio import WIRE_RATE, frame_energies, trim_to_voice, with_noise_floor
from voice.client import Heard, RealtimeClient
from voice.tts import EspeakTTS
from voice.wer import wer

FRAME = WIRE_RATE * 20 // 1000
STAGGER_S = 0.9  # callers that start together connect this far apart, as real ones would not call in unison

QUESTIONS = (
    "What is the capital of France?",
    "How many legs does a spider have?",
    "What color is the sky on a clear day?",
    "Can you recommend a good book to read?",
    "What is the boiling point of water?",
    "How far away is the moon?",
    "Who wrote Romeo and Juliet?",
    "What is the largest ocean on Earth?",
    "Give me a tip for sleeping better.",
    "Why do leaves change color in autumn?",
    "What is the tallest mountain in the world?",
    "How do bees make honey?",
    "What should I cook for dinner tonight?",
    "Tell me a fun fact about octopuses.",
    "How many days are there in a leap year?",
    "What is the speed of light?",
    "Which planet is closest to the sun?",
    "How do I make a cup of tea?",
    "What is the main ingredient in guacamole?",
    "Why is the ocean salty?",
    "What language do people speak in Brazil?",
    "How long does it take to boil an egg?",
    "What is photosynthesis?",
    "Name three animals that live in the desert.",
)


# Utterances with a mid-sentence pause (MID_PAUSE marks it): a turn detector that ends the turn at the pause cuts
# the speaker off. Spoken as one sentence with a comma there, so the words before the pause keep the intonation
# of a sentence that goes on, and the comma's short pause is stretched to 0.5-0.7 s.
MID_PAUSE = " ... "
PAUSED_QUESTIONS = (
    "I would like to know ... how far away the moon is.",
    "I want to book a table ... for four people.",
    "If you could ... tell me a joke.",
    "Could you tell me ... what the weather is like?",
    "So what I need is ... a recipe for dinner.",
    "Can you remind me ... how many days there are in a leap year?",
    "I was wondering ... how bees make honey.",
    "My favourite animal ... is the octopus.",
)
PAUSE_S = (0.5, 0.7)


def speak(tts: EspeakTTS, text: str, voice: str = "en-us", seed: int = 0) -> np.ndarray:
    """espeak speech for `text`, trimmed to where the voice starts and stops (24 kHz); a MID_PAUSE in `text` becomes a
    pause of 0.5-0.7 s (drawn from `seed`)."""
    if MID_PAUSE not in text:
        return trim_to_voice(tts.synthesize(text, voice))
    speech = trim_to_voice(tts.synthesize(text.replace(MID_PAUSE, ", ", 1), voice))
    pause_s = np.random.default_rng(seed).uniform(*PAUSE_S)
    return stretch_first_pause(speech, pause_s)


def stretch_first_pause(speech: np.ndarray, pause_s: float, rate: int = WIRE_RATE, min_gap_s: float = 0.08) -> np.ndarray:
    """`speech` with its first silent gap of at least `min_gap_s` (10 ms frames 40 dB below the loudest) replaced by
    `pause_s` of silence."""
    frame = rate // 100
    energy = frame_energies(speech, rate)
    quiet = energy < energy.max() * 1e-4
    run = 0
    for i, q in enumerate(quiet):
        run = run + 1 if q else 0
        if run * frame >= min_gap_s * rate and i + 1 < len(quiet) and not quiet[i + 1]:
            start, end = (i + 1 - run) * frame, (i + 1) * frame
            return np.concatenate([speech[:start], np.zeros(int(pause_s * rate), np.float32), speech[end:]])
    raise ValueError("no pause found in the speech to stretch")


def mixed_questions(turns: int = len(QUESTIONS), paused_every: int = 3, offset: int = 0) -> tuple[str, ...]:
    """`turns` questions, the built-in ones in order with every `paused_every`-th one from PAUSED_QUESTIONS (0: none),
    from position `offset` of that sequence on (callers at once each start elsewhere, so they do not ask in unison)."""
    plain, paused = itertools.cycle(QUESTIONS), itertools.cycle(PAUSED_QUESTIONS)
    return tuple(next(paused) if paused_every and i % paused_every == paused_every - 1 else next(plain)
                 for i in range(offset + turns))[offset:]


def spoken_text(question: str) -> str:
    """What a question says, its pause marker removed (the reference for WER)."""
    return question.replace(MID_PAUSE, " ")


def spoken_question(tts: EspeakTTS, text: str, seed: int = 0, snr_db: float = 30.0, lead_s: float = 0.3,
                    tail_s: float = 0.5) -> np.ndarray:
    """A question as a microphone would record it: silence, speech, silence, all over a noise floor (24 kHz)."""
    pad = [np.zeros(int(s * WIRE_RATE), np.float32) for s in (lead_s, tail_s)]
    return with_noise_floor(np.concatenate([pad[0], speak(tts, text), pad[1]]), snr_db, seed)


@dataclass
class Turn:
    question: str
    speech_start: float | None = None  # when the frame with the first speech sample was sent
    speech_end: float | None = None  # ... and the frame with the last one
    transcript: str | None = None  # what the server heard
    response: Heard | None = None
    barge_in: bool = False  # this question was spoken over the previous reply
    barge_in_stop_ms: float | None = None  # how long the interrupted reply kept playing after we started speaking
    cut_off: bool = False  # the server ended the turn before the caller had finished speaking
    seed: int = 0  # draws the length of a mid-sentence pause

    @property
    def e2e_ms(self) -> float | None:
        if self.response is None or self.response.first_audio_at is None or self.speech_end is None:
            return None
        return (self.response.first_audio_at - self.speech_end) * 1000

    @property
    def wer(self) -> float | None:
        return None if self.transcript is None else wer([spoken_text(self.question)], [self.transcript])


class Microphone:
    """Sends a frame every 20 ms on a fixed schedule: queued speech, else the noise floor."""

    def __init__(self, client: RealtimeClient, noise_level: float, seed: int):
        self.client = client
        self.noise_level = noise_level
        self.rng = np.random.default_rng(seed)
        self.queue: list[tuple[np.ndarray, Turn]] = []
        self.position = 0  # samples of the head utterance already sent
        self.task: asyncio.Task | None = None

    def say(self, speech: np.ndarray, turn: Turn) -> None:
        self.queue.append((speech, turn))

    def queued(self, turn: Turn) -> bool:
        return any(t is turn for _, t in self.queue)

    @property
    def speaking(self) -> bool:
        return bool(self.queue)

    async def run(self) -> None:
        start = time.monotonic()
        for k in itertools.count():
            frame = self.rng.standard_normal(FRAME).astype(np.float32) * self.noise_level
            starts = ends = None
            if self.queue:
                speech, turn = self.queue[0]
                piece = speech[self.position: self.position + FRAME]
                frame[: len(piece)] += piece
                starts = turn if self.position == 0 else None
                self.position += FRAME
                if self.position >= len(speech):
                    ends = turn
                    self.queue.pop(0)
                    self.position = 0
            sent = await self.client.send_audio(frame)
            if starts is not None:
                starts.speech_start = sent
            if ends is not None:
                ends.speech_end = sent
            await asyncio.sleep(max(0.0, start + (k + 1) * FRAME / WIRE_RATE - time.monotonic()))


class SimulatedCaller:
    def __init__(self, client: RealtimeClient, questions: tuple[str, ...] = QUESTIONS, turns: int | None = None,
                 barge_in_every: int = 0, barge_in_after_ms: float = 600, snr_db: float = 30.0, gap_ms: float = 500,
                 turn_timeout_s: float = 30.0, seed: int = 0, tts: EspeakTTS | None = None):
        self.client = client
        self.questions = questions
        self.turns = turns or len(questions)  # asked in order, round and round
        self.barge_in_every = barge_in_every  # every n-th question interrupts the reply before it (0 = never)
        self.barge_in_after = barge_in_after_ms / 1000
        self.gap = gap_ms / 1000
        self.turn_timeout = turn_timeout_s
        self._own_tts = tts is None  # a caller of many shares one (each has a worker process); its own ends with run()
        self.tts = tts or EspeakTTS()
        reference = speak(self.tts, questions[0])
        speech_rms = float(np.sqrt(np.mean(reference**2)))
        self.mic = Microphone(client, speech_rms * 10 ** (-snr_db / 20), seed)

    def _make_turn(self, i: int) -> Turn | None:
        if i >= self.turns:
            return None
        return Turn(self.questions[i % len(self.questions)],
                    barge_in=self.barge_in_every > 0 and i > 0 and i % self.barge_in_every == 0, seed=i)

    async def run(self, on_turn: Callable[[Turn], None] | None = None) -> list[Turn]:
        """Ask the questions; return the turns that got a reply (all of them unless one timed out)."""
        answered: list[Turn] = []
        self.mic.task = asyncio.create_task(self.mic.run())
        try:
            await wait_for(self.client, lambda: False, 0.5)  # the noise floor alone first, as when a call connects
            turn = self._make_turn(0)
            for i in itertools.count(1):
                following = self._make_turn(i)  # needed now: it may be spoken over this turn's reply
                if turn is None or not await self._turn(turn, following):
                    break
                answered.append(turn)
                if on_turn:
                    on_turn(turn)
                turn = following
        finally:
            self.mic.task.cancel()
            await asyncio.wait([self.mic.task])
            if self._own_tts:
                self.tts.close()
        return answered

    async def _turn(self, turn: Turn, following: Turn | None) -> bool:
        """Ask `turn`'s question (unless it was already spoken over the last reply) and wait for the reply."""
        if turn.speech_start is None and not self.mic.queued(turn):
            self.mic.say(await self._speech(turn), turn)
        await wait_for(self.client, lambda: turn.speech_end is not None, self.turn_timeout)
        turn.cut_off = any(turn.speech_start <= at < turn.speech_end and e["type"] == "input_audio_buffer.committed"
                           for at, e in self.client.log) if turn.speech_end is not None else False
        if not await wait_for(self.client, lambda: self._response_after(turn) is not None, self.turn_timeout):
            return False
        reply = turn.response = self._response_after(turn)
        if following is not None and following.barge_in:
            await wait_for(self.client, lambda: reply.first_audio_at is not None, self.turn_timeout)
            await wait_for(self.client, lambda: False, self.barge_in_after)
            self.mic.say(await self._speech(following), following)
            await wait_for(self.client, lambda: reply.done_at is not None, self.turn_timeout)
            await wait_for(self.client, lambda: following.speech_start is not None, self.turn_timeout)
            stopped = reply.playback_stopped_at
            if stopped is not None and following.speech_start is not None and stopped >= following.speech_start:
                following.barge_in_stop_ms = (stopped - following.speech_start) * 1000  # (else it had finished playing)
        else:
            await wait_for(self.client, lambda: reply.done_at is not None and not self.client.playing, self.turn_timeout)
        await wait_for(self.client, lambda: transcript_after(self.client, turn.speech_end) is not None, 1.0)
        turn.transcript = transcript_after(self.client, turn.speech_end)
        if following is not None and not following.barge_in:
            await wait_for(self.client, lambda: False, self.gap)
        return True

    async def _speech(self, turn: Turn) -> np.ndarray:
        """The turn's speech, synthesized on a thread: the event loop (other callers' microphones, maybe the server) runs
        on meanwhile."""
        return await asyncio.to_thread(speak, self.tts, turn.question, seed=turn.seed)

    def _response_after(self, turn: Turn) -> Heard | None:
        return None if turn.speech_end is None else response_after(self.client, turn.speech_end)


async def call(url: str, questions: tuple[str, ...], turns: int | None = None, delay_s: float = 0.0,
               on_turn: Callable[[Turn], None] | None = None, **caller: object) -> list[Turn]:
    """One simulated caller on a connection of its own to the realtime server at `url`: it connects after `delay_s`
    (callers that start at once are spread out, as real ones would be), asks `turns` questions and hangs up; `caller`:
    SimulatedCaller's other options. Returns the answered turns, as SimulatedCaller.run does."""
    await asyncio.sleep(delay_s)
    async with RealtimeClient(url) as client:
        return await SimulatedCaller(client, questions, turns=turns, **caller).run(on_turn)


def response_after(client: RealtimeClient, t: float) -> Heard | None:
    """The first response the server created after time `t` (the answer to speech that ended then)."""
    return next((r for r in client.responses if r.created_at >= t), None)


def transcript_after(client: RealtimeClient, t: float) -> str | None:
    return next((e["transcript"] for at, e in client.log
                 if at >= t and e["type"] == "conversation.item.input_audio_transcription.completed"), None)


async def wait_for(client: RealtimeClient, condition: Callable[[], bool], timeout: float) -> bool:
    """Consume client events until `condition()` holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        try:
            await client.next_event(timeout=min(remaining, 0.02))
        except asyncio.TimeoutError:
            pass
    return True


async def speak_once(client: RealtimeClient, speech: np.ndarray, label: str, timeout_s: float = 30.0) -> Turn:
    """Send recorded speech in real time (then silence) and wait until its reply has played."""
    turn = Turn(label)
    mic = Microphone(client, noise_level=0.0, seed=0)
    mic.say(trim_to_voice(speech), turn)  # so the turn's speech_end is where the voice stops
    mic.task = asyncio.create_task(mic.run())
    try:
        await wait_for(client, lambda: turn.speech_end is not None, len(speech) / WIRE_RATE + timeout_s)
        if turn.speech_end is not None:
            await wait_for(client, lambda: response_after(client, turn.speech_end) is not None, timeout_s)
            turn.response = response_after(client, turn.speech_end)
        if turn.response is not None:
            reply = turn.response
            await wait_for(client, lambda: reply.done_at is not None and not client.playing, timeout_s)
            turn.transcript = transcript_after(client, turn.speech_end)
    finally:
        mic.task.cancel()
        await asyncio.wait([mic.task])
    return turn
