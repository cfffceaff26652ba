"""docs/protocol.md against the code and the tests, so they cannot drift apart: the page's event tables list
exactly the events the server accepts and sends, each of them is exercised by some test, its error table
lists exactly the codes the server uses, and its client examples are accepted by the server's parser."""

import ast
import asyncio
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from voice.asr import Transcript
from voice.audio import float_to_pcm16, pcm16_to_b64
from voice.client import RealtimeClient
from voice.protocol import CLIENT_EVENTS, SessionConfig, parse_client_event
from voice.server import VoiceServer

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "protocol.md").read_text()


def section(title: str) -> str:
    """The text under '## TITLE' up to the next '## ' heading."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", DOC, re.S | re.M)
    assert match, f"docs/protocol.md has no '## {title}' section"
    return match.group(1)


def first_column(text: str) -> list[str]:
    """The `code` names in the first column of the markdown table rows in `text`."""
    return re.findall(r"^\| `([^`]+)` \|", text, re.M)


def voice_calls(func: str) -> set[str]:
    """First string arguments of every call to `func` in the voice package."""
    names = set()
    for path in (ROOT / "voice").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == func and node.args
                    and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names.add(node.args[0].value)
    return names


def string_literals_in_tests() -> set[str]:
    found = set()
    for path in (ROOT / "tests").rglob("*.py"):
        found |= {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
                  and isinstance(n.value, str)}
    return found


def test_event_tables_match_the_code():
    client, server = first_column(section("Client events")), first_column(section("Server events"))
    assert len(client) == len(set(client)) and len(server) == len(set(server))
    assert set(client) == CLIENT_EVENTS
    assert set(server) == voice_calls("server_event")  # every event the server builds, and nothing else


def test_every_documented_event_is_exercised_by_a_test():
    literals = string_literals_in_tests()
    events = first_column(section("Client events")) + first_column(section("Server events"))
    missing = [e for e in events if e not in literals]
    assert not missing, f"documented events no test names: {missing}"


def test_error_table_matches_the_codes_the_server_uses():
    codes = voice_calls("ProtocolError")
    for path in (ROOT / "voice").glob("*.py"):  # codes written straight into an event: {"code": "..."}
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Dict):
                codes |= {v.value for k, v in zip(node.keys, node.values) if isinstance(k, ast.Constant)
                          and k.value == "code" and isinstance(v, ast.Constant) and isinstance(v.value, str)}
    assert set(first_column(section("Errors"))) == codes


def test_client_examples_are_accepted():
    block = re.search(r"```json\n(.*?)```", section("Client events"), re.S).group(1)
    decoder, pos, seen = json.JSONDecoder(), 0, []
    while (pos := len(block) - len(block[pos:].lstrip())) < len(block):
        event, end = decoder.raw_decode(block, pos)
        parsed = parse_client_event(json.dumps(event))
        if parsed["type"] == "session.update":
            SessionConfig().updated(parsed["session"])  # the session payload is valid too
        seen.append(parsed["type"])
        pos = end
    assert sorted(seen) == sorted(CLIENT_EVENTS)


class BrokenRecognizer:
    """A recognizer whose worker has died: every transcription raises."""

    settled = ""

    def feed(self, audio: np.ndarray) -> None:
        pass

    async def transcribe(self) -> Transcript:
        raise RuntimeError("recognizer worker died")

    async def settle(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


class BrokenASR:
    def open(self) -> BrokenRecognizer:
        return BrokenRecognizer()


async def test_a_failed_transcription_is_reported_and_the_session_goes_on(services):
    async with VoiceServer(replace(services, asr=lambda name: BrokenASR()), port=0) as server:
        async with RealtimeClient(server.url) as client:
            await client.send({"type": "session.update", "session": {"audio": {"input": {"turn_detection": None}}}})
            await client.send({"type": "input_audio_buffer.append", "audio": pcm16_to_b64(float_to_pcm16(np.zeros(4800)))})
            await client.send({"type": "input_audio_buffer.commit"})
            await client.send({"type": "response.create"})

            async def until_done() -> list[dict]:
                events = []
                while not events or events[-1]["type"] != "response.done":
                    events.append((await client.next_event())[1])
                return events

            events = await asyncio.wait_for(until_done(), 30)
    failed = [e for e in events if e["type"] == "conversation.item.input_audio_transcription.failed"]
    committed = next(e for e in events if e["type"] == "input_audio_buffer.committed")
    assert len(failed) == 1 and failed[0]["item_id"] == committed["item_id"]
    assert failed[0]["error"]["code"] == "transcription_failed" and "worker died" in failed[0]["error"]["message"]
    # the session goes on: the requested response runs over the conversation (whose user turn has no text)
    assert events[-1]["response"]["status"] == "completed"


def expand(pattern: str) -> list[str]:
    """'a.{b,c}.d' -> ['a.b.d', 'a.c.d'] (every brace group)."""
    match = re.search(r"\{([^}]*)\}", pattern)
    if not match:
        return [pattern]
    return [p for choice in match.group(1).split(",") for p in expand(pattern[:match.start()] + choice + pattern[match.end():])]


def test_the_metrics_table_lists_every_field_of_the_snapshot():
    from engine.snapshot import field_paths

    documented = []
    for row in re.findall(r"^\| (`.*?) \|", section("The engine's numbers and controls over HTTP"), re.M):
        names = re.findall(r"`([^`]+)`", row)
        first = names[0]
        prefix = first.rsplit(".", 1)[0] + "."
        for name in names:  # `a.b.c`, `.d`: the second one is a field beside the first
            documented += expand(prefix + name[1:] if name.startswith(".") else name)
    assert sorted(documented) == sorted(field_paths())
