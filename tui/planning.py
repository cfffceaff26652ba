"""The planner panel's numbers, apart from any widget: the load levels measured in this session, kept per workload
profile as the sweep rows `tradeoff plan` reads (serve/levels.py), what the planner (serve/planner.py) makes of
them, and the panel's lines.

A level is the time between two changes of mode, load or profile. Its row starts after each user's first reply
(warm-up, as in the sweep) and counts once `min_requests` have completed (100 for a p99); the auto-sweep also
takes a level that ran out of time, marked capped. Rows of one profile share its lengths, so its levels form one
sweep; switching profile starts (or returns to) that profile's own.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass, field

from engine.metrics import RequestMetrics
from engine.stats import SLO
from serve.levels import completed, level_row
from serve.planner import MAX_PRICE, MAX_USERS, PlanError, PlanRow, Target, answer, level_from, plan
from serve.profiles import Profile


@dataclass(frozen=True)
class LevelReading:
    """The load level that holds now: since `start` (monotonic), the synthetic requests sent in it and, from an engine
    in this process, its batched steps (decode rows, prefill tokens, seconds); None where they are not measured."""

    start: float
    requests: list[RequestMetrics]
    steps: list[tuple[int, int, float]] | None


def measure(reading: LevelReading, mode: str, users: int, slo: SLO | None, wanted: int, now: float,
            preemptions: int | None = None) -> dict | None:
    """The level's sweep row so far: from the end of its warm-up (each user's first reply) to `now`; None while
    the warm-up lasts or without synthetic users."""
    if users < 1:
        return None
    ends = sorted(m.emissions[-1][0] for m in completed(reading.requests, reading.start, now))
    if len(ends) <= users:
        return None
    start = math.nextafter(ends[users - 1], math.inf)  # just after the last warm-up reply
    return level_row(mode, users, reading.requests, start, now, slo or SLO(), wanted, steps=reading.steps,
                     preemptions=preemptions)


@dataclass
class LevelBook:
    """The measured levels: profile name -> (mode, users) -> sweep row; a level measured again replaces its row.
    Latency mode's rows remember the drafter they ran with (the planner names the configuration by it)."""

    rows: dict[str, dict[tuple[str, int], dict]] = field(default_factory=dict)
    drafters: dict[str, str | None] = field(default_factory=dict)

    def record(self, profile: str, row: dict, drafter: str | None = None) -> None:
        self.rows.setdefault(profile, {})[(row["mode"], row["concurrency"])] = row
        if row["mode"] == "latency":
            self.drafters[profile] = drafter

    def sweep(self, profile: str, model: str, policy: dict, backend: str | None) -> dict | None:
        """This profile's levels as a sweep (the JSON `tradeoff bench sweep` writes); None before any."""
        levels = self.rows.get(profile)
        if not levels:
            return None
        return {"model": model, "profile": profile, "policy": policy, "latency": {"drafter": self.drafters.get(profile)},
                "backend": backend, "rows": [levels[k] for k in sorted(levels)]}


def parse_target(text: str, price: float | None) -> tuple[int, float | None]:
    """'500' or '500 2.50' (or '500 $2.50'): users to plan for, and a price per replica-hour (else `price` stays);
    PlanError for anything else, or for values the planner refuses."""
    parts = text.replace("$", " ").split()
    try:
        users = int(parts[0].replace(",", "").replace("_", ""))
        if len(parts) > 2:
            raise ValueError
        new_price = float(parts[1]) if len(parts) == 2 else price
    except (IndexError, ValueError):
        raise PlanError(f"give users and a price per replica-hour, such as '500 2.50'; got {text!r}") from None
    if not 1 <= users <= MAX_USERS:
        raise PlanError(f"the users to plan for must be in [1, {MAX_USERS:,}], got {users}")
    if new_price is not None and not (math.isfinite(new_price) and 0 < new_price <= MAX_PRICE):
        raise PlanError(f"the price per replica-hour must be in (0, {MAX_PRICE:,}], got {new_price:g}")
    return users, new_price


@dataclass(frozen=True)
class PanelPlan:
    """What the planner made of a profile's sweep: its rows, and which measured levels meet the SLO (the curve shades
    them), with each mode's largest such level (its knee: where it operates at the SLO)."""

    profile: str
    target: Target
    priced: bool  # a price was given (else the costs are per unit price and not shown)
    rows: tuple[PlanRow, ...]
    feasible: frozenset[tuple[str, int]]
    knees: dict[str, int]


def feasible_levels(sweep: dict, slo: SLO | None) -> frozenset[tuple[str, int]]:
    """The (mode, users) levels whose percentiles meet `slo` (every one, without an SLO)."""
    out = set()
    for row in sweep["rows"]:
        if slo is None or level_from(row, slo, "dashboard").at.meet(slo):
            out.add((row["mode"], int(row["concurrency"])))
    return frozenset(out)


