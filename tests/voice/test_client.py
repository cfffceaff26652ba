"""`tradeoff talk`: the fallback when PortAudio or devices are missing, WAV in and out, and the simulated caller."""

import argparse
import asyncio
import sys

import numpy as np
import pytest
import soundfile
from websockets.asyncio.server import serve

from tests.voice.conftest import closest
from voice import sound
from voice.audio import WIRE_RATE, resample
from voice.caller import QUESTIONS
from voice.cli import talk
from voice.client import RealtimeClient


def args(url: str, **kw) -> argparse.Namespace:
    base = {"url": url, "token": None, "wav": None, "out": None, "simulate": False, "turns": 1, "barge_in_every": 0}
    return argparse.Namespace(**{**base, **kw})


@pytest.fixture
def fake_sounddevice(tmp_path, monkeypatch):
    """Install a stand-in `sounddevice` module with the given source (the real one may or may not load here)."""

    def install(source: str) -> None:
        (tmp_path / "sounddevice.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "sounddevice", raising=False)

    return install


MISSING_PORTAUDIO = 'raise OSError("PortAudio library not found")\n'
NO_DEVICES = ("class PortAudioError(Exception): pass\n"
              "def query_devices(kind=None):\n    raise PortAudioError('Error querying device -1')\n")


@pytest.mark.parametrize("source,reason", [(MISSING_PORTAUDIO, "PortAudio library not found"),
                                           (NO_DEVICES, "Error querying device -1")])
async def test_no_audio_device_is_reported_not_raised(fake_sounddevice, source, reason):
    import asyncio

    fake_sounddevice(source)
    opened = sound.open_devices(asyncio.get_running_loop())
    assert isinstance(opened, str) and reason in opened


async def test_talk_without_devices_or_wav_says_so_once(fake_sounddevice, capsys):
    fake_sounddevice(MISSING_PORTAUDIO)
    assert await talk(args("ws://127.0.0.1:9/v1/realtime")) == 2
    err = capsys.readouterr().err
    assert err.count("PortAudio library not found") == 1 and "--wav" in err


async def test_talk_falls_back_to_wav_in_and_out(server, tts, fake_sounddevice, tmp_path, capsys):
    fake_sounddevice(MISSING_PORTAUDIO)
    question = "What is the capital of France?"
    speech = resample(tts.synthesize(question), WIRE_RATE, 22050)  # another rate, and stereo: the client converts
    wav_in, wav_out = tmp_path / "question.wav", tmp_path / "conversation.wav"
    noise = np.random.default_rng(0).standard_normal((len(speech) + 11025, 2)).astype(np.float32) * 3e-3
    soundfile.write(wav_in, np.pad(np.stack([speech, speech], 1), ((5512, 5513), (0, 0))) + noise, 22050)
    assert await talk(args(server.url, wav=str(wav_in), out=str(wav_out))) == 0
    out, err = capsys.readouterr()
    assert err.count("PortAudio library not found") == 1
    heard = next(line for line in out.splitlines() if line.startswith("you>"))[4:]
    assert closest(heard, QUESTIONS) == question
    assert any(line.startswith("bot>") and len(line) > 6 for line in out.splitlines())
    audio, rate = soundfile.read(wav_out)
    assert rate == WIRE_RATE and audio.shape[1] == 2
    user, agent = audio[:, 0], audio[:, 1]
    loud_user, loud_agent = np.flatnonzero(np.abs(user) > 0.05), np.flatnonzero(np.abs(agent) > 0.05)
    assert len(loud_user) and len(loud_agent) and loud_agent[0] > loud_user[-1]  # the reply follows the question


async def test_simulated_caller_from_the_command_line(server, capsys):
    assert await talk(args(server.url, simulate=True, turns=1)) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    question = next(line for line in lines if line.startswith("you>"))[5:].strip()
    heard = next(line for line in lines if line.startswith("heard>"))[6:].strip()
    assert closest(heard, QUESTIONS) == question
    assert "E2E" in out and "at the client" in out and "endpointing" in out


async def test_a_client_cancelled_before_its_session_began_hangs_up():
    """A caller stopped while it waits for session.created (the dashboard removing added callers) closes its
    connection: the server sees it go, rather than a socket and a receiving task left behind."""
    connected, closed = asyncio.Event(), asyncio.Event()

    async def silent_server(ws) -> None:  # accepts, never sends session.created
        connected.set()
        await ws.wait_closed()
        closed.set()

    async with serve(silent_server, "127.0.0.1", 0) as srv:
        url = f"ws://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1/realtime"
        client = RealtimeClient(url)
        entering = asyncio.create_task(client.__aenter__())
        await asyncio.wait_for(connected.wait(), 30)
        while client._receiver is None:  # the handshake is done on the client's side too: it waits for the session
            await asyncio.sleep(0.01)
        entering.cancel()
        with pytest.raises(asyncio.CancelledError):
            await entering
        await asyncio.wait_for(closed.wait(), 30)
        assert client._receiver.done()
