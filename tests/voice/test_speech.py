"""The speech parts on real audio: TTS output, VAD events against the known speech boundaries, the Whisper
front end against Hugging Face's feature extractor, and both recognizers against the text that was spoken."""

import asyncio
import copy

import numpy as np
import pytest

from tests.conftest import wait_until
from tests.voice.conftest import closest
from voice.asr import SphinxASR, log_mel
from voice.audio import ASR_RATE, WIRE_RATE, float_to_pcm16, resample, with_noise_floor
from voice.caller import QUESTIONS, speak, spoken_question
from voice.vad import CHUNK, FADE, SileroModel, SileroVAD, silero_data
from voice.wer import wer


def clip(tts, text, seed=0, lead_s=0.4, tail_s=0.5):
    """16 kHz speech with silence around it; also returns where the voice starts and ends (samples)."""
    speech = speak(tts, text)
    audio = np.concatenate([np.zeros(int(lead_s * WIRE_RATE), np.float32), speech, np.zeros(int(tail_s * WIRE_RATE), np.float32)])
    audio16 = resample(with_noise_floor(audio, 30.0, seed), WIRE_RATE, ASR_RATE)
    return audio16, int(lead_s * ASR_RATE), int((lead_s + len(speech) / WIRE_RATE) * ASR_RATE)


def test_espeak_speaks_at_the_wire_rate_and_knows_its_voices(tts):
    audio = tts.synthesize("Hello there.", "alloy")
    assert audio.dtype == np.float32 and 0.4 < len(audio) / WIRE_RATE < 2.0
    assert np.abs(audio).max() > 0.1
    shorter = tts.synthesize("Hello there.", "alloy", end_pause=False)
    assert 0.2 < (len(audio) - len(shorter)) / WIRE_RATE < 0.4  # the sentence-end pause
    assert len(tts.synthesize("Hello there.", "alloy", speed=1.5)) < len(audio)
    tts.check_voice("coral")
    with pytest.raises(ValueError, match="unknown voice"):
        tts.check_voice("no-such-voice")


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.jit.load
def test_numpy_silero_matches_the_torchscript_model(tts):
    import torch

    audio, _, _ = clip(tts, "Why do leaves change color in autumn?")
    reference = torch.jit.load(str(silero_data() / "silero_vad.jit"), map_location="cpu").eval()
    ours = SileroModel()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the TorchScript model crawls with two threads on a busy 2-core machine
    try:
        with torch.inference_mode():
            pairs = [(reference(torch.from_numpy(audio[i:i + CHUNK]), ASR_RATE).item(), ours(audio[i:i + CHUNK]))
                     for i in range(0, len(audio) - CHUNK, CHUNK)]
    finally:
        torch.set_num_threads(threads)
    expected, got = np.array(pairs).T
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert expected.min() < 0.1 and expected.max() > 0.9  # the clip has both silence and speech


def test_vad_finds_speech_and_its_end(tts):
    audio, start, end = clip(tts, "How many legs does a spider have?")
    vad = SileroVAD(threshold=0.5, silence_duration_ms=300)
    events = []
    for i in range(0, len(audio), 320):  # 20 ms pieces, as a client sends them
        events += [(e.kind, e.sample, vad.samples) for e in vad.process(audio[i:i + 320])]
    kinds = [k for k, _, _ in events]
    assert kinds[0] == "start" and kinds[-1] == "end" and kinds.count("end") == 1
    assert "pause" in kinds
    assert start - CHUNK <= events[0][1] <= start + 4 * CHUNK
    _, end_sample, decided_at = events[-1]
    assert abs(end_sample - end) <= 0.03 * ASR_RATE  # within 30 ms of where the voice stopped
    assert 0.3 * ASR_RATE <= decided_at - end_sample < 0.3 * ASR_RATE + 2 * CHUNK


def vad_events(audio: np.ndarray) -> list[tuple[str, int, int]]:
    """(kind, sample, samples fed when it came) for `audio` fed in 20 ms pieces, as a client sends it."""
    vad = SileroVAD(threshold=0.5, silence_duration_ms=300)
    events = []
    for i in range(0, len(audio), 320):
        events += [(e.kind, e.sample, min(i + 320, len(audio))) for e in vad.process(audio[i:i + 320])]
    return events


@pytest.mark.parametrize("text", ["How many legs does a spider have?", "Who wrote Romeo and Juliet?"])
def test_vad_pauses_once_the_voice_has_been_at_the_floor_for_the_fade(tts, text):
    audio, _, end = clip(tts, text)
    paused_at = [fed for kind, _, fed in vad_events(audio) if kind == "pause" and fed > end]
    # Silero alone notices these 100-110 ms after the voice stops; the energy within a 20 ms piece of the fade (the
    # voice's last 10 ms frame may already be near the floor)
    assert paused_at and FADE - 320 <= paused_at[0] - end <= FADE + 320, (paused_at, end)


def test_a_pause_found_by_energy_resumes_where_the_voice_comes_back(tts):
    first, _, first_end = clip(tts, "How many legs", tail_s=0.0)
    second, second_start, _ = clip(tts, "does a spider have?", seed=1, lead_s=0.07)
    audio = np.concatenate([first[:first_end], second])  # the voice stops for 70 ms, too short for Silero to notice
    events = vad_events(audio)
    resumed = first_end + second_start
    kinds = [kind for kind, _, _ in events]
    assert kinds.count("start") == 1 and kinds[-1] == "end", events
    i = next(i for i, (kind, _, fed) in enumerate(events) if kind == "pause" and fed > first_end)
    # within the 10 ms frame where the voice came back, not where the 20 ms piece that brought it ended
    assert kinds[i + 1] == "resume" and abs(events[i + 1][1] - resumed) <= 0.01 * ASR_RATE, (events, resumed)
    assert events[i][2] - first_end <= FADE + 320  # paused once the floor had lasted the fade


