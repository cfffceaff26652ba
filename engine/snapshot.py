"""What a backend reports about itself, typed: one `Snapshot` per reading, made of frozen dataclasses.

A snapshot has two halves. `stats` is the rolling window of request metrics (engine/stats.py makes it): TTFT,
TBT, TPOT, E2E, throughput and goodput per user class over the last `window_s` seconds. `state` is what the
engine is doing now: its mode, batch, queue, speculation counters and KV cache. Fields a backend cannot know
(a remote server that is not tradeoff has no KV cache to report) are None.

One window convention everywhere: a window is the last N seconds, counted back from when the snapshot is
taken (never an absolute time, which would not travel between processes). The JSON form (`to_json`,
`from_json`) is what `GET /v1/tradeoff/metrics` sends; docs/protocol.md lists its fields and a test keeps the
two in step (`field_paths`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

# "user" = the real user; "synthetic" = generated load; "judge" = the voice loop's own one-token turn judgments
# (voice/text_turn.py), kept apart so that they do not pass for short replies in the user's or anyone's TTFT and E2E
USER_CLASSES = ("user", "synthetic", "judge")
REPLIES = ("user", "synthetic")  # the classes WindowStats.all covers


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of one latency, in seconds; None without samples."""

    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True)
class ClassStats:
    """One user class's requests over the window (see engine/stats.py for when a sample counts)."""

    finished: int
    in_flight: int
    req_s: float
    output_tok_s: float
    tok_s_per_user: float | None  # mean of 1 / TPOT over the finished requests
    goodput_req_s: float  # finished requests/s that met every SLO
    slo_attained: float | None  # their share of the finished requests
    ttft_s: Distribution
    tbt_s: Distribution
    tpot_s: Distribution
    e2e_s: Distribution


@dataclass(frozen=True)
class WindowStats:
    window_s: float  # what the numbers cover: the asked window, at most the backend's window and its age
    slo_ttft_s: float
    slo_tbt_s: float
    rejected: int  # requests refused as overloaded, since start
    steps_per_s: float  # model steps (0 for a remote backend: its steps are on the server)
    batch_size_mean: float
    user: ClassStats
    synthetic: ClassStats
    judge: ClassStats
    all: ClassStats  # the replies: user and synthetic together (what the dashboard plots)


@dataclass(frozen=True)
class Speculation:
    """Latency mode's speculative decoding: the drafter in use (None = off) and counters since start."""

    drafter: str | None
    steps: int = 0  # target forwards in decode
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0


@dataclass(frozen=True)
class KVCache:
    """Batched mode's paged KV cache (absent until batched mode first runs)."""

    blocks_used: int
    blocks_free: int
    preemptions: int  # since start
    prefix_cached_tokens: int  # prompt tokens served from the prefix cache, since start

    @property
    def used(self) -> float:
        total = self.blocks_used + self.blocks_free
        return self.blocks_used / total if total else 0.0


@dataclass(frozen=True)
class Workers:
    """Disaggregated mode's two worker processes (absent until it first runs); counters since start."""

    prefill_kv: KVCache  # the prefill worker's cache (its prefix cache: prefix_cached_tokens)
    decode_kv: KVCache  # the decode worker's cache (preemptions: sequences sent back to be prefilled again)
    in_transit: int  # prompts on the prefill worker, their k/v not yet handed to the decode worker
    handoffs: int
    handoff_bytes: int
    handoff_s: float  # summed copy time
    restarts: int  # workers started again after one died
    prefill_threads: int
    decode_threads: int


@dataclass(frozen=True)
class EngineState:
    mode: str  # latency | batched | disaggregated
    running: int
    waiting: int
    max_batch_size: int
    chunked_prefill: bool | None  # None: the server's own business (not a tradeoff server)
    can_speculate: bool
    speculation: Speculation | None  # None: unknown (not a tradeoff server)
    kv: KVCache | None
    setup: str | None = None  # how the model runs (weights, activations, kernels), as the engine chose it
    workers: Workers | None = None  # disaggregated mode's workers
    note: str | None = None  # why the engine changed mode by itself (a disaggregated worker failed), if it did


@dataclass(frozen=True)
class Snapshot:
    stats: WindowStats
    state: EngineState

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Snapshot:
        return from_dict(cls, data)


T = TypeVar("T")


def from_dict(cls: type[T], data: Any) -> T:
    """A dataclass (nested ones too) from its `asdict` form; a missing or mistyped field raises (TypeError,
    KeyError, ValueError), so a peer speaking another version is refused, not half-read."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            if f.default is dataclasses.MISSING:
                raise KeyError(f"{cls.__name__}.{f.name} is missing")
            continue
        values[f.name] = _value(hints[f.name], data[f.name])
    return cls(**values)


def _value(hint: Any, value: Any) -> Any:
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None:
            if type(None) not in args:
                raise ValueError(f"None where {hint} is expected")
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _value(inner, value)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise TypeError(f"{hint.__name__} must be an object, got {type(value).__name__}")
        return from_dict(hint, value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, hint) or (hint is not bool and isinstance(value, bool)):
        raise TypeError(f"expected {hint.__name__}, got {type(value).__name__}")
    return value


def field_paths(cls: type = Snapshot, prefix: str = "") -> list[str]:
    """The dotted path of every leaf field of the JSON form, in order ('stats.user.ttft_s.p50', ...)."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if dataclasses.is_dataclass(inner[0]):
            paths += field_paths(inner[0], f"{prefix}{f.name}.")
        else:
            paths.append(prefix + f.name)
    return paths
