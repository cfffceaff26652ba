"""Per-request latency metrics, with vLLM's benchmark definitions so numbers compare.

TTFT = first token - arrival. ITL/TBT = gaps between consecutive emissions (a step that emits k
tokens at once, as speculative decoding does, is one emission: its gap is the chunk's ITL and it
counts k tokens). TPOT = (E2E - TTFT) / (n_out - 1). E2E = last token - arrival. Queue time =
start of prefill - arrival. All times are `time.monotonic()` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SpecStats:
    """Running speculation counters, per request and for the engine."""

    steps: int = 0  # target forwards in decode
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0
    draft_s: float = 0.0
    step_s: float = 0.0
    # accepted_hist[j]: the steps that had drafts and accepted exactly j of them (steps without drafts are not in
    # it), as vLLM counts a request's verify steps. Its length is the most drafts a step could propose, plus one;
    # empty while speculation was never on.
    accepted_hist: list[int] = field(default_factory=list)

    def add(self, drafted: int, accepted: int, emitted: int, draft_s: float, step_s: float, max_drafts: int = 0) -> None:
        """One decode step; `max_drafts` is the most drafts a step may propose now (0: speculation is off)."""
        self.steps += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += emitted
        self.draft_s += draft_s
        self.step_s += step_s
        if max_drafts:
            self._widen(max_drafts + 1)
        if drafted:
            self.accepted_hist[accepted] += 1

    def merge(self, other: SpecStats) -> None:
        self.steps += other.steps
        self.drafted += other.drafted
        self.accepted += other.accepted
        self.emitted += other.emitted
        self.draft_s += other.draft_s
        self.step_s += other.step_s
        self._widen(len(other.accepted_hist))
        for j, n in enumerate(other.accepted_hist):
            self.accepted_hist[j] += n

    def _widen(self, length: int) -> None:
        self.accepted_hist += [0] * (length - len(self.accepted_hist))

    @property
    def max_drafts(self) -> int:
        """The most drafts a step could propose (vLLM's num_spec_tokens); 0 if speculation was never on."""
        return max(len(self.accepted_hist) - 1, 0)

    @property
    def draft_steps(self) -> int:
        """Steps that had drafts (vLLM's drafts, or spec steps)."""
        return sum(self.accepted_hist)

    def accepted_at(self, position: int) -> int:
        """Steps that accepted the draft at `position` (0-based): those that accepted more than `position` drafts."""
        return sum(self.accepted_hist[position + 1:])

    def summary(self) -> dict:
        return {
            "acceptance_rate": self.accepted / self.drafted if self.drafted else None,
            "mean_accepted_length": self.accepted / self.steps if self.steps else None,
            "tokens_per_target_forward": self.emitted / self.steps if self.steps else None,
            "draft_time_share": self.draft_s / self.step_s if self.step_s else None,
        }


@dataclass
class RequestMetrics:
    arrival: float
    scheduled: float | None = None  # prefill started
    emissions: list[tuple[float, int, str]] = field(default_factory=list)  # (time, tokens, mode that made them)
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose k/v were reused from an earlier request (not recomputed)
    finish_reason: str | None = None
    user_class: str = "user"
    spec: SpecStats = field(default_factory=SpecStats)  # decode steps, drafted/accepted tokens, draft time
    # disaggregated mode: the prefill worker's forward pass, and the hand-off of the prompt's k/v to the decode worker
    prefill_s: float | None = None
    handoff_s: float | None = None
    handoff_bytes: int = 0

    def record(self, t: float, n_tokens: int, mode: str) -> None:
        self.emissions.append((t, n_tokens, mode))

    @property
    def output_tokens(self) -> int:
        return sum(e[1] for e in self.emissions)

    @property
    def ttft(self) -> float | None:
        return self.emissions[0][0] - self.arrival if self.emissions else None

    @property
    def e2e(self) -> float | None:
        return self.emissions[-1][0] - self.arrival if self.emissions else None

    @property
    def itls(self) -> list[float]:
        times = [e[0] for e in self.emissions]
        return [b - a for a, b in zip(times, times[1:])]

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def queue_time(self) -> float | None:
        return self.scheduled - self.arrival if self.scheduled is not None else None

    def summary(self) -> dict:
        itls = self.itls
        return {
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "finish_reason": self.finish_reason,
            "queue_time_s": self.queue_time,
            "ttft_s": self.ttft,
            "tpot_s": self.tpot,
            "e2e_s": self.e2e,
            "itl_p50_s": percentile(itls, 50),
            "itl_p99_s": percentile(itls, 99),
            "itls_s": itls,
            "prefill_s": self.prefill_s,
            "handoff_s": self.handoff_s,
            "handoff_bytes": self.handoff_bytes,
            **self.spec.summary(),
        }


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None
