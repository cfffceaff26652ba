"""A discrete-event model of the engine, built from measured step times: what a closed-loop sweep cannot say.

A sweep measures N users back to back. A deployment sees Poisson arrivals, users who think between requests, and
k replicas behind a balancer; queueing then sets the tail of TTFT. This module replays such traffic through a model
of the engine: one step at a time, scheduled as engine/scheduler.py does (running sequences first, one token
each; then waiting prompts admitted into what is left of the token budget, cut into chunks or whole), each step
lasting what `StepModel` (fitted to the sweep's measured steps) says, times the measured steps' own variation
replayed in order. Requests arriving during a step wait for the next, as in the engine. Prefix-cache hits enter as
measured: the prompt lengths given are the tokens that were prefilled. Not modelled: KV-cache exhaustion and
preemption; latency mode's variation (its tokens come at its measured mean time per token, so its p99 TPOT comes
out low). Pure Python, no engine: the planner and its tests run it anywhere.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from engine.metrics import percentile
from engine.scheduler import chunk
from engine.stats import SLO
from serve.loadgen import Lengths, Measured


@dataclass(frozen=True)
class StepModel:
    """Seconds of one step, as measured. A step of d decode rows (rows of one token, as the engine's step profile
    counts them) takes the measured mean of decode-only steps of d rows, interpolated between the row counts
    measured: not a line, because on a CPU the weights streamed once per step dominate and each added row costs
    less than the last (the default model, bf16, 2 cores: 69, 84, 91, 95 ms at 1, 4, 8, 16 rows). Prompt tokens add
    a fixed part (one for a step of prompt tokens alone, one for prompt tokens beside decodes, which takes the
    engine's slower mixed path) and a part per token; a step of prompt tokens alone costs what one decode row's
    step does, plus those."""

    decode: tuple[tuple[int, float], ...]  # (decode rows, seconds) of decode-only steps, rows ascending
    prefill_s: float = 0.0
    mixed_s: float = 0.0
    per_prefill_token_s: float = 0.0
    # measured / modelled seconds of every measured step, in the order they ran: a replica replays them from a
    # random point, so a machine's slow spells (which set the p99s) come in runs, as they came (empty: none)
    jitter: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not self.decode or [d for d, _ in self.decode] != sorted({d for d, _ in self.decode}) or self.decode[0][0] < 1:
            raise ValueError(f"decode needs (rows >= 1, seconds) points with distinct rows in ascending order, got {self.decode}")

    def decode_seconds(self, rows: int) -> float:
        """Interpolated between measured row counts; flat below the first, and past the last along the last two
        points' slope (never falling)."""
        points = self.decode
        if rows <= points[0][0] or len(points) == 1:
            return points[0][1] if rows <= points[0][0] else points[-1][1]
        for (d0, s0), (d1, s1) in zip(points, points[1:]):
            if rows <= d1:
                return s0 + (s1 - s0) * (rows - d0) / (d1 - d0)
        (d0, s0), (d1, s1) = points[-2], points[-1]
        return s1 + max(0.0, (s1 - s0) / (d1 - d0)) * (rows - d1)

    def seconds(self, decodes: int, prefill_tokens: int) -> float:
        t = self.decode_seconds(max(decodes, 1))
        if prefill_tokens:
            t += (self.mixed_s if decodes else self.prefill_s) + self.per_prefill_token_s * prefill_tokens
        return t

    @classmethod
    def fit(cls, samples: list[tuple[int, int, float]], min_steps: int = 3) -> StepModel:
        """From measured (decode rows, prefill tokens, seconds): the mean decode-only step per row count (those seen
        at least `min_steps` times), then the prompt terms by least squares on what steps with prompt tokens took
        beyond that, each held >= 0 (a negative one is dropped and the rest refitted)."""
        by_rows: dict[int, list[float]] = {}
        for d, p, sec in samples:
            if p == 0 and d > 0:
                by_rows.setdefault(d, []).append(sec)
        points = [(d, sum(v) / len(v)) for d, v in sorted(by_rows.items()) if len(v) >= min_steps]
        if not points:
            raise ValueError(f"a step model needs decode-only steps of some batch size seen {min_steps}+ times")
        decode_only = cls(tuple(points))
        prefill = [(d, p, sec - decode_only.decode_seconds(max(d, 1))) for d, p, sec in samples if p > 0]
        if not prefill:
            return decode_only.with_jitter(samples)
        x = np.array([[0.0 if d else 1.0, 1.0 if d else 0.0, float(p)] for d, p, _ in prefill])
        y = np.array([r for _, _, r in prefill])
        keep = [i for i in range(3) if x[:, i].any()]
        coef = np.zeros(0)
        while keep:
            coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
            if (coef >= 0).all():
                break
            keep.pop(int(np.argmin(coef)))
        terms = dict.fromkeys(range(3), 0.0) | dict(zip(keep, coef.tolist()))
        return cls(tuple(points), terms[0], terms[1], terms[2]).with_jitter(samples)

    def with_jitter(self, samples: list[tuple[int, int, float]]) -> StepModel:
        """This model with the measured steps' ratios to it, in their order."""
        return replace(self, jitter=tuple(sec / self.seconds(d, p) for d, p, sec in samples if self.seconds(d, p) > 0))

    @classmethod
    def batch_one(cls, prompt_tokens: list[int], ttfts: list[float], tpot_s: float) -> StepModel:
        """Latency mode's model from requests measured one at a time: a token every `tpot_s` (speculation's mean),
        and TTFT = that + prefill_s + per_token x prompt, a least-squares line (flat if the prompts barely vary)."""
        if len(ttfts) < 2 or len(set(prompt_tokens)) < 2:
            slope, intercept = 0.0, float(np.median(ttfts))
        else:
            slope, intercept = np.polyfit(np.array(prompt_tokens, float), np.array(ttfts), 1).tolist()
            if slope < 0:
                slope, intercept = 0.0, float(np.median(ttfts))
        return cls(((1, tpot_s),), max(intercept - tpot_s, 0.0), 0.0, slope)


@dataclass(frozen=True)
class EngineModel:
    """A replica: its step model and its scheduling policy. `token_budget` None: a prompt runs whole in one step
    with no decodes beside it (latency mode, batch 1)."""

    step: StepModel
    max_batch_size: int
    token_budget: int | None
    chunked_prefill: bool = True


@dataclass
class SimRequest:
    arrival: float
    prompt_tokens: int
    output_tokens: int
    user: int = -1  # closed loop: whose request (-1: an open-loop arrival)
    computed: int = 0  # prompt tokens whose k/v are computed
    emitted: int = 0
    first: float | None = None
    last: float | None = None

    @property
    def ttft(self) -> float:
        return self.first - self.arrival

    @property
    def tpot(self) -> float | None:
        return (self.last - self.first) / (self.emitted - 1) if self.emitted > 1 else None

    @property
    def e2e(self) -> float:
        return self.last - self.arrival


@dataclass
class Replica:
    """One simulated engine: a waiting queue, a running batch, and the step in progress (if any)."""

    model: EngineModel
    waiting: deque[SimRequest] = field(default_factory=deque)
    running: list[SimRequest] = field(default_factory=list)
    batch: list[tuple[SimRequest, int]] = field(default_factory=list)
    busy_until: float = math.inf  # when the step in progress ends (inf: idle)
    jitter_at: int = 0  # where this replica is in the step model's measured jitter

    @property
    def outstanding(self) -> int:
        return len(self.waiting) + len(self.running)

    def start_step(self, now: float) -> None:
        """Schedule the next step at `now` (nothing to run: idle)."""
        m = self.model
        budget = m.token_budget if m.token_budget is not None else math.inf
        batch: list[tuple[SimRequest, int]] = []
        prefilling = False
        for r in self.running:
            n = self._chunk(r, budget, prefilling)
            if n == 0:
                break
            batch.append((r, n))
            budget -= n
            prefilling |= n > 1
        while self.waiting and len(self.running) < m.max_batch_size:
            r = self.waiting[0]
            n = self._chunk(r, budget, prefilling)
            if n == 0:
                break
            self.running.append(self.waiting.popleft())
            batch.append((r, n))
            budget -= n
            prefilling |= n > 1
        self.batch = batch
        decodes = sum(n == 1 for _, n in batch)
        if not batch:
            self.busy_until = math.inf
            return
        seconds = m.step.seconds(decodes, sum(n for _, n in batch if n > 1))
        if m.step.jitter:
            seconds *= m.step.jitter[self.jitter_at % len(m.step.jitter)]
            self.jitter_at += 1
        self.busy_until = now + seconds

    def _chunk(self, r: SimRequest, budget: float, prefilling: bool) -> int:
        pending = r.prompt_tokens - r.computed if r.computed < r.prompt_tokens else 1
        return chunk(pending, budget, self.model.chunked_prefill, prefilling)

    def finish_step(self) -> list[SimRequest]:
        """End the step in progress at `busy_until`: tokens out; returns the requests that finished."""
        now, done = self.busy_until, []
        for r, n in self.batch:
            if r.computed < r.prompt_tokens:
                r.computed += n
                if r.computed < r.prompt_tokens:
                    continue  # a chunk of the prompt: no token yet
            r.emitted += 1
            r.first = now if r.first is None else r.first
            r.last = now
            if r.emitted >= r.output_tokens:
                done.append(r)
        if done:
            self.running = [r for r in self.running if r.emitted < r.output_tokens]
        self.batch = []
        self.busy_until = math.inf
        return done


@dataclass(frozen=True)
class Traffic:
    """What arrives: lengths, and either a Poisson `rate` (requests/s) or `users` in a closed loop who think for
    an exponential `think_time_s` (mean) between a reply's end and their next request. `prompt_tokens` counts
    the tokens to prefill: a prompt's tokens less those the prefix cache holds."""

    prompt_tokens: Lengths | Measured
    output_tokens: Lengths | Measured
    rate: float | None = None
    users: int | None = None
    think_time_s: float = 0.0

    def __post_init__(self) -> None:
        if (self.rate is None) == (self.users is None):
            raise ValueError("traffic is either a Poisson rate or a number of closed-loop users")
        if (self.rate is not None and not self.rate > 0) or (self.users is not None and self.users < 1):
            raise ValueError(f"the rate and the users must be positive, got {self}")
        if not self.think_time_s >= 0:
            raise ValueError(f"the think time must be >= 0 s, got {self.think_time_s}")


def simulate(model: EngineModel, traffic: Traffic, requests: int = 2000, replicas: int = 1, seed: int = 0,
             warmup: float = 0.1) -> list[SimRequest]:
    """The finished requests, past the first `warmup` share (the queue filling from empty), after `requests`
    have arrived. Several replicas share the arrivals through a least-outstanding-requests balancer. The same seed
    draws the same lengths and unit-rate gaps, scaled by the rate, so results vary smoothly with it."""
    rng = random.Random(seed)
    lengths = [(max(1, traffic.prompt_tokens.sample(rng)), max(1, traffic.output_tokens.sample(rng)))
               for _ in range(requests)]
    gaps = [rng.expovariate(1.0) for _ in range(requests)]
    think_rng = random.Random(seed + 1)
    pool = [Replica(model, jitter_at=rng.randrange(max(1, len(model.step.jitter)))) for _ in range(replicas)]
    arrivals: list[tuple[float, int, int]] = []  # heap of (time, order, user)
    drawn = 0

    def arrive(t: float, user: int) -> None:
        nonlocal drawn
        if drawn < requests:
            heapq.heappush(arrivals, (t, drawn, user))
            drawn += 1

    if traffic.rate is not None:
        t = 0.0
        for g in gaps:
            t += g / traffic.rate
            arrive(t, -1)
    else:
        for u in range(traffic.users):
            arrive(0.0, u)

    def admit(until: float, scheduling: Replica | None = None) -> None:
        """Hand the arrivals up to `until` to the replica with the fewest outstanding requests; one that is idle
        starts a step (except `scheduling`, whose next step the caller starts once they are in)."""
        while arrivals and arrivals[0][0] <= until:
            t, order, user = heapq.heappop(arrivals)
            target = min(pool, key=lambda r: r.outstanding)
            target.waiting.append(SimRequest(t, *lengths[order], user))
            if target.busy_until == math.inf and target is not scheduling:
                target.start_step(t)

    finished: list[SimRequest] = []
    while arrivals or any(r.busy_until < math.inf for r in pool):
        replica = min(pool, key=lambda r: r.busy_until)
        if arrivals and arrivals[0][0] < replica.busy_until:
            admit(arrivals[0][0])
            continue
        now = replica.busy_until
        for r in replica.finish_step():
            finished.append(r)
            if r.user >= 0:
                think = think_rng.expovariate(1 / traffic.think_time_s) if traffic.think_time_s > 0 else 0.0
                arrive(now + think, r.user)
        admit(now, replica)  # what arrives as a step ends joins the next one (a user who does not think, say)
        replica.start_step(now)
    finished.sort(key=lambda r: r.arrival)
    return finished[int(len(finished) * warmup):]


@dataclass(frozen=True)
class Percentiles:
    """The SLO's percentile of each metric over simulated (or measured) requests."""

    ttft_s: float
    tpot_s: float | None
    e2e_s: float
    output_tok_s: float  # total, over the measured span

    def meet(self, slo: SLO) -> bool:
        return (self.ttft_s <= slo.ttft_s and (self.tpot_s is None or self.tpot_s <= slo.tbt_s)
                and (slo.e2e_s is None or self.e2e_s <= slo.e2e_s))


def percentiles(done: list[SimRequest], q: float) -> Percentiles:
    if not done:
        raise ValueError("no simulated request finished: simulate more requests (the first tenth are warm-up)")
    tpots = [r.tpot for r in done if r.tpot is not None]
    span = max(r.last for r in done) - min(r.arrival for r in done)
    if span <= 0:
        raise ValueError("the simulated requests took no time: a step model of zero seconds")
    return Percentiles(percentile([r.ttft for r in done], q), percentile(tpots, q) if tpots else None,
                       percentile([r.e2e for r in done], q), sum(r.output_tokens for r in done) / span)


def keeps_up(done: list[SimRequest], share: float = 0.99) -> bool:
    """Did the replica keep up with the arrivals? Then the last request ends soon after the last arrival, and the
    arrivals span nearly all the run. Past capacity (load rho > 1) the backlog stretches the run to rho x the arrivals'
    span: this fails from rho ~ 1.01, and, conservatively, for stable queues whose waits reach 1% of the run."""
    first = min(r.arrival for r in done)
    return max(r.arrival for r in done) - first >= share * (max(r.last for r in done) - first)


def highest(meets, guess: float, integer: bool = False, steps: int = 14) -> float | None:
    """The largest x > 0 for which `meets(x)` holds, assuming it holds below some point and fails above: from
    `guess`, doubled or halved (up to 2^10 x) to bracket the point, then bisected. None: it fails even at guess/2^10
    (at 1, for integers)."""
    lo, hi = (guess, None) if meets(guess) else (None, guess)
    for _ in range(10):
        if lo is None:
            x = max(1, hi // 2) if integer else hi / 2
            if meets(x):
                lo = x
            elif integer and x == 1:
                return None
            else:
                hi = x
        elif hi is None:
            x = lo * 2
            if meets(x):
                lo = x
            else:
                hi = x
        else:
            break
    if lo is None:
        return None
    if hi is None:
        return lo
    for _ in range(steps):
        if integer and hi - lo <= 1:
            break
        mid = (lo + hi) // 2 if integer else (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo
