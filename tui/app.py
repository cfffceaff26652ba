"""The Textual app: a loading screen over the dashboard until the engine and the voice loop are up, the
help screen, and a clean quit (voice loop, sampler, synthetic users and engine stopped, every thread joined).

Start-up runs in a worker thread: the controller (model fetch on first run, model load, synthetic users),
then the voice link in a worker of its own. Quitting stops them in the reverse order.
"""

from __future__ import annotations

from pathlib import Path

from textual import work
from textual.app import App
from textual.binding import Binding

from tui.controller import Controller, Options
from tui.dashboard import DashboardScreen
from tui.messages import Loaded, LoadProgress
from tui.screens import HelpScreen, LoadingScreen
from tui.voice_link import VoiceLink


class TradeoffApp(App):
    CSS_PATH = Path(__file__).with_name("tradeoff.tcss")
    TITLE = "tradeoff"
    BINDINGS = [Binding("q", "quit", "quit"), Binding("question_mark", "help", "help")]
    SCREENS = {"help": HelpScreen}  # made once, on first use, and reused

    def __init__(self, options: Options | None = None, controller: Controller | None = None) -> None:
        super().__init__()
        self.options = options = options or Options()
        self.controller = controller or Controller(options)
        self.link = VoiceLink(self._to_dashboard, url=options.connect, asr=options.asr)
        self.dashboard = DashboardScreen(self.controller, self.link)
        self.loading = LoadingScreen()
        self.ready = False  # start-up finished (the dashboard is showing and sampling)
        self._quitting = False

    def _to_dashboard(self, message) -> None:
        self.dashboard.post_message(message)

    def on_mount(self) -> None:
        self.push_screen(self.dashboard)
        self.push_screen(self.loading)
        self.start()

    @work(thread=True, group="start", exit_on_error=False)
    def start(self) -> None:
        stages = self.controller.STAGES + 1

        def progress(step: int, _total: int, line: str) -> None:
            self.post_message(LoadProgress(step, stages, line))

        try:
            self.controller.start(progress)
        except Exception as e:
            self.post_message(Loaded(f"{type(e).__name__}: {e}"))
            return
        if self._quitting:
            return
        progress(stages, stages, "starting the voice loop (speech recognizer, TTS, server, simulated caller) ...")
        self.call_from_thread(self.dashboard.start_voice, self.controller.engine, self.options.caller,
                              lambda error: self.post_message(Loaded(voice_error=error)))

    def on_load_progress(self, message: LoadProgress) -> None:
        if self.loading.is_attached:
            self.loading.show(message.step, message.total, message.line)

    def on_loaded(self, message: Loaded) -> None:
        if message.error is not None:
            self.loading.failed(message.error)
            return
        if self.loading.is_attached:
            self.pop_screen()
        if message.voice_error is not None:
            self.dashboard.query_one("#transcript").add_note(message.voice_error, error=True)
        self.dashboard.begin()
        self.ready = True

    def action_help(self) -> None:
        self.push_screen("help")

    async def action_quit(self) -> None:
        if self._quitting:
            return
        self._quitting = True
        await self.dashboard.shutdown()
        await self.run_worker(self.controller.close, thread=True, group="close").wait()
        for worker in [w for w in self.workers if w.group == "start" and w.is_running]:
            await worker.wait()  # quit while loading: the model load cannot be interrupted; close what it made
            await self.run_worker(self.controller.close, thread=True, group="close").wait()
        self.exit()
