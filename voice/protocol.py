"""The OpenAI Realtime protocol (GA event names): client event parsing and validation, session
configuration, and server event construction.

Everything a client can get wrong is caught here and raised as a `ProtocolError`, which the session
turns into an `error` event; the session itself then carries on. Types are strict (a bool is not a number, and a
field sent as null is refused unless the Realtime API gives null a meaning), unknown fields are refused (as the
Realtime API refuses unknown session fields), and every string must be valid text (no lone surrogates).
"""

from __future__ import annotations

import itertools
import json
import uuid
from dataclasses import dataclass, field, replace

from serve.openai_api import invalid_text

PATH = "/v1/realtime"  # the realtime WebSocket endpoint, as OpenAI's
CLIENT_EVENTS = frozenset({
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "conversation.item.create", "conversation.item.truncate", "conversation.item.delete", "conversation.item.retrieve",
    "response.create", "response.cancel",
})
# Transcription model names a client may ask for -> our ASR backend.
TRANSCRIPTION_MODELS = {
    "whisper": "whisper", "whisper-1": "whisper", "whisper-base": "whisper", "gpt-4o-transcribe": "whisper",
    "gpt-4o-mini-transcribe": "whisper", "pocketsphinx": "pocketsphinx",
}
# Session fields that do not change what this server does; accepted so stock clients can send them.
IGNORED_SESSION_FIELDS = {"model", "tools", "tool_choice", "tracing", "truncation", "prompt", "include", "object", "id",
                          "expires_at", "client_secret"}


class ProtocolError(Exception):
    """A client mistake: becomes one `error` event; the session continues."""

    def __init__(self, code: str, message: str, param: str | None = None, event_id: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param, self.event_id = code, message, param, event_id


_ids = itertools.count()


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:12]}{next(_ids):04x}"


def server_event(type_: str, **fields: object) -> dict:
    return {"type": type_, "event_id": new_id("event"), **fields}


def error_event(err: ProtocolError, kind: str = "invalid_request_error") -> dict:
    return server_event("error", error={"type": kind, "code": err.code, "message": err.message, "param": err.param,
                                        "event_id": err.event_id})


# ---- parsing ------------------------------------------------------------------------------------

def parse_client_event(raw: str | bytes) -> dict:
    """JSON text -> an event dict with a known `type`, its fields checked for presence and type."""
    if isinstance(raw, bytes):
        raise ProtocolError("invalid_event", "binary frames are not part of the protocol: send JSON text events")
    try:
        event = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not JSON, a number too long for Python, or nesting too deep
        raise ProtocolError("invalid_json", f"message is not valid JSON that this server can read: {type(e).__name__}: "
                            f"{str(e)[:200]}") from None
    if not isinstance(event, dict):
        raise ProtocolError("invalid_event", "an event must be a JSON object")
    event_id = event.get("event_id")
    event_id = event_id if isinstance(event_id, str) and invalid_text(event_id) is None else None
    if (bad_text := invalid_text(event)) is not None:
        raise ProtocolError("invalid_value", f"{bad_text or 'a key'} is not valid text: it holds a lone surrogate (half "
                            "of a UTF-16 pair), which UTF-8 cannot encode", bad_text or None, event_id)
    kind = event.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("invalid_event", "an event needs a string 'type'", "type", event_id)
    if kind not in CLIENT_EVENTS:
        raise ProtocolError("unknown_event", f"unknown event type {kind!r}; supported: {sorted(CLIENT_EVENTS)}",
                            "type", event_id)
    check = _CHECKS.get(kind)
    if check:
        try:
            check(event)
        except ProtocolError as e:
            e.event_id = event_id
            raise
    return event


def _field(obj: dict, key: str, types: type | tuple, where: str, required: bool = False, default: object = None,
           nullable: bool = False):
    """obj[key] checked against `types`; `default` if absent (or null where `nullable`)."""
    if key not in obj or (obj[key] is None and nullable and not required):
        if required:
            raise ProtocolError("missing_required_parameter", f"missing required parameter '{where}{key}'", where + key)
        return default
    value = obj[key]
    if value is None:
        raise ProtocolError("invalid_type", f"'{where}{key}' must be {_names(types)}, got null", where + key)
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ProtocolError("invalid_type", f"'{where}{key}' must be {_names(types)}, got a boolean", where + key)
    if not isinstance(value, types):
        raise ProtocolError("invalid_type", f"'{where}{key}' must be {_names(types)}, got {type(value).__name__}", where + key)
    return value


def _names(types: type | tuple) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return " or ".join({str: "a string", int: "an integer", float: "a number", bool: "a boolean", dict: "an object",
                        list: "an array"}.get(t, t.__name__) for t in types)