def test_vad_ignores_the_noise_floor():
    noise = with_noise_floor(np.zeros(3 * ASR_RATE, np.float32) + 1e-3 * np.sin(np.arange(3 * ASR_RATE)), 0.0)
    assert SileroVAD().process(noise.astype(np.float32)) == []


def test_log_mel_matches_the_reference_front_end():
    from transformers import WhisperFeatureExtractor

    audio = (np.random.default_rng(0).standard_normal(3 * ASR_RATE) * 0.1).astype(np.float32)
    reference = WhisperFeatureExtractor(feature_size=80, sampling_rate=ASR_RATE, hop_length=160, chunk_length=10,
                                        n_fft=400)(audio, sampling_rate=ASR_RATE, return_tensors="np").input_features[0]
    ours = log_mel(audio, 10)
    assert ours.shape == reference.shape == (80, 1000)
    np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_whisper_meets_the_word_error_target_on_the_question_set(whisper, tts):
    clips = [resample(spoken_question(tts, q, seed=i), WIRE_RATE, ASR_RATE) for i, q in enumerate(QUESTIONS)]
    hyps = [whisper.transcribe_array(c).text for c in clips]
    assert wer(list(QUESTIONS), hyps) < 0.2, list(zip(QUESTIONS, hyps))


def test_whisper_decodes_in_a_window_that_fits_the_audio_with_two_seconds_to_spare(whisper):
    assert [whisper.window_for(int(s * ASR_RATE)) for s in (0, 1.0, 2.5, 4.2, 7.9, 8.1, 10.0)] == [5, 5, 5, 7, 10, 10, 10]
    fixed = copy.copy(whisper)
    fixed.min_window_s = fixed.window_s  # what `bench voice` compares it with: fixed 10 s windows
    assert {fixed.window_for(int(s * ASR_RATE)) for s in (0, 2.5, 10.0)} == {10}


def test_whisper_says_nothing_for_noise(whisper):
    noise = with_noise_floor(np.full(2 * ASR_RATE, 1e-3, np.float32), -20.0)
    assert whisper.transcribe_array(noise).text == ""


TWO = ("What is the capital of France?", "How do I make a cup of tea?")


async def first_of_two(whisper, tts):
    """A recognizer fed the first of TWO and asked once: (the recognizer, both clips, its answer)."""
    a, b = clip(tts, TWO[0], seed=1)[0], clip(tts, TWO[1], seed=2)[0]
    rec = whisper.open()
    rec.feed(a)
    return rec, a, b, await rec.transcribe()


async def test_whisper_recognizer_transcribes_everything_fed_so_far(whisper, tts):
    first, second = TWO
    rec, a, b, one = await first_of_two(whisper, tts)
    rec.feed(b)
    both = await rec.transcribe()
    assert one.audio_s == pytest.approx(len(a) / ASR_RATE) and both.audio_s == pytest.approx((len(a) + len(b)) / ASR_RATE)
    assert closest(one.text, QUESTIONS) == first, one.text
    assert closest(both.text, [first, second, f"{first} {second}"]) == f"{first} {second}", both.text
    assert rec.settled == ""  # nothing settled: each answer decodes the whole utterance
    assert await rec.transcribe() is both  # nothing new fed: no new decode
    rec.reset()
    assert rec.settled == "" and (await rec.transcribe()).text == ""


async def test_whisper_recognizer_decodes_only_the_audio_after_a_settled_pause(whisper, tts):
    rec, a, b, one = await first_of_two(whisper, tts)
    await rec.settle()
    assert rec.settled == one.text
    rec.feed(b)
    both = await rec.transcribe()  # the settled words, then those of the audio since: decoded alone
    assert both.text == f"{one.text} {whisper.transcribe_array(b).text}"
    assert both.audio_s == pytest.approx((len(a) + len(b)) / ASR_RATE)
    assert rec.settled == one.text  # until the next settle
    rec.reset()
    assert rec.settled == "" and (await rec.transcribe()).text == ""


async def test_pocketsphinx_worker_gives_what_an_in_process_decoder_gives(fresh_tts):
    """The shared worker's takes differ with what it spoke before, and pocketsphinx heard the spider question with a WER
    of 0.14-0.86 over 20 takes on one CPU; a fresh worker's take is the same every run (0.43 there)."""
    from pocketsphinx import Decoder

    reference = Decoder(samprate=ASR_RATE, loglevel="FATAL")  # fed the same way, in this process
    rec = SphinxASR().open()
    try:
        for text in ("Tell me a joke, please.", "How many legs does a spider have?"):
            audio, _, _ = clip(fresh_tts, text)
            reference.start_utt()
            for i in range(0, len(audio), 320):
                rec.feed(audio[i:i + 320])
                reference.process_raw(float_to_pcm16(audio[i:i + 320]), False, False)
            reference.end_utt()
            result = await asyncio.wait_for(rec.transcribe(), 30)
            assert result.text == reference.hyp().hypstr
            assert wer([text], [result.text]) < 0.8, (text, result.text)  # weak, but it heard speech
            rec.reset()
    finally:
        rec.close()  # returns at once (it is called on the event loop); the worker ends and is reaped meanwhile
    wait_until(lambda: rec.process.poll() is not None, what="the worker to exit")
