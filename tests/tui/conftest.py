"""Shared pieces of the dashboard tests: one engine for the Pilot tests that don't test start-up, waiting
on a condition while the app runs, and the recorded stream (data/recording.json, from a real run of the
dashboard with the simulated caller, 4 then 8 synthetic users, latency then batched mode) replayed into it."""

import json
import time
from pathlib import Path

import pytest

from engine import Engine
from tui.messages import AgentSaid, MetricsUpdated, TurnMeasured, UserSaid, VoiceStatus
from tui.model import Sample, VoiceTurn

RECORDING = Path(__file__).with_name("data") / "recording.json"


@pytest.fixture(scope="session")
def engine(default_model):
    e = Engine(default_model)
    yield e
    e.close()


async def wait_for(pilot, condition, timeout: float = 60.0, what: str = "") -> None:
    """Let the app run until `condition()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what or condition}")
        await pilot.pause(0.1)


def recorded_messages() -> list:
    """The recording as the messages the dashboard received, in order."""
    out = []
    for e in json.loads(RECORDING.read_text())["events"]:
        if e["type"] == "metrics":
            out.append(MetricsUpdated(Sample.from_dict(e["sample"])))
        elif e["type"] == "user":
            out.append(UserSaid(e["text"], e["typed"]))
        elif e["type"] == "agent":
            out.append(AgentSaid(e["response_id"], e["text"], done=True, status=e["status"]))
        elif e["type"] == "turn":
            turn = e["turn"]
            out.append(TurnMeasured(VoiceTurn(**{**turn, "parts_ms": tuple(map(tuple, turn["parts_ms"]))})))
        elif e["type"] == "status":
            out.append(VoiceStatus(e["text"], e["error"]))
    return out
