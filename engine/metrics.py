"""Per-request latency metrics, with vLLM's benchmark definitions so numbers compare.

TTFT = first token - arrival. ITL/TBT = gaps between consecutive emissions (a step that emits k
tokens at once, as speculative decoding does, is one emission: its gap is the chunk's ITL and it
counts k tokens). TPOT = (E2E - TTFT) / (n_out - 1). E2E = last token - arrival. Queue time =
start of prefill - arrival. All times are `time.monotonic()` seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from engine.speculative import SpecStats


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
            **self.spec.summary(),
        }


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None
