"""PCM helpers: the streaming resampler against a continuous sine, chunking invariance, strict base64."""

import base64

import numpy as np
import pytest

from voice.audio import Resampler, b64_to_pcm16, float_to_pcm16, pcm16_to_b64, pcm16_to_float, resample, with_noise_floor


@pytest.mark.parametrize("src,dst", [(24000, 16000), (22050, 24000), (16000, 24000)])
def test_resampled_sine_matches_the_sine_sampled_at_the_new_rate(src, dst):
    f = 440.0
    x = np.sin(2 * np.pi * f * np.arange(src) / src).astype(np.float32)
    y = resample(x, src, dst)
    assert abs(len(y) - dst) <= 1
    delay = (Resampler(src, dst).phases.size - 1) / 2 / (dst * Resampler(src, dst).down)  # the FIR's group delay
    t = np.arange(len(y)) / dst - delay
    inner = slice(200, len(y) - 200)
    np.testing.assert_allclose(y[inner], np.sin(2 * np.pi * f * t[inner]), atol=0.03)


def test_downsampling_removes_what_the_new_rate_cannot_hold():
    x = np.sin(2 * np.pi * 11000 * np.arange(24000) / 24000).astype(np.float32)  # above 16 kHz's Nyquist
    assert np.sqrt(np.mean(resample(x, 24000, 16000)[200:-200] ** 2)) < 0.01


def test_feeding_in_pieces_gives_the_same_output_as_all_at_once():
    x = np.random.default_rng(0).standard_normal(24000).astype(np.float32)
    whole = Resampler(24000, 16000)(x)
    r = Resampler(24000, 16000)
    cuts = [0, 1, 480, 481, 2000, 9999, 24000]
    pieces = np.concatenate([r(x[a:b]) for a, b in zip(cuts, cuts[1:])])
    np.testing.assert_array_equal(whole, pieces)


def test_pcm16_round_trip_and_wire_encoding():
    x = np.array([0.0, 0.5, -0.5, 0.999, -1.0], np.float32)
    pcm = float_to_pcm16(x)
    assert len(pcm) == 10
    np.testing.assert_allclose(pcm16_to_float(pcm), x, atol=1 / 32768)
    assert b64_to_pcm16(pcm16_to_b64(pcm)) == pcm
    assert float_to_pcm16(np.array([3.0], np.float32)) == float_to_pcm16(np.array([1.0], np.float32))  # clipped


def test_bad_wire_audio_is_refused():
    with pytest.raises(ValueError, match="base64"):
        b64_to_pcm16("not base64!")
    with pytest.raises(ValueError, match="even"):
        pcm16_to_float(base64.b64decode("AAAA"))  # 3 bytes


def test_noise_floor_sits_the_requested_level_below_the_speech():
    speech = np.concatenate([np.zeros(8000), 0.3 * np.sin(np.arange(16000) / 5)]).astype(np.float32)
    noisy = with_noise_floor(speech, 30.0, seed=1)
    noise = noisy - speech
    snr = 10 * np.log10(np.mean(speech[8000:] ** 2) / np.mean(noise**2))
    assert snr == pytest.approx(30.0, abs=0.5)
    assert np.all(noise[:8000] != 0)  # no exact digital silence left
