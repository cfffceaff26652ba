"""The one boundary around an engine: what the dashboard, the voice loop, the HTTP API, the load generator and
the benchmarks may ask of it. `engine.Engine` (in this process) and `serve.remote.RemoteEngine` (any
OpenAI-compatible server) implement it; nothing else about either is used from outside.

Live state crosses it only as a `Snapshot` (engine/snapshot.py); changes cross it only as `Controls`, applied
all or nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Protocol

from engine.metrics import RequestMetrics
from engine.scheduler import BatchPolicy
from engine.sequence import Request, Stream
from engine.snapshot import Snapshot
from engine.tokenizer import Tokenizer

MODES = ("latency", "batched", "disaggregated")


class ControlError(ValueError):
    """A refused control; `name` says which one (the HTTP API reports it as the error's param)."""

    def __init__(self, name: str, message: str):
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class Controls:
    """A change to make; None leaves a setting as it is. Checked whole before anything is applied."""

    mode: str | None = None  # latency | batched | disaggregated
    speculation: bool | None = None
    chunked_prefill: bool | None = None
    max_batch_size: int | None = None

    def __post_init__(self) -> None:
        kinds = {"mode": str, "speculation": bool, "chunked_prefill": bool, "max_batch_size": int}
        for f in fields(self):
            value, kind = getattr(self, f.name), kinds[f.name]
            # a bool is an int to Python, not to us: `max_batch_size: true` is a mistake, not 1
            if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
                raise ControlError(f.name, f"control {f.name} must be {kind.__name__}, got {value!r}")
        if self.mode is not None and self.mode not in MODES:
            raise ControlError("mode", f"unknown mode {self.mode!r}; expected one of {', '.join(MODES)}")

    @classmethod
    def from_json(cls, body: dict) -> Controls:
        """From a JSON object such as `{"mode": "batched", "max_batch_size": 16}`; unknown keys are refused."""
        names = [f.name for f in fields(cls)]
        unknown = [k for k in body if k not in names]
        if unknown:
            raise ControlError(unknown[0], f"unknown control {unknown[0]!r} (controls: {', '.join(names)})")
        return cls(**body)

    def to_json(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


class Backend(Protocol):
    name: str  # the model's name, as /v1/models lists it
    max_seq_len: int | None  # the context in tokens; None when the server does not say
    tokenizer: Tokenizer | None  # None for a remote server given no local tokenizer
    policy: BatchPolicy  # batched mode's scheduling (a server that is not tradeoff: the admission emulated here)
    # called with a request's final metrics as it ends, on the backend's own thread
    finish_listeners: list[Callable[[RequestMetrics], None]]

    def describe(self) -> str:
        """One line: what runs the model, where, and how it was configured."""
        ...

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Queue a request and return its stream (pass the running loop to read it with `async for`).
        Raises OverloadedError when the queue is full, ContextLengthError, or ValueError for a bad request."""
        ...

    def control(self, controls: Controls) -> None:
        """Apply a change from the next step; raises ValueError (and changes nothing) if any part is refused."""
        ...

    def snapshot(self, window_s: float | None = None) -> Snapshot:
        """The live numbers over the last `window_s` seconds (None: the backend's whole window)."""
        ...

    def clear_cache(self) -> None:
        """Forget cached prefixes, so the next request prefills from scratch (benchmarks use it)."""
        ...

    def close(self) -> None:
        """End every request in flight and release the backend."""
        ...
