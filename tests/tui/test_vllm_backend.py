"""The dashboard on a server that is not tradeoff: with --backend at a fake OpenAI server that serves /metrics text
recorded from a real vLLM (tests/serve/data/, header says which), the engine panels show what that text says, and
a server without /metrics leaves them empty with a note, never an error. The voice loop is not under test here (it
needs a speech recognizer): its start is replaced by a note, as when it fails to start."""

from engine.loader import load_tokenizer
from engine.registry import DEFAULT_MODEL
from serve.remote import RemoteEngine
from tests.serve.conftest import APIServer
from tests.serve.fake_openai import FakeOpenAI, recorded
from tests.serve.test_remote_vllm import AFTER, BUSY, RECORDED_AFTER, RECORDED_BUSY
from tests.tui.conftest import wait_for
from tui.app import TradeoffApp
from tui.controller import Controller, Options
from tui.dashboard import UNTOLD
from tui.voice_link import VoiceLink
from tui.widgets.charts import Spark
from tui.widgets.status import StatusLine

SIZE = (160, 60)


def no_voice_loop(link, engine, caller, on_ready) -> None:
    on_ready("the voice loop is not started in this test")


def panel(app, name: str) -> str:
    return str(app.dashboard.query_one(f"#{name}", Spark).query_one("Label").content)


def status(app) -> str:
    return str(app.dashboard.query_one(StatusLine).content)


async def run_dashboard(fake: FakeOpenAI, check) -> None:
    with APIServer(fake.app) as server:
        remote = RemoteEngine(server.url.replace("http://", "openai://"), tokenizer=load_tokenizer(DEFAULT_MODEL))
        try:
            assert not remote.tradeoff
            options = Options(backend=server.url, caller=False)
            app = TradeoffApp(options, controller=Controller(options, engine=remote))
            async with app.run_test(size=SIZE) as pilot:
                await wait_for(pilot, lambda: app.ready, 30, "start-up")
                await check(pilot, app)
                await pilot.press("q")
                await wait_for(pilot, lambda: not app.is_running, 30, "the app to exit")
        finally:
            remote.close()


async def test_the_engine_panels_show_a_vllm_servers_metrics(monkeypatch):
    monkeypatch.setattr(VoiceLink, "start", no_voice_loop)
    fake = FakeOpenAI(recorded(RECORDED_BUSY))

    async def check(pilot, app) -> None:
        await wait_for(pilot, lambda: f"[b]{BUSY.running}[/b]" in panel(app, "batch"), 10, "the running batch")
        assert f"[b]{BUSY.waiting}[/b]" in panel(app, "queue")
        assert f"[b]{BUSY.kv_percent:.0f}[/b]" in panel(app, "kv_used")
        text = status(app)
        assert f"running {BUSY.running} · queued {BUSY.waiting} · preempted {BUSY.preemptions}" in text
        assert "speculation [b]server[/]" in text
        # acceptance is a rate over the last seconds: the counters' change from the busy text to the one after
        fake.metrics = recorded(RECORDED_AFTER)
        rate = 100 * (AFTER.accepted - BUSY.accepted) / (AFTER.drafted - BUSY.drafted)
        await wait_for(pilot, lambda: f"[b]{rate:.0f}[/b]" in panel(app, "acceptance"), 10, "the acceptance rate")
        assert f"[b]{AFTER.running}[/b]" in panel(app, "batch")

    await run_dashboard(fake, check)


async def test_a_server_without_metrics_leaves_the_panels_empty_with_a_note(monkeypatch):
    monkeypatch.setattr(VoiceLink, "start", no_voice_loop)

    async def check(pilot, app) -> None:
        await wait_for(pilot, lambda: UNTOLD in panel(app, "kv_used"), 10, "the KV panel's note")
        assert UNTOLD in panel(app, "acceptance") and "[b]-[/b]" in panel(app, "kv_used")
        assert "[b]0[/b]" in panel(app, "batch")  # what this client has in flight: nothing
        assert "preempted -" in status(app)

    await run_dashboard(FakeOpenAI(None), check)