def _check_append(event: dict) -> None:
    _field(event, "audio", str, "", required=True)


def _check_item_create(event: dict) -> None:
    item = _field(event, "item", dict, "", required=True)
    _field(event, "previous_item_id", str, "", nullable=True)
    _known(item, ("id", "type", "object", "role", "status", "content"), "item.")
    _field(item, "id", str, "item.")
    if _field(item, "type", str, "item.", default="message") != "message":
        raise ProtocolError("unsupported", "only items of type 'message' are supported", "item.type")
    role = _field(item, "role", str, "item.", required=True)
    if role not in ("user", "assistant", "system"):
        raise ProtocolError("invalid_value", f"item.role must be user, assistant or system, got {role!r}", "item.role")
    content = _field(item, "content", list, "item.", required=True)
    for i, part in enumerate(content):
        where = f"item.content[{i}]."
        if not isinstance(part, dict):
            raise ProtocolError("invalid_type", f"'{where[:-1]}' must be an object", where[:-1])
        ptype = _field(part, "type", str, where, required=True)
        if ptype not in ("input_text", "text", "output_text"):
            raise ProtocolError("unsupported", f"content type {ptype!r} is not supported: send text", where + "type")
        _known(part, ("type", "text"), where)
        _field(part, "text", str, where, required=True)


def _check_item_delete(event: dict) -> None:
    _field(event, "item_id", str, "", required=True)


def _check_truncate(event: dict) -> None:
    _field(event, "item_id", str, "", required=True)
    if _field(event, "content_index", int, "", default=0) != 0:
        raise ProtocolError("invalid_value", "content_index must be 0 (an item has one audio part)", "content_index")
    if _field(event, "audio_end_ms", int, "", required=True) < 0:
        raise ProtocolError("invalid_value", "audio_end_ms must be >= 0", "audio_end_ms")


def _check_response_create(event: dict) -> None:
    response = _field(event, "response", dict, "", default={}, nullable=True)
    _known(response, ("instructions", "max_output_tokens", "output_modalities", "conversation", "metadata", "audio"),
           "response.")
    _field(response, "instructions", str, "response.")
    max_output_tokens(response, "response.")
    _check_modalities(response, "response.")
    _field(response, "metadata", dict, "response.", nullable=True)
    _field(response, "audio", dict, "response.", nullable=True)  # its voice is the session's: refusing it breaks no one
    if _field(response, "conversation", str, "response.", default="auto") != "auto":
        raise ProtocolError("unsupported", "only conversation 'auto' is supported", "response.conversation")


def _check_response_cancel(event: dict) -> None:
    _field(event, "response_id", str, "")


def _check_session_update(event: dict) -> None:
    _field(event, "session", dict, "", required=True)


