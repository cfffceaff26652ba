"""The main screen: headline numbers, live charts, the trade-off curve, the voice turns and the transcript,
and the keys that change the engine's mode, the load, speculation, chunked prefill and the caller.

Data arrives only as messages: a sampler worker thread reads the engine a few times a second and posts
`MetricsUpdated`; the voice link posts what happens in the conversation. The handlers fold them into the
dashboard's state (tui/model.py) and hand the widgets what they show.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal
from textual.screen import Screen
from textual.widgets import Footer
from textual.worker import Worker, WorkerError

from tui.messages import AgentSaid, MetricsUpdated, TurnMeasured, UserSaid, VoiceStatus
from tui.model import (
    SWEEP,
    VOICE_E2E_SLO_MS,
    History,
    Sample,
    TradeoffCurve,
    VoiceStats,
    format_ms,
    format_rate,
    grade,
    level_measured,
    step_users,
)
from tui.screens import MessagePrompt
from tui.voice_link import VoiceLink
from tui.widgets.charts import Spark, TimeChart
from tui.widgets.curve import TradeoffChart
from tui.widgets.headline import Headline
from tui.widgets.status import StatusLine
from tui.widgets.transcript import Transcript
from tui.widgets.turns import TurnBars

SAMPLE_PERIOD_S = 1 / 3  # three readings a second for the headline numbers
CHART_EVERY, CURVE_EVERY = 2, 3  # charts redraw every 2nd reading, the curve every 3rd: plotting is the UI's main cost
TIME_CHARTS = {  # chart id -> (history series to plot, their SLO)
    "ttft-chart": (("ttft_p50",), "ttft"),
    "tbt-chart": (("tbt_p50", "tbt_p99"), "tbt"),
    "toks-chart": (("tok_s",), None),
}


class DashboardScreen(Screen):
    BINDINGS = [
        Binding("b", "toggle_mode", "latency/batched"),
        Binding("plus,equals_sign", "users(1)", "+users", key_display="+"),
        Binding("minus", "users(-1)", "-users", key_display="-"),
        Binding("s", "speculation", "speculation"),
        Binding("c", "chunked_prefill", "chunked prefill"),
        Binding("m", "caller", "caller"),
        Binding("space", "talk", "talk"),
        Binding("slash", "type_message", "type", key_display="/"),
        Binding("r", "sweep", "sweep"),
        Binding("question_mark", "app.help", "help", key_display="?"),
        Binding("q", "app.quit", "quit"),
    ]

    def __init__(self, backend, link: VoiceLink) -> None:
        super().__init__()
        self.backend, self.link = backend, link
        self.history = History()
        self.curve = TradeoffCurve()
        self.voice = VoiceStats()
        self.sample: Sample | None = None
        self._readings = 0
        # what the keys asked for (the engine applies it at its next step; the status line shows what it did)
        self.mode = backend.options.mode
        self.users = backend.options.users
        self.speculation = True
        self.chunked_prefill = True
        self._stop_sampling = threading.Event()
        self._sampler: Worker | None = None
        self._voice: Worker | None = None
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
        with Horizontal(id="voice"):
            yield TurnBars(id="turns")
            yield Transcript(id="transcript")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#turns").border_title = "voice turns: speech end -> first reply audio"
        self.query_one("#transcript").border_title = "conversation (/ to type)"
        self._show_status()

    # ---- background work ----------------------------------------------------------------------

    def begin(self) -> None:
        """Start-up is done: the engine is there to sample."""
        engine = self.backend.engine
        if engine is not None:
            self.speculation = self.backend.can_speculate
            self.chunked_prefill = engine.policy.chunked_prefill
            if self.backend.options.connect:
                self.mode = engine.mode  # the server's
        self.backend.on_error = lambda text: self.app.call_from_thread(self.notify, text, severity="error")
        self._sampler = self.sample_forever()

    def start_voice(self, engine, caller: bool | None, on_ready) -> None:
        self._voice = self.run_worker(self.link.run(engine, caller, on_ready), thread=True, group="voice",
                                      exit_on_error=False)

    @work(thread=True, exclusive=True, group="sampler")
    def sample_forever(self) -> None:
        while not self._stop_sampling.is_set():
            started = time.monotonic()
            sample = self.backend.sample()
            if sample is not None:
                self.post_message(MetricsUpdated(sample))
            self._stop_sampling.wait(max(0.0, SAMPLE_PERIOD_S - (time.monotonic() - started)))

    async def shutdown(self) -> None:
        """Stop the sampler, the sweep and the voice loop, and wait until their threads have ended."""
        self._stop_sampling.set()
        self.link.stop()
        if self._sweep is not None:
            self._sweep.cancel()
        for worker in (self._sampler, self._voice):
            if worker is not None:
                with contextlib.suppress(WorkerError):  # one that crashed has ended too: quit anyway
                    await worker.wait()

    def on_unmount(self) -> None:
        """However the app ends, the sampler's and the voice loop's threads must end with it."""
        self._stop_sampling.set()
        self.link.stop()

    # ---- engine readings ------------------------------------------------------------------------

    def on_metrics_updated(self, message: MetricsUpdated) -> None:
        s = self.sample = message.sample
        self.history.add(s)
        self.curve.update(s)
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
            for name in ("batch", "queue", "kv_used", "acceptance"):
                latest = self.history.last(name)
                self.query_one(f"#{name}", Spark).set_data(s.t, self.history.series[name],
                                                           "-" if latest is None else f"{latest:.0f}")
        if self._readings % CURVE_EVERY == 0:
            self.query_one(TradeoffChart).set_curve(self.curve, s.slo_tok_s_per_user)

    def _show_latency(self, selector: str, ms: float | None, slo_ms: float) -> None:
        digits, unit = format_ms(ms)
        self.query_one(selector, Headline).show(digits, grade(ms, slo_ms), unit)

    def _show_status(self, note: str = "") -> None:
        sweeping = self._sweep is not None and self._sweep.is_running
        self.query_one(StatusLine).show(self.sample, self.link.caller_on, note or ("sweeping (r stops)" if sweeping else ""),
                                        self.backend.where)

    # ---- the conversation -----------------------------------------------------------------------

    def on_user_said(self, message: UserSaid) -> None:
        self.query_one(Transcript).add_user(message.text, message.typed)

    def on_agent_said(self, message: AgentSaid) -> None:
        self.query_one(Transcript).show_reply(message.response_id, message.text, message.status)

    def on_turn_measured(self, message: TurnMeasured) -> None:
        self.voice.add(message.turn)
        self.query_one(TurnBars).set_turns(self.voice.turns)
        self.query_one(Transcript).add_numbers(message.turn)
        self._show_latency("#e2e-last", self.voice.last_e2e_ms, VOICE_E2E_SLO_MS)
        self._show_latency("#e2e-p50", self.voice.p50_e2e_ms, VOICE_E2E_SLO_MS)

    def on_voice_status(self, message: VoiceStatus) -> None:
        self.query_one(Transcript).add_note(message.text, message.error)
        self._show_status()

    # ---- keys -----------------------------------------------------------------------------------

    def _has_engine(self) -> bool:
        if self.backend.engine is None:
            self.notify("the engine is still starting", severity="warning")
            return False
        return True

    def action_toggle_mode(self) -> None:
        if self._has_engine():
            self.mode = "batched" if self.mode == "latency" else "latency"
            self.backend.set_mode(self.mode)
            self.notify(f"{self.mode} mode")

    def action_users(self, direction: int) -> None:
        if self._has_engine():
            self.users = step_users(self.users, direction)
            self.apply_users()
            self.notify(f"{self.users} synthetic users")

    @work(thread=True, group="control")
    def apply_users(self) -> None:
        self.backend.set_users(self.users)  # the latest wanted level, whatever order the presses' workers run in

    def action_speculation(self) -> None:
        if not self._has_engine():
            return
        if not self.backend.can_speculate:
            self.notify("speculation is off for this run (--spec off, or a --backend that is not tradeoff)", severity="warning")
            return
        self.speculation = not self.speculation
        self.backend.set_speculation(self.speculation)
        self.notify(f"speculative decoding {'on' if self.speculation else 'off'}")

    def action_chunked_prefill(self) -> None:
        if self._has_engine():
            self.chunked_prefill = not self.chunked_prefill
            self.backend.set_chunked_prefill(self.chunked_prefill)
            self.notify(f"chunked prefill {'on' if self.chunked_prefill else 'off'}")

    def action_caller(self) -> None:
        self.link.set_caller(not self.link.caller_on)

    def action_talk(self) -> None:
        if self.link.mic_reason is not None:
            self.notify(f"no microphone: {self.link.mic_reason}; m turns the simulated caller on", severity="warning")
            return
        self.link.talk(not self.link.talking)

    def action_type_message(self) -> None:
        def send(text: str | None) -> None:
            if text:
                self.link.say(text)

        self.app.push_screen(MessagePrompt(), send)

    def action_sweep(self) -> None:
        if not self._has_engine():
            return
        if self._sweep is not None and self._sweep.is_running:
            self._sweep.cancel()
            self.notify("sweep stopped")
            return
        self._sweep = self.run_worker(self._run_sweep(), exclusive=True, group="sweep")

    async def _run_sweep(self) -> None:
        """Hold each level of SWEEP until it is measured, then go back to where the user was."""
        restore = (self.mode, self.users)
        try:
            for mode, users in SWEEP:
                self.notify(f"sweep: {mode} mode, {users} synthetic users")
                await self._go_to(mode, users)
                while self.sample is None or not level_measured(self.sample, mode, users):
                    await asyncio.sleep(0.25)
            self.notify("sweep done")
        finally:
            await self._go_to(*restore)

    async def _go_to(self, mode: str, users: int) -> None:
        if mode != self.mode:
            self.mode = mode
            self.backend.set_mode(mode)
        self.users = users
        await self.apply_users().wait()
