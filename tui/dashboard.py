"""The main screen: headline numbers, live charts, the trade-off curve, the planner panel, the voice turns and the
transcript, and the keys that change the engine's mode, the load, speculation, chunked prefill, the caller, the
workload profile and the planner's target.

Data arrives only as messages: a sampler worker thread reads the engine a few times a second and posts
`MetricsUpdated`; the voice link posts what happens in the conversation. The handlers fold them into the
dashboard's state (tui/model.py) and hand the widgets what they show. Once a second the level that holds is
measured as a sweep row (tui/planning.py); when a level has enough requests for the profile's percentile, the
planner runs on the profile's levels in a process of its own (tui/planning.py `PlanProcess`, waited on by a worker
thread) and posts `Planned`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import asdict

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.screen import Screen
from textual.widgets import Footer
from textual.worker import Worker, WorkerError

from engine import Controls
from serve.levels import min_requests
from serve.planner import PlanError, Target
from serve.profiles import PROFILES
from tui.messages import AgentSaid, MetricsUpdated, Planned, TurnMeasured, UserSaid, VoiceStatus
from tui.model import (
    History,
    Sample,
    TradeoffCurve,
    VoiceStats,
    format_ms,
    format_rate,
    grade,
    next_added_callers,
    next_mode,
    next_turn_detection,
    step_users,
)
from tui.planning import (
    LevelBook,
    PanelPlan,
    PlanProcess,
    measure,
    measured_text,
    parse_target,
    plan_lines,
    slo_text,
)
from tui.screens import LinePrompt
from tui.voice_link import VoiceLink
from tui.widgets.charts import Spark, TimeChart
from tui.widgets.curve import TradeoffChart
from tui.widgets.headline import Headline
from tui.widgets.planner import PlannerPanel
from tui.widgets.status import StatusLine
from tui.widgets.transcript import Transcript
from tui.widgets.turns import TurnBars
from voice.metrics import VOICE_SLO_MS
from voice.protocol import describe_turn_detection

SAMPLE_PERIOD_S = 1 / 3  # three readings a second for the headline numbers
CHART_EVERY, CURVE_EVERY = 2, 3  # charts redraw every 2nd reading, the curve every 3rd: plotting is the UI's main cost
UNTOLD = "(not in the server's /metrics)"
TIME_CHARTS = {  # chart id -> (history series to plot, their SLO)
    "ttft-chart": (("ttft_p50",), "ttft"),
    "tbt-chart": (("tbt_p50", "tbt_p99"), "tbt"),
    "toks-chart": (("tok_s",), None),
}


class DashboardScreen(Screen):
    BINDINGS = [
        Binding("b", "next_mode", "mode"),
        Binding("l", "long_prompt", "long prompt"),
        Binding("plus,equals_sign", "users(1)", "+users", key_display="+"),
        Binding("minus", "users(-1)", "-users", key_display="-"),
        Binding("s", "speculation", "speculation"),
        Binding("c", "chunked_prefill", "chunking"),
        Binding("m", "caller", "caller"),
        Binding("a", "add_callers", "callers"),
        Binding("v", "turn_detection", "turns"),
        Binding("space", "talk", "talk"),
        Binding("slash", "type_message", "type", key_display="/"),
        Binding("r", "sweep", "sweep"),
        Binding("p", "profile", "profile"),
        Binding("t", "target", "plan target"),
        Binding("question_mark", "app.help", "help", key_display="?"),
        Binding("q", "app.quit", "quit"),
    ]

    def __init__(self, controller, link: VoiceLink) -> None:
        super().__init__()
        self.controller, self.link = controller, link
        self.history = History()
        self.curves: dict[str, TradeoffCurve] = {}  # per profile: its levels have its lengths
        self.voice = VoiceStats()
        options = controller.options
        # the profiles `p` cycles: the shipped ones, and the user's own file's
        self.profiles = {**PROFILES, options.profile.name: options.profile}
        self.book = LevelBook()
        self.plan_users, self.price_per_hour = options.plan_users, options.price_per_hour
        self.plan: PanelPlan | None = None
        self.plan_error: str | None = None
        self.holding: tuple[str, int, int, int] | None = None  # the level being measured: mode, users, done, wanted
        self._level_start: float | None = None  # the level the book is filling
        self._level_preemptions: int | None = None
        self._completed_level: float | None = None  # the start of the last level that reached its requests
        self._plan_generation = self._planned = 0  # plans asked for, and the latest answered
        self._planner: PlanProcess | None = None  # the latest plan's process
        self._planner_lock = threading.Lock()
        self._sweep_step: tuple[int, int] | None = None  # (level, levels) while the auto-sweep runs
        self.sample: Sample | None = None  # the latest reading: what the engine is doing (mode, speculation, ...)
        # what keys asked for that no reading shows yet (a reading taken once every control was applied clears it),
        # so a second press toggles from the first press's result, not from the stale reading
        self._asked: dict[str, object] = {}
        self._readings = 0
        self._stop_sampling = threading.Event()
        self._sampler: Worker | None = None
        self._sweep: Worker | None = None

    def compose(self) -> ComposeResult:
        yield StatusLine(id="status")
        with Horizontal(id="headlines"):
            yield Headline("TTFT p50", "ms", id="ttft")
            yield Headline("TBT p50", "ms", id="tbt-p50")
            yield Headline("TBT p99", "ms", id="tbt-p99")
            yield Headline("voice E2E last", "ms", id="e2e-last")
            yield Headline("voice E2E p50", "ms", id="e2e-p50")
            yield Headline("system tok/s", "tok/s", id="tok-s")
            yield Headline("tok/s per user", "tok/s", id="tok-s-user")
        with Horizontal(id="charts"):
            yield TimeChart("TTFT p50 (ms)", [("ttft_p50", "TTFT p50", "yellow")], "ms", how="max", id="ttft-chart")
            yield TimeChart("TBT (ms)", [("tbt_p50", "p50", "green"), ("tbt_p99", "p99", "magenta")], "ms", how="max",
                            id="tbt-chart")
            yield TimeChart("system output tok/s", [("tok_s", "tok/s", "cyan")], "tok/s", id="toks-chart")
        with Horizontal(id="middle"):
            yield TradeoffChart(id="curve")
            with Grid(id="sparks"):
                yield Spark("running batch", "sequences", id="batch")
                yield Spark("queue", "waiting", id="queue")
                yield Spark("KV cache (batched)", "% used", id="kv_used")
                yield Spark("speculative acceptance", "%", id="acceptance")
        yield PlannerPanel(id="planner")
        with Horizontal(id="voice"):
            yield TurnBars(id="turns")
            yield Transcript(id="transcript")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#turns").border_title = "voice turns: speech end -> first reply audio"
        self.query_one("#transcript").border_title = "conversation (/ to type)"
        self._show_status()
        self._show_plan()

    # ---- background work ----------------------------------------------------------------------

    def begin(self) -> None:
        """Start-up is done: the engine is there to sample."""
        self.controller.on_error = lambda text: self.app.call_from_thread(self.notify, text, severity="error")
        self._sampler = self.sample_forever()

    def start_voice(self, engine, caller: bool | None, on_ready) -> None:
        self.link.start(engine, caller, on_ready)

    @work(thread=True, exclusive=True, group="sampler")
    def sample_forever(self) -> None:
        while not self._stop_sampling.is_set():
            started = time.monotonic()
            applied = self.controller.controls_applied
            sample = self.controller.sample()
            if sample is not None:
                self.post_message(MetricsUpdated(sample, applied))
            self._stop_sampling.wait(max(0.0, SAMPLE_PERIOD_S - (time.monotonic() - started)))

    async def shutdown(self) -> None:
        """Stop the sampler, the sweep and the voice loop, and wait until their threads have ended."""
        self._stop_sampling.set()
        self.link.stop()
        if self._sweep is not None:
            self._sweep.cancel()
        self._stop_planner()
        if self._sampler is not None:
            with contextlib.suppress(WorkerError):  # one that crashed has ended too: quit anyway
                await self._sampler.wait()
        await asyncio.to_thread(self.link.join)

    def on_unmount(self) -> None:
        """However the app ends, the sampler's and the voice loop's threads, and the planner's process, end with it."""
        self._stop_sampling.set()
        self.link.stop()
        self._stop_planner()

    def _stop_planner(self) -> None:
        with self._planner_lock:
            if self._planner is not None:
                self._planner.kill()  # a plan in progress is not worth waiting for

    # ---- engine readings ------------------------------------------------------------------------

    def on_metrics_updated(self, message: MetricsUpdated) -> None:
        s = self.sample = message.sample
        if message.controls_applied == self.controller.controls_sent:
            self._asked.clear()
        self.history.add(s)
        self.curve.update(s)
        if self._readings % CURVE_EVERY == 0:
            self._measure_level(s)
        self._show_latency("#ttft", s.ttft_p50_ms, s.slo_ttft_ms)
        self._show_latency("#tbt-p50", s.tbt_p50_ms, s.slo_tbt_ms)
        self._show_latency("#tbt-p99", s.tbt_p99_ms, s.slo_tbt_ms)
        self.query_one("#tok-s", Headline).show(format_rate(s.tok_s), "none")
        self.query_one("#tok-s-user", Headline).show(format_rate(s.tok_s_per_user),
                                                     grade(s.tok_s_per_user, s.slo_tok_s_per_user, higher_is_better=True))
        self._show_status()
        self._readings += 1
        if not self.is_current:  # under a modal screen: no need to redraw charts it covers
            return
        if self._readings % CHART_EVERY == 0:
            slos = {"ttft": s.slo_ttft_ms, "tbt": s.slo_tbt_ms, None: None}
            for chart_id, (names, slo) in TIME_CHARTS.items():
                self.query_one(f"#{chart_id}", TimeChart).set_data(
                    s.t, {name: self.history.series[name] for name in names}, slos[slo])
            # a server that is not tradeoff may export no KV or speculation series: say so, rather than a bare "-"
            untold = {"kv_used": s.kv_used is None, "acceptance": s.drafter is None} if self.controller.foreign else {}
            for name in ("batch", "queue", "kv_used", "acceptance"):
                latest = self.history.last(name)
                self.query_one(f"#{name}", Spark).set_data(s.t, self.history.series[name],
                                                           "-" if latest is None else f"{latest:.0f}",
                                                           UNTOLD if untold.get(name) else "")
        if self._readings % CURVE_EVERY == 0:
            self.query_one(TradeoffChart).set_curve(self.curve, s.slo_tok_s_per_user,
                                                    self.plan if self.plan and self.plan.profile == s.profile else None)

    @property
    def curve(self) -> TradeoffCurve:
        """The active profile's curve."""
        return self.curves.setdefault(self.controller.profile.name, TradeoffCurve())

    # ---- the planner ------------------------------------------------------------------------------

    def _measure_level(self, s: Sample) -> None:
        """The level that holds, as a sweep row; once it has its requests it joins the book and the planner runs."""
        reading = self.controller.level()
        if reading is None or self._asked:  # a control not yet applied: the reading's mode may be the old one
            return
        if reading.start != self._level_start:  # a new level
            self._level_start, self._level_preemptions = reading.start, s.preemptions
        profile = self.controller.profile
        wanted = min_requests(profile.slo)
        preempted = (s.preemptions - self._level_preemptions
                     if s.preemptions is not None and self._level_preemptions is not None else None)
        row = measure(reading, s.mode, s.users, profile.slo, wanted, time.monotonic(), preempted)
        self.holding = (s.mode, s.users, row["requests"] if row else 0, wanted) if s.users else None
        if row is not None and row["requests"] >= wanted:
            self._take(row, s.drafter)
        self._show_plan()

    def _take(self, row: dict, drafter: str | None) -> None:
        """Put a level's row in the book (a later, longer reading of the same level replaces it); plan on it when it
        is first complete."""
        self.book.record(self.controller.profile.name, row, drafter)
        if self._completed_level != self._level_start:
            self._completed_level = self._level_start
            self.replan()

    def replan(self) -> None:
        """Plan the active profile's levels for the target, in the planner's process (it simulates the engine)."""
        self._plan_generation += 1
        profile, engine = self.controller.profile, self.controller.engine
        options = self.controller.options
        sweep = (self.book.sweep(profile.name, engine.name, asdict(engine.policy), options.backend or options.connect)
                 if engine is not None else None)
        if sweep is None:
            self.plan, self._planned = None, self._plan_generation
            self._show_plan()
            return
        target = Target(users=self.plan_users, price_per_hour=self.price_per_hour or 1.0)
        self._plan_worker(self._plan_generation, sweep, profile, target)

    @work(thread=True, exclusive=True, group="plan", exit_on_error=False)
    def _plan_worker(self, generation: int, sweep: dict, profile, target: Target) -> None:
        with self._planner_lock:  # one plan at a time: the newest; none once the screen has stopped
            if self._planner is not None:
                self._planner.kill()
            if self._stop_sampling.is_set():
                return
            self._planner = planner = PlanProcess(sweep, profile, target, self.price_per_hour is not None)
        try:
            result = planner.result()
        except Exception as e:  # a sweep the planner refuses (PlanError), or a failure: shown on the panel either way
            self.post_message(Planned(generation, None, str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"))
            return
        self.post_message(Planned(generation, result))

    @property
    def planned(self) -> bool:
        """Has the latest plan asked for been answered?"""
        return self._planned == self._plan_generation

    def on_planned(self, message: Planned) -> None:
        if message.generation != self._plan_generation:
            return  # an answer for an older target or profile
        self.plan, self.plan_error, self._planned = message.plan, message.error, message.generation
        self._show_plan()

    def _show_plan(self) -> None:
        profile = self.controller.profile
        price = f"${self.price_per_hour:g}/replica-hour" if self.price_per_hour is not None else "no price (t sets one)"
        title = f"planner: {self.plan_users:,} users, {price}{'' if self.planned else ' · planning ...'}"
        measured = measured_text(profile.name, self.book, self.holding)
        if self.plan_error is not None:
            lines = [f"no plan: {self.plan_error}"]
        elif self.plan is not None and self.plan.profile == profile.name:
            lines = plan_lines(self.plan, profile)
        else:
            lines = ["no plan yet: a level counts once it has the requests its percentile needs"]
        self.query_one(PlannerPanel).show(title, f"{slo_text(profile)} · {measured}", lines)

    def _show_latency(self, selector: str, ms: float | None, slo_ms: float) -> None:
        digits, unit = format_ms(ms)
        self.query_one(selector, Headline).show(digits, grade(ms, slo_ms), unit)

    def _show_status(self, note: str = "") -> None:
        sweeping = self._sweep is not None and self._sweep.is_running and self._sweep_step is not None
        if sweeping and not note:
            done, levels = self._sweep_step
            got = f", {self.holding[2]}/{self.holding[3]} requests" if self.holding else ""
            note = f"sweep {done}/{levels}{got} (r stops)"
        turns = describe_turn_detection(self.link.turn_detection) if self.link.turn_detection is not None else ""
        if turns and self.voice.cut_offs:
            turns += f" · {self.voice.cut_offs} cut off"
        if turns and self.voice.goodput is not None:
            turns += f" · goodput {self.voice.goodput:.0%} (≤ {VOICE_SLO_MS:.0f} ms)"
        self.query_one(StatusLine).show(self.sample, self.link.caller_on, note, self.controller.where, turns,
                                        self.link.added_callers)

    # ---- the conversation -----------------------------------------------------------------------

    def on_user_said(self, message: UserSaid) -> None:
        self.query_one(Transcript).add_user(message.text, message.typed)

    def on_agent_said(self, message: AgentSaid) -> None:
        self.query_one(Transcript).show_reply(message.response_id, message.text, message.status)

    def on_turn_measured(self, message: TurnMeasured) -> None:
        self.voice.add(message.turn)
        self.query_one(TurnBars).set_turns(self.voice.turns)
        if not message.turn.caller:  # an added caller's conversation is not in the transcript
            self.query_one(Transcript).add_numbers(message.turn)
        self._show_latency("#e2e-last", self.voice.last_e2e_ms, VOICE_SLO_MS)
        self._show_latency("#e2e-p50", self.voice.p50_e2e_ms, VOICE_SLO_MS)
        self._show_status()

    def on_voice_status(self, message: VoiceStatus) -> None:
        self.query_one(Transcript).add_note(message.text, message.error)
        self._show_status()

    # ---- keys -----------------------------------------------------------------------------------

    def _reading(self) -> Sample | None:
        """The latest reading, which the keys that toggle start from; None (with a note) before there is one."""
        if self.controller.engine is None or self.sample is None:
            self.notify("the engine is still starting", severity="warning")
            return None
        return self.sample

    def _now(self, name: str, reading: object) -> object:
        """A setting as it is, or will be once the controls sent are applied."""
        return self._asked.get(name, reading)

    def _ask(self, **controls: object) -> None:
        self._asked.update(controls)
        self.controller.control(Controls(**controls))

    def action_next_mode(self) -> None:
        if (s := self._reading()) is not None:
            mode = next_mode(self._now("mode", s.mode))
            self._ask(mode=mode)
            self.notify(f"{mode} mode" + (" (starting its two worker processes)" if mode == "disaggregated" else ""))

    def action_long_prompt(self) -> None:
        """One long prompt arrives among the users: the TBT spike (batched, chunked prefill off), its spreading
        (chunked on) or its absence (disaggregated) shows in the TBT chart."""
        if self._reading() is not None:
            tokens = self.controller.long_prompt()
            self.notify(f"a prompt of {tokens} tokens arrives: watch TBT p99")

    def action_users(self, direction: int) -> None:
        if self._reading() is not None:
            users = step_users(self.controller.users, direction)
            self.controller.set_users(users)
            self.notify(f"{users} synthetic users")

    def action_speculation(self) -> None:
        if (s := self._reading()) is None:
            return
        if not s.can_speculate:
            self.notify("speculation is off for this run (--spec off, or a --backend that is not tradeoff)", severity="warning")
            return
        on = not self._now("speculation", s.drafter is not None)
        self._ask(speculation=on)
        self.notify(f"speculative decoding {'on' if on else 'off'}")

    def action_chunked_prefill(self) -> None:
        if (s := self._reading()) is not None:
            on = not self._now("chunked_prefill", s.chunked_prefill)
            self._ask(chunked_prefill=on)
            self.notify(f"chunked prefill {'on' if on else 'off'}")

    def action_caller(self) -> None:
        self.link.set_caller(not self.link.caller_on)

    def action_add_callers(self) -> None:
        """Callers added beside the first, each on a session of its own: 1, 3, 7, then none (2, 4, 8 callers in all,
        as `bench voice --callers` runs them). Their turns join the bars, the E2E numbers and the voice goodput."""
        n = next_added_callers(self.link.added_callers)
        self.link.set_added_callers(n)
        self.notify(f"{n} simulated callers added (their turns are marked c1, c2, ...)" if n else "added callers stopped")

    def action_turn_detection(self) -> None:
        self.link.set_turn_detection(next_turn_detection(self.link.turn_detection))

    def action_talk(self) -> None:
        if self.link.mic_reason is not None:
            self.notify(f"no microphone: {self.link.mic_reason}; m turns the simulated caller on", severity="warning")
            return
        self.link.talk(not self.link.talking)

    def action_type_message(self) -> None:
        def send(text: str | None) -> None:
            if text:
                self.link.say(text)

        self.app.push_screen(LinePrompt(), send)

    def action_profile(self) -> None:
        """The next workload profile: the synthetic users take its lengths, the colours and the planner its SLO."""
        if self._reading() is None:
            return
        names = list(self.profiles)
        profile = self.profiles[names[(names.index(self.controller.profile.name) + 1) % len(names)]]
        self.controller.set_profile(profile)
        self.notify(slo_text(profile))
        self.plan_error = None
        self.replan()

    def action_target(self) -> None:
        def apply(text: str | None) -> None:
            if not text:
                return
            try:
                self.plan_users, self.price_per_hour = parse_target(text, self.price_per_hour)
            except PlanError as e:
                self.notify(str(e), severity="error")
                return
            self.plan_error = None
            self.replan()

        self.app.push_screen(LinePrompt("Users to plan for, and a price per replica-hour (Enter sets, Escape cancels):",
                                        f"{self.plan_users} {self.price_per_hour or 2.5:g}"), apply)

    def action_sweep(self) -> None:
        if self._reading() is None:
            return
        if self._sweep is not None and self._sweep.is_running:
            self._sweep.cancel()
            self.notify("sweep stopped")
            return
        self._sweep = self.run_worker(self._run_sweep(), exclusive=True, group="sweep")

    async def _run_sweep(self) -> None:
        """Hold latency mode with 1 user, then batched mode at each level of the ladder, each until it has the requests
        the profile's percentile needs (or its time cap: then it counts as capped), then go back to where the user was."""
        restore = (self._now("mode", self.sample.mode), self.controller.users)
        options = self.controller.options
        ladder = [("latency", 1), *(("batched", n) for n in options.sweep_users)]
        try:
            for i, (mode, users) in enumerate(ladder, 1):
                self._sweep_step = (i, len(ladder))
                self._go_to(mode, users)
                started = time.monotonic()
                while not self._measured(mode, users):
                    if time.monotonic() - started > options.level_s:
                        self._take_capped(mode, users)
                        break
                    await asyncio.sleep(0.25)
            self.notify("sweep done")
        finally:
            self._sweep_step = None
            self._go_to(*restore)

    def _measured(self, mode: str, users: int) -> bool:
        """Has the level that holds now, at (mode, users), reached its requests?"""
        s = self.sample
        return self._completed_level == self.controller.level_start and s.mode == mode and s.users == users

    def _take_capped(self, mode: str, users: int) -> None:
        """A level that ran out of time: what it measured joins the book, marked capped (or, if not even its
        warm-up ended, nothing does)."""
        reading, s = self.controller.level(), self.sample
        profile = self.controller.profile
        row = (measure(reading, mode, users, profile.slo, min_requests(profile.slo), time.monotonic())
               if reading is not None and s.mode == mode and s.users == users else None)
        if row is not None and row["requests"] > 0:
            self._take(row, s.drafter)
            self.notify(f"sweep: {mode} N={users} capped after {self.controller.options.level_s:g} s "
                        f"with {row['requests']} requests", severity="warning")
        else:
            self.notify(f"sweep: {mode} N={users} finished no measured request in "
                        f"{self.controller.options.level_s:g} s", severity="warning")

    def _go_to(self, mode: str, users: int) -> None:
        if mode != self._now("mode", self.sample.mode):
            self._ask(mode=mode)
        self.controller.set_users(users)