def _known(obj: dict, keys: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in keys:
            raise ProtocolError("unknown_parameter", f"unknown parameter '{where}{key}'", where + key)


def max_output_tokens(obj: dict, where: str) -> int | None:
    """obj's `max_output_tokens` as a number of tokens, None for 'inf' or when absent (the server's limit)."""
    if "max_output_tokens" not in obj:
        return None
    value = obj["max_output_tokens"]
    if value == "inf":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise ProtocolError("invalid_value", f"'{where}max_output_tokens' must be an integer 1..4096 or 'inf'",
                            where + "max_output_tokens")
    return value


def _check_modalities(obj: dict, where: str) -> list[str] | None:
    value = _field(obj, "output_modalities", list, where)
    if value is not None and value not in (["audio"], ["text"]):
        raise ProtocolError("invalid_value", f"'{where}output_modalities' must be ['audio'] or ['text']",
                            where + "output_modalities")
    return value


_CHECKS = {
    "input_audio_buffer.append": _check_append, "conversation.item.create": _check_item_create,
    "conversation.item.truncate": _check_truncate, "conversation.item.delete": _check_item_delete,
    "conversation.item.retrieve": _check_item_delete,  # the same one field, item_id
    "response.create": _check_response_create, "response.cancel": _check_response_cancel,
    "session.update": _check_session_update,
}


# ---- session configuration ----------------------------------------------------------------------

MAX_IDLE_TIMEOUT_MS = 600_000  # server_vad's idle_timeout_ms: up to ten minutes
EAGERNESS = ("low", "medium", "high", "auto")  # semantic_vad's, as the Realtime API names them (auto = medium)


@dataclass(frozen=True)
class TurnDetection:
    """`server_vad` (a silence of silence_duration_ms ends the turn) or `semantic_vad` (the turn model judges each
    pause; `eagerness` sets how readily it ends the turn and the longest silence it waits): voice/turns.py."""

    type: str = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 300  # OpenAI's default is 500; 300 answers sooner and split no espeak question
    eagerness: str = "auto"
    create_response: bool = True
    interrupt_response: bool = True
    # server_vad: after a response has played, this long without speech (in input audio) triggers a response
    idle_timeout_ms: int | None = None

    @property
    def semantic(self) -> bool:
        return self.type == "semantic_vad"

    def to_dict(self) -> dict:
        if self.semantic:
            return {"type": "semantic_vad", "eagerness": self.eagerness, "create_response": self.create_response,
                    "interrupt_response": self.interrupt_response}
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": self.interrupt_response, "idle_timeout_ms": self.idle_timeout_ms}


def describe_turn_detection(td: dict | None) -> str:
    """A session's turn_detection (as `TurnDetection.to_dict` and session events give it), in a few words."""
    if td is None:
        return "off"
    if td.get("type") == "semantic_vad":
        return f"semantic_vad {td.get('eagerness')}"
    return f"server_vad {td.get('silence_duration_ms')} ms"


@dataclass(frozen=True)
class SessionConfig:
    id: str = field(default_factory=lambda: new_id("sess"))
    model: str = "tradeoff"
    instructions: str = "You are a helpful voice assistant. Keep answers short."
    voice: str = "alloy"
    speed: float = 1.0
    output_modalities: tuple[str, ...] = ("audio",)
    turn_detection: TurnDetection | None = TurnDetection()
    transcription_model: str = "whisper"
    max_output_tokens: int | None = None  # None = the server's limit
    temperature: float = 0.0  # an extension (the GA session has no temperature); 0 = greedy

    def to_dict(self) -> dict:
        pcm = {"type": "audio/pcm", "rate": 24000}
        return {
            "type": "realtime", "object": "realtime.session", "id": self.id, "model": self.model,
            "instructions": self.instructions, "output_modalities": list(self.output_modalities),
            "max_output_tokens": self.max_output_tokens or "inf", "tools": [], "tool_choice": "auto",
            "audio": {
                "input": {"format": pcm, "noise_reduction": None,
                          "transcription": {"model": self.transcription_model, "language": "en"},
                          "turn_detection": self.turn_detection.to_dict() if self.turn_detection else None},
                "output": {"format": pcm, "voice": self.voice, "speed": self.speed},
            },
        }

    def updated(self, session: dict) -> SessionConfig:
        """Apply a `session.update` payload. All of it is checked before anything changes."""
        changes: dict = {}
        for key, value in session.items():
            if key == "tools" and value:
                raise ProtocolError("unsupported", "tools (function calling) are not supported", "session.tools")
            if key in IGNORED_SESSION_FIELDS or key == "audio":
                continue
            if key == "type":
                if value != "realtime":
                    raise ProtocolError("invalid_value", "session.type must be 'realtime'", "session.type")
            elif key == "instructions":
                changes["instructions"] = _field(session, key, str, "session.")
            elif key == "output_modalities":
                changes["output_modalities"] = tuple(_check_modalities(session, "session."))
            elif key == "max_output_tokens":
                changes["max_output_tokens"] = max_output_tokens(session, "session.")
            elif key == "temperature":
                t = _field(session, key, (int, float), "session.")
                if not 0 <= t <= 2:
                    raise ProtocolError("invalid_value", "session.temperature must be in [0, 2]", "session.temperature")
                changes["temperature"] = float(t)
            else:
                raise ProtocolError("unknown_parameter", f"unknown parameter 'session.{key}'", f"session.{key}")
        audio = _field(session, "audio", dict, "session.", default={})
        for key in audio:
            if key not in ("input", "output"):
                raise ProtocolError("unknown_parameter", f"unknown parameter 'session.audio.{key}'", f"session.audio.{key}")
        changes.update(self._audio_input(_field(audio, "input", dict, "session.audio.", default={})))
        changes.update(self._audio_output(_field(audio, "output", dict, "session.audio.", default={})))
        return replace(self, **changes)

    def _audio_input(self, inp: dict) -> dict:
        where = "session.audio.input."
        changes: dict = {}
        for key in inp:
            if key not in ("format", "turn_detection", "transcription", "noise_reduction"):
                raise ProtocolError("unknown_parameter", f"unknown parameter '{where}{key}'", where + key)
        _check_format(inp, where)
        if inp.get("noise_reduction") is not None:
            raise ProtocolError("unsupported", "noise_reduction is not supported (send null)", where + "noise_reduction")
        if "turn_detection" in inp:
            changes["turn_detection"] = self._turn_detection(inp["turn_detection"], where + "turn_detection.")
        transcription = _field(inp, "transcription", dict, where)
        if transcription is not None:
            _known(transcription, ("model", "language", "prompt"), where + "transcription.")
            if _field(transcription, "prompt", str, where + "transcription.", default="", nullable=True):
                raise ProtocolError("unsupported", "a transcription prompt is not supported (send '' or null)",
                                    where + "transcription.prompt")
            model = _field(transcription, "model", str, where + "transcription.", default=self.transcription_model)
            if model not in TRANSCRIPTION_MODELS:
                raise ProtocolError("invalid_value", f"unknown transcription model {model!r}; supported: "
                                    f"{sorted(TRANSCRIPTION_MODELS)}", where + "transcription.model")
            language = _field(transcription, "language", str, where + "transcription.", nullable=True)
            if language not in (None, "en"):
                raise ProtocolError("unsupported", "only English ('en') is supported", where + "transcription.language")
            changes["transcription_model"] = model
        return changes

    def _turn_detection(self, td: object, where: str) -> TurnDetection | None:
        if td is None:
            return None
        if not isinstance(td, dict):
            raise ProtocolError("invalid_type", f"'{where[:-1]}' must be an object or null", where[:-1])
        kind = _field(td, "type", str, where, default="server_vad")
        if kind not in ("server_vad", "semantic_vad"):
            raise ProtocolError("unsupported", f"turn detection {kind!r} is not supported: use 'server_vad', "
                                "'semantic_vad' or null", where + "type")
        base = self.turn_detection or TurnDetection()
        values: dict = {"type": kind}
        if kind == "semantic_vad":
            eagerness = _field(td, "eagerness", str, where, default=base.eagerness)
            if eagerness not in EAGERNESS:
                raise ProtocolError("invalid_value", f"'{where}eagerness' must be one of {', '.join(EAGERNESS)}",
                                    where + "eagerness")
            values["eagerness"] = eagerness
        else:
            threshold = _field(td, "threshold", (int, float), where, default=base.threshold)
            if not 0 < threshold < 1:
                raise ProtocolError("invalid_value", f"'{where}threshold' must be in (0, 1)", where + "threshold")
            values["threshold"] = float(threshold)
            for key, hi in (("prefix_padding_ms", 2000), ("silence_duration_ms", 5000)):
                v = _field(td, key, int, where, default=getattr(base, key))
                if not 0 <= v <= hi:
                    raise ProtocolError("invalid_value", f"'{where}{key}' must be in 0..{hi}", where + key)
                values[key] = v
            idle = (None if td.get("idle_timeout_ms", 0) is None  # an explicit null turns it off
                    else _field(td, "idle_timeout_ms", int, where, default=base.idle_timeout_ms))
            if idle is not None and not 1 <= idle <= MAX_IDLE_TIMEOUT_MS:
                raise ProtocolError("invalid_value", f"'{where}idle_timeout_ms' must be null or in 1..{MAX_IDLE_TIMEOUT_MS}",
                                    where + "idle_timeout_ms")
            values["idle_timeout_ms"] = idle
        for key in ("create_response", "interrupt_response"):
            values[key] = _field(td, key, bool, where, default=getattr(base, key))
        for key in td:
            if key not in values:
                raise ProtocolError("unknown_parameter", f"unknown parameter '{where}{key}' for {kind}", where + key)
        return replace(base, **values) if kind == base.type else TurnDetection(**values)

    def _audio_output(self, out: dict) -> dict:
        where = "session.audio.output."
        changes: dict = {}
        for key in out:
            if key not in ("format", "voice", "speed"):
                raise ProtocolError("unknown_parameter", f"unknown parameter '{where}{key}'", where + key)
        _check_format(out, where)
        if "voice" in out:
            changes["voice"] = _field(out, "voice", str, where, required=True)
        if "speed" in out:
            speed = _field(out, "speed", (int, float), where, required=True)
            if not 0.25 <= speed <= 1.5:
                raise ProtocolError("invalid_value", f"'{where}speed' must be in [0.25, 1.5]", where + "speed")
            changes["speed"] = float(speed)
        return changes


def _check_format(obj: dict, where: str) -> None:
    fmt = _field(obj, "format", dict, where)
    if fmt is None:
        return
    _known(fmt, ("type", "rate"), where + "format.")
    rate = fmt.get("rate", 24000)
    if fmt.get("type") != "audio/pcm" or isinstance(rate, bool) or rate != 24000:
        raise ProtocolError("unsupported_format", f"'{where}format' must be {{'type': 'audio/pcm', 'rate': 24000}} "
                            f"(pcm16, 24 kHz, mono), got {json.dumps(fmt)}", where + "format")
