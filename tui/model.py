"""The dashboard's numbers, apart from any widget: engine samples, their history, downsampling to a chart's
width, SLO grades, the trade-off curve's points, and voice turns with their stacked latency bars.

Pure Python with no Textual, so it is unit-tested on its own and a recorded sample stream (a list of
`Sample.to_dict()`) can be replayed into the screen. From the engine it takes only the `Snapshot` types.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass, field, fields

from engine.backend import MODES
from engine.snapshot import Snapshot
from engine.stats import SLO
from voice.metrics import goodput
from voice.protocol import describe_turn_detection

USER_LEVELS = (0, 1, 2, 4, 8, 16, 32, 64)  # the synthetic-user ladder that + and - walk
RECENT_S = 5.0  # the charts plot each number over the last few seconds, so spikes show
WARN_FACTOR = 1.5  # within 1.5x of an SLO is amber, beyond it red

GOOD, WARN, BAD, NONE = "good", "warn", "bad", "none"


def next_mode(mode: str) -> str:
    """The mode the `b` key moves to: latency -> batched -> disaggregated -> latency."""
    return MODES[(MODES.index(mode) + 1) % len(MODES)] if mode in MODES else MODES[0]


ADDED_CALLERS = (0, 1, 3, 7)  # callers beside the first that the `a` key cycles: 1, 2, 4, 8 in all


def next_added_callers(current: int) -> int:
    """The next number of added callers after `current` in ADDED_CALLERS (back to 0 after the last, or from an
    off-ladder number)."""
    return next((n for n in ADDED_CALLERS if n > current), 0) if current in ADDED_CALLERS else 0


def step_users(current: int, direction: int) -> int:
    """The next level up (direction > 0) or down the ladder 0, 1, 2, 4, ... 64 from `current` (any int)."""
    if direction > 0:
        return next((n for n in USER_LEVELS if n > current), USER_LEVELS[-1])
    return next((n for n in reversed(USER_LEVELS) if n < current), USER_LEVELS[0])


def grade(value: float | None, limit: float | None, higher_is_better: bool = False) -> str:
    """GOOD within the SLO, WARN within WARN_FACTOR of it, BAD beyond; NONE without a value or an SLO."""
    if value is None or limit is None:
        return NONE
    ratio = limit / value if higher_is_better else value / limit
    if ratio <= 1:
        return GOOD
    return WARN if ratio <= WARN_FACTOR else BAD


def format_ms(ms: float | None) -> tuple[str, str]:
    """(digits, unit) for a latency: milliseconds up to 9999, then seconds."""
    if ms is None or math.isnan(ms):
        return "-", "ms"
    if ms < 9999.5:
        return f"{ms:.0f}", "ms"
    return f"{ms / 1000:.1f}", "s"


def ms_text(ms: float | None) -> str:
    """'612 ms', '12.3 s' or '- ms'."""
    return " ".join(format_ms(ms))


def format_rate(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if v < 100 else f"{v:.0f}"


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


@dataclass(frozen=True)
class Sample:
    """One reading of the engine, as the dashboard shows it. `t` counts seconds from the dashboard's start.

    The headline numbers (ttft_*, tbt_*, tok_s*) cover the time since the last change of mode or load
    (`level_age_s`), at most the engine's window (`window_s`); the recent_* numbers cover the last RECENT_S seconds.
    """

    t: float
    mode: str
    users: int  # synthetic users
    drafter: str | None  # the speculative drafter in use; None = speculation off
    chunked_prefill: bool
    level_age_s: float
    window_s: float  # what the headline numbers cover: level_age_s, at most the engine's window
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tbt_p50_ms: float | None
    tbt_p99_ms: float | None
    tok_s: float  # system output tokens/s
    tok_s_per_user: float | None  # mean of 1 / TPOT over the requests that finished
    finished: int
    recent_ttft_p50_ms: float | None
    recent_tbt_p50_ms: float | None
    recent_tbt_p99_ms: float | None
    recent_tok_s: float
    running: int
    waiting: int
    # fraction of the KV cache's blocks in use, and preemptions since start: None before batched mode ran, or from a
    # server that does not tell (no vLLM-named series in its /metrics)
    kv_used: float | None
    preemptions: int | None
    drafted: int  # speculation counters since the engine started (0 where speculation is unknown)
    accepted: int
    slo_ttft_ms: float | None  # the active profile's SLO; None: it has none (batch)
    slo_tbt_ms: float | None
    setup: str | None = None  # how the engine runs the model (weights, kernels), as it chose
    can_speculate: bool = False  # can speculation be turned on (a drafter exists)?
    profile: str = "chat"  # the active workload profile
    # disaggregated mode's hand-offs since start, and the mean copy time and size of one (None before any)
    handoffs: int = 0
    handoff_ms: float | None = None
    handoff_mb: float | None = None
    engine_note: str | None = None  # why the engine changed mode by itself (a disaggregated worker failed)

    @classmethod
    def from_snapshots(cls, t: float, level: Snapshot, recent: Snapshot, users: int, level_age_s: float,
                       profile: str = "chat", slo: SLO | None = None) -> Sample:
        """From two snapshots of the backend: `level` since the last change, `recent` over RECENT_S; graded by the
        active profile's `slo`."""
        a, r, state = level.stats.all, recent.stats.all, level.state
        spec, workers = state.speculation, state.workers
        # the KV chart follows the cache that decodes: the decode worker's in disaggregated mode
        kv = workers.decode_kv if workers is not None and state.mode == "disaggregated" else state.kv
        n = workers.handoffs if workers is not None else 0
        return cls(
            t=t, mode=state.mode, users=users, drafter=spec.drafter if spec else None,
            chunked_prefill=bool(state.chunked_prefill), level_age_s=level_age_s, window_s=level.stats.window_s,
            ttft_p50_ms=_ms(a.ttft_s.p50), ttft_p99_ms=_ms(a.ttft_s.p99),
            tbt_p50_ms=_ms(a.tbt_s.p50), tbt_p99_ms=_ms(a.tbt_s.p99),
            tok_s=a.output_tok_s, tok_s_per_user=a.tok_s_per_user, finished=a.finished,
            recent_ttft_p50_ms=_ms(r.ttft_s.p50), recent_tbt_p50_ms=_ms(r.tbt_s.p50),
            recent_tbt_p99_ms=_ms(r.tbt_s.p99), recent_tok_s=r.output_tok_s,
            running=state.running, waiting=state.waiting,
            kv_used=kv.used if kv else None, preemptions=kv.preemptions if kv else None,
            drafted=spec.drafted if spec else 0, accepted=spec.accepted if spec else 0,
            slo_ttft_ms=_ms(slo.ttft_s) if slo else None, slo_tbt_ms=_ms(slo.tbt_s) if slo else None, setup=state.setup,
            can_speculate=state.can_speculate, profile=profile, handoffs=n,
            handoff_ms=1e3 * workers.handoff_s / n if n else None, handoff_mb=workers.handoff_bytes / n / 1e6 if n else None,
            engine_note=state.note,
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Sample:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def slo_tok_s_per_user(self) -> float | None:
        """A user streams fast enough when tokens arrive within the TBT SLO: 1 / TBT SLO (None without one)."""
        return 1000 / self.slo_tbt_ms if self.slo_tbt_ms else None


Point = tuple[float, float]  # (t, value)

# the charted series: name -> how a sample gives its value
SERIES = {
    "ttft_p50": lambda s: s.recent_ttft_p50_ms,
    "tbt_p50": lambda s: s.recent_tbt_p50_ms,
    "tbt_p99": lambda s: s.recent_tbt_p99_ms,
    "tok_s": lambda s: s.recent_tok_s,
    "batch": lambda s: float(s.running),
    "queue": lambda s: float(s.waiting),
    "kv_used": lambda s: None if s.kv_used is None else 100 * s.kv_used,
}


class History:
    """The charted series over the last `span_s` seconds, plus the speculative acceptance rate, which the
    engine reports as counters since start: the rate over the last RECENT_S is their difference."""

    def __init__(self, span_s: float = 120.0):
        self.span_s = span_s
        self.series: dict[str, deque[Point]] = {name: deque() for name in [*SERIES, "acceptance"]}
        self._counters: deque[tuple[float, int, int]] = deque()  # (t, drafted, accepted)
        self.t: float | None = None  # the latest sample's time

    def add(self, s: Sample) -> None:
        self.t = s.t
        for name, value in SERIES.items():
            self._append(name, s.t, value(s))
        self._counters.append((s.t, s.drafted, s.accepted))
        while len(self._counters) > 1 and self._counters[1][0] <= s.t - RECENT_S:
            self._counters.popleft()
        _, drafted0, accepted0 = self._counters[0]
        drafted = s.drafted - drafted0
        self._append("acceptance", s.t, 100 * (s.accepted - accepted0) / drafted if drafted > 0 else None)

    def _append(self, name: str, t: float, value: float | None) -> None:
        points = self.series[name]
        if value is not None:
            points.append((t, value))
        while points and points[0][0] < t - self.span_s:
            points.popleft()

    def last(self, name: str) -> float | None:
        """The series' value in the latest sample; None if that sample had none (not an older value)."""
        points = self.series[name]
        return points[-1][1] if points and points[-1][0] == self.t else None


def downsample(points: list[Point] | deque[Point], width: int, end: float, span: float, how: str = "mean") -> list[Point]:
    """At most `width` points for a chart `width` cells wide over [end - span, end]: the points fall into
    equal time bins, each non-empty bin gives one point at its centre (the mean of its values, or the max,
    which keeps latency spikes visible)."""
    if width <= 0 or span <= 0:
        return []
    bins: dict[int, list[float]] = {}
    start = end - span
    for t, v in points:
        if start <= t <= end:
            bins.setdefault(min(int((t - start) / span * width), width - 1), []).append(v)
    reduce = max if how == "max" else (lambda vs: sum(vs) / len(vs))
    return [(start + (i + 0.5) * span / width, reduce(vs)) for i, vs in sorted(bins.items())]


# ---- the trade-off curve ---------------------------------------------------------------------

MIN_LEVEL_S = 5.0  # a load level is measured once it has held this long and requests have finished in it


@dataclass(frozen=True)
class CurvePoint:
    mode: str
    users: int
    total_tok_s: float
    tok_s_per_user: float


class TradeoffCurve:
    """One point per (mode, synthetic users) measured this session; the latest measurement of a level wins."""

    def __init__(self) -> None:
        self.points: dict[tuple[str, int], CurvePoint] = {}
        self.current: CurvePoint | None = None

    def update(self, s: Sample) -> None:
        if s.level_age_s < MIN_LEVEL_S or s.tok_s_per_user is None:
            self.current = None
            return
        self.current = CurvePoint(s.mode, s.users, s.tok_s, s.tok_s_per_user)
        self.points[(s.mode, s.users)] = self.current

    def of_mode(self, mode: str) -> list[CurvePoint]:
        return sorted((p for p in self.points.values() if p.mode == mode), key=lambda p: p.users)


# ---- voice turns -----------------------------------------------------------------------------

TRANSPORT = "transport"
# what the dashboard's turn-detection key cycles through (session.update payloads)
TURN_DETECTIONS = ({"type": "server_vad", "silence_duration_ms": 300}, {"type": "semantic_vad", "eagerness": "high"},
                   {"type": "semantic_vad", "eagerness": "medium"}, {"type": "semantic_vad", "eagerness": "low"})


def next_turn_detection(td: dict | None) -> dict:
    """The one after `td` in TURN_DETECTIONS (the first if `td` is not one of them)."""
    names = [describe_turn_detection(t) for t in TURN_DETECTIONS]
    now = describe_turn_detection(td)
    return TURN_DETECTIONS[(names.index(now) + 1) % len(names)] if now in names else TURN_DETECTIONS[0]


@dataclass(frozen=True)
class VoiceTurn:
    """One answered turn. `parts_ms` is the critical-path breakdown in pipeline order (the server's parts,
    then transport = the client's E2E minus the server's); empty for a typed turn, which has no speech."""

    user_text: str
    reply_text: str
    status: str
    parts_ms: tuple[tuple[str, float], ...]
    e2e_ms: float | None  # the client's own measurement when known, else the server's
    llm_ttft_ms: float | None
    tbt_p50_ms: float | None
    typed: bool = False
    turn_reason: str | None = None  # what ended the user's turn: silence | semantic | too_long | commit
    turn_probability: float | None = None  # semantic_vad: Smart Turn's P(complete) at the pause it judged last
    turn_model_ms: float | None = None
    text_probability: float | None = None  # semantic_vad: the LLM's P(end of turn) after that pause's transcript
    text_model_ms: float | None = None
    cut_off: bool = False  # the simulated caller was cut off mid-sentence in this turn
    caller: int = 0  # which simulated caller spoke it: 0 is the one in the transcript, 1.. the callers added as load

    @classmethod
    def from_metrics(cls, event: dict, user_text: str, reply_text: str, status: str,
                     client_e2e_ms: float | None = None, typed: bool = False, cut_off: bool = False,
                     caller: int = 0) -> VoiceTurn:
        """From a `tradeoff.metrics` event (its breakdown_ms, e2e_ms, llm, tbt_ms and turn fields)."""
        parts = list((event.get("breakdown_ms") or {}).items())
        server_e2e = event.get("e2e_ms")
        if parts and client_e2e_ms is not None and server_e2e is not None:
            parts.append((TRANSPORT, max(0.0, client_e2e_ms - server_e2e)))
        llm, turn = event.get("llm") or {}, event.get("turn") or {}
        return cls(user_text, reply_text, status, tuple(parts),
                   client_e2e_ms if client_e2e_ms is not None else server_e2e,
                   llm.get("ttft_ms"), (event.get("tbt_ms") or {}).get("p50"), typed,
                   turn.get("reason"), turn.get("probability"), turn.get("model_ms"), turn.get("text_probability"),
                   turn.get("text_model_ms"), cut_off, caller)

    def decision(self) -> str | None:
        """What ended the turn, in a few words (None for a typed turn)."""
        if self.typed or self.turn_reason is None:
            return None
        judgments = [f"{who} {p:.2f} in {ms:.0f} ms" for who, p, ms in (
            ("LLM", self.text_probability, self.text_model_ms), ("Smart Turn", self.turn_probability, self.turn_model_ms))
            if p is not None and ms is not None]
        judged = ", ".join(judgments) or None
        if self.turn_reason == "semantic":
            return judged
        said = {"silence": "silence", "too_long": "buffer full", "commit": "client commit"}.get(self.turn_reason,
                                                                                            self.turn_reason)
        return f"{said} (after {judged})" if judged else said


@dataclass
class VoiceStats:
    turns: list[VoiceTurn] = field(default_factory=list)

    def add(self, turn: VoiceTurn) -> None:
        self.turns.append(turn)

    @property
    def spoken(self) -> list[VoiceTurn]:
        return [t for t in self.turns if not t.typed and t.e2e_ms is not None]

    @property
    def cut_offs(self) -> int:
        return sum(t.cut_off for t in self.turns)

    @property
    def goodput(self) -> float | None:
        """The share of spoken turns that met the voice SLO."""
        return goodput([t.e2e_ms for t in self.spoken])

    @property
    def last_e2e_ms(self) -> float | None:
        spoken = self.spoken
        return spoken[-1].e2e_ms if spoken else None

    @property
    def p50_e2e_ms(self) -> float | None:
        values = sorted(t.e2e_ms for t in self.spoken)
        if not values:
            return None
        mid = len(values) // 2
        return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def stack(parts: tuple[tuple[str, float], ...], width: int, scale_ms: float) -> list[tuple[str, int]]:
    """Cells per part for a bar `width` cells wide that stands for `scale_ms`: the cumulative ends are
    rounded, so the cells add up to round(total / scale_ms * width) and no part is lost to rounding drift."""
    out, done, cum = [], 0, 0.0
    for name, ms in parts:
        cum += ms
        end = min(width, round(cum / scale_ms * width)) if scale_ms > 0 else 0
        out.append((name, end - done))
        done = end
    return out