def knees(feasible: frozenset[tuple[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for mode, users in feasible:
        out[mode] = max(users, out.get(mode, 0))
    return out


def plan_panel(sweep: dict, profile: Profile, target: Target, priced: bool) -> PanelPlan:
    """The planner on the dashboard's sweep."""
    rows = plan(sweep, profile, target, where="the dashboard's levels", checks=False)
    feasible = feasible_levels(sweep, profile.slo)
    return PanelPlan(profile.name, target, priced, tuple(rows), feasible, knees(feasible))


class PlanProcess:
    """`plan_panel` in a process of its own (`python -m tui.planning`, arguments and answer pickled over its pipes),
    at a lower priority. The planner simulates the engine for seconds of pure Python: in a thread it would hold the
    GIL from the engine's worker (multi-second token gaps). A process per plan: a newer plan kills an older one, and
    nothing outlives the dashboard (multiprocessing's pools also fail under Textual, whose stderr has no fd)."""

    def __init__(self, sweep: dict, profile: Profile, target: Target, priced: bool) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "tui.planning"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._arguments = pickle.dumps((sweep, profile, target, priced))

    def result(self) -> PanelPlan:
        """Wait for the answer; PlanError if the planner refused the sweep, RuntimeError if the process failed."""
        out, err = self.process.communicate(self._arguments)
        if self.process.returncode != 0:
            raise RuntimeError(f"the planner's process ended with status {self.process.returncode}: "
                               f"{err.decode(errors='replace').strip()[-500:]}")
        answer = pickle.loads(out)  # our own child's output
        if isinstance(answer, Exception):
            raise answer
        return answer

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


def main() -> None:
    """The planner's process: arguments from stdin, the PanelPlan (or the PlanError) to stdout."""
    if hasattr(os, "nice"):
        os.nice(10)  # the engine it plans from comes first
    sweep, profile, target, priced = pickle.loads(sys.stdin.buffer.read())
    try:
        answer: PanelPlan | Exception = plan_panel(sweep, profile, target, priced)
    except ValueError as e:  # PlanError and the like: the panel shows the message
        answer = e
    sys.stdout.buffer.write(pickle.dumps(answer))


def slo_text(profile: Profile) -> str:
    slo = profile.slo
    if slo is None:
        return f"profile {profile.name}: no latency target (throughput and cost decide)"
    e2e = f", E2E ≤ {slo.e2e_s:g} s" if slo.e2e_s is not None else ""
    return (f"profile {profile.name}: p{slo.percentile:g} TTFT ≤ {slo.ttft_s * 1000:.0f} ms, TBT ≤ {slo.tbt_s * 1000:.0f} ms"
            f"{e2e}; users think {profile.workload.think_time_s:g} s")


def measured_text(profile: str, book: LevelBook, holding: tuple[str, int, int, int] | None) -> str:
    """Which levels the plan stands on, and the one being measured: (mode, users, completed, wanted)."""
    done: dict[str, list[str]] = {}
    for (mode, users), row in sorted(book.rows.get(profile, {}).items()):
        done.setdefault(mode, []).append(f"{users}{' (capped)' if row['capped'] else ''}")
    parts = [f"{mode} N={','.join(levels)}" for mode, levels in done.items()]
    if holding is not None:
        mode, users, got, wanted = holding
        parts.append(f"measuring {mode} N={users}: {got}/{wanted} requests")
    return "measured: " + ("; ".join(parts) if parts else "nothing yet (r sweeps, or hold a level)")


def plan_lines(p: PanelPlan, profile: Profile) -> list[str]:
    """One line per configuration, then the answer."""
    unit = p.target.unit
    lines = []
    for r in p.rows:
        if r.replicas is None:
            lines.append(f"{r.configuration}: {r.unmet}; {r.limit}")
            continue
        rate = f" ({r.rate_per_replica:.2f} req/s)" if r.rate_per_replica else ""
        cost = (f", {unit}{r.cost_per_month:,.0f}/month, {unit}{r.cost_per_mtok_at_slo:.2f} per 1M tokens"
                if p.priced and r.cost_per_month and r.cost_per_mtok_at_slo else "")
        lines.append(f"{r.configuration}: {r.users_per_replica} users{rate} per replica at the SLO; "
                     f"{p.target.users:,} users need {r.replicas} replica{'s' * (r.replicas != 1)}{cost}; {r.limit}")
    if p.priced:
        lines.append(answer(list(p.rows), profile, p.target))
    else:
        meeting = [r for r in p.rows if r.replicas]
        best = min(meeting, key=lambda r: r.replicas) if meeting else None
        lines.append(f"fewest replicas: {best.configuration}, {best.replicas}" if best else "no configuration meets the SLO")
    return lines


if __name__ == "__main__":
    from tui import planning  # run as the module itself: its classes pickle under its name, not __main__'s

    planning.main()
