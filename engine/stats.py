"""Rolling-window aggregation of request metrics: what the dashboard shows and the sweep records.

Over the last `window_s` seconds: p50/p90/p99 of TTFT, TBT, TPOT and E2E per user class ("user" = the
real user, "synthetic" = generated load, "judge" = the voice loop's turn judgments, and "all" = the replies),
output tokens/s, mean running batch size, and goodput against SLOs. A sample belongs to the window by the time
it was observed: a TTFT by its first token, a TBT by the later of its two tokens, a TPOT or E2E by the request's
last token. Goodput counts
requests per second that finished in the window meeting every SLO; the TBT SLO is checked against the
request's TPOT (its mean time between tokens), as vLLM's `--goodput tpot:` does, so a speculative step
that emits several tokens at once is judged per token.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

from engine.metrics import RequestMetrics, percentile
from engine.snapshot import REPLIES, USER_CLASSES, ClassStats, Distribution, WindowStats


@dataclass(frozen=True)
class SLO:
    """Latency targets: each request's TTFT, its TPOT (TBT judged per token) and, if set, its E2E. A load level meets
    the SLO when the `percentile` of each of them does (SLAs use p99); one request meets it when each of its own does."""

    ttft_s: float = 0.5
    tbt_s: float = 0.08
    percentile: float = 99.0
    e2e_s: float | None = None

    def __post_init__(self) -> None:
        if not (self.ttft_s > 0 and self.tbt_s > 0 and 0 < self.percentile < 100 and (self.e2e_s is None or self.e2e_s > 0)):
            raise ValueError(f"an SLO needs positive targets and a percentile in (0, 100), got {self}")

    def met_by(self, m: RequestMetrics) -> bool:
        tpot = m.tpot
        return (m.ttft is not None and m.ttft <= self.ttft_s and (tpot is None or tpot <= self.tbt_s)
                and (self.e2e_s is None or (m.e2e is not None and m.e2e <= self.e2e_s)))


def distribution(values: list[float]) -> Distribution:
    """Mean and percentiles (None when there are no samples)."""
    if not values:
        return Distribution()
    return Distribution(sum(values) / len(values), percentile(values, 50), percentile(values, 90), percentile(values, 99))


def summarize(requests: list[RequestMetrics], since: float, until: float, slo: SLO) -> ClassStats:
    """The numbers of `requests` observed in the interval [since, until] (see the module docstring)."""
    span = until - since
    ttft, tbt, tpot, e2e, tokens, finished, good = [], [], [], [], 0, 0, 0
    for m in requests:
        emissions = list(m.emissions)  # the worker may be appending; a copy is a consistent prefix
        if not emissions:
            continue
        if since <= emissions[0][0] <= until:
            ttft.append(emissions[0][0] - m.arrival)
        tokens += sum(n for t, n, _ in emissions if since <= t <= until)
        tbt += [b[0] - a[0] for a, b in zip(emissions, emissions[1:]) if since <= b[0] <= until]
        if m.finish_reason in ("stop", "length") and since <= emissions[-1][0] <= until:
            finished += 1
            e2e.append(m.e2e)
            if m.tpot is not None:
                tpot.append(m.tpot)
            good += slo.met_by(m)
    return ClassStats(
        finished=finished,
        in_flight=sum(m.finish_reason is None for m in requests),
        req_s=finished / span,
        output_tok_s=tokens / span,
        tok_s_per_user=sum(1 / t for t in tpot) / len(tpot) if tpot else None,  # mean of 1 / TPOT
        goodput_req_s=good / span,
        slo_attained=good / finished if finished else None,
        ttft_s=distribution(ttft),
        tbt_s=distribution(tbt),
        tpot_s=distribution(tpot),
        e2e_s=distribution(e2e),
    )


class RollingStats:
    """Thread-safe: the engine's callers `track` requests, its worker `record_step`s, anyone reads a `window`."""

    def __init__(self, window_s: float = 30.0, slo: SLO | None = None):
        self.window_s = window_s
        self.slo = slo or SLO()
        self.rejected = 0  # requests refused as overloaded
        self._start = time.monotonic()
        self._requests: list[RequestMetrics] = []
        self._steps: deque[tuple[float, int]] = deque()  # (time, running batch size) per model step
        self._lock = threading.Lock()

    def track(self, m: RequestMetrics) -> None:
        """Follow a request from submission; its metrics are filled in as it runs."""
        with self._lock:
            self._prune(time.monotonic())
            self._requests.append(m)

    def record_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def record_step(self, t: float, batch_size: int) -> None:
        with self._lock:
            self._steps.append((t, batch_size))
            while self._steps and self._steps[0][0] < t - self.window_s:
                self._steps.popleft()

    def window(self, window_s: float | None = None, now: float | None = None) -> WindowStats:
        """The numbers of the last `window_s` seconds (at most this object's window, and its age: a young engine
        divides by its age); the dashboard asks for the time since its last change of load."""
        now = time.monotonic() if now is None else now
        span = min(self.window_s, now - self._start)
        if window_s is not None:
            span = min(span, window_s)
        span = max(span, 1e-6)
        with self._lock:
            self._prune(now)
            requests = list(self._requests)
            steps = [b for t, b in self._steps if t >= now - span]
        by_class = {c: summarize([m for m in requests if m.user_class == c], now - span, now, self.slo)
                    for c in USER_CLASSES}
        return WindowStats(
            window_s=span, slo_ttft_s=self.slo.ttft_s, slo_tbt_s=self.slo.tbt_s, rejected=self.rejected,
            steps_per_s=len(steps) / span, batch_size_mean=sum(steps) / len(steps) if steps else 0.0,
            all=summarize([m for m in requests if m.user_class in REPLIES], now - span, now, self.slo), **by_class,
        )

    def _prune(self, now: float) -> None:
        """Forget finished requests whose last event left the window."""
        def current(m: RequestMetrics) -> bool:
            last = m.emissions[-1][0] if m.emissions else m.arrival
            return m.finish_reason is None or last >= now - self.window_s

        self._requests = [m for m in self._requests if current(m)]
