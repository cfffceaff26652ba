"""Pilot tests of the dashboard on the real engine and voice loop: start-up with the default model and the
simulated caller, numbers that update, the keys (checked on the engine and the load generator, not on
labels), a typed message and its reply, a clean quit, and attaching to a running server (--connect)."""

import asyncio
import os
import threading
from pathlib import Path

from serve.remote import RemoteEngine
from tests.tui.conftest import wait_for
from tui.app import TradeoffApp
from tui.controller import Controller, Options
from tui.model import format_ms
from tui.screens import MessagePrompt
from tui.widgets.headline import Headline
from tui.widgets.transcript import Transcript

SIZE = (160, 60)


def child_processes() -> list[int]:
    """Live (not zombie) processes whose parent is this one."""
    me, children = str(os.getpid()), []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == me and not fields.get("State", "").startswith("Z"):
            children.append(int(status.parent.name))
    return children


def app_on(engine, **options) -> TradeoffApp:
    """The dashboard on the shared engine, without the simulated caller unless asked."""
    opts = Options(**{"caller": False, **options})
    return TradeoffApp(opts, controller=Controller(opts, engine=engine))


async def test_starts_with_the_default_model_and_the_caller_the_numbers_update_and_q_quits_cleanly():
    threads_before = set(threading.enumerate())
    app = TradeoffApp(Options())  # loads the default model itself; no microphone here, so the caller is on
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.ready, 120, "start-up")
        engine, dash = app.controller.engine, app.dashboard
        assert engine.name == "smollm2-135m" and app.link.caller_on
        # the caller's first spoken turn is answered and measured end to end
        await wait_for(pilot, lambda: dash.voice.spoken, 90, "a spoken turn")
        turn = dash.voice.spoken[0]
        assert turn.user_text and turn.reply_text and turn.e2e_ms > 0
        assert dict(turn.parts_ms)["endpointing"] > 0
        # the numbers come from the engine and keep coming
        await wait_for(pilot, lambda: dash.sample is not None and dash.sample.ttft_p50_ms is not None, 30, "a TTFT")
        first = dash.sample
        await wait_for(pilot, lambda: dash.sample.t > first.t + 1, 10, "later samples")
        s = dash.sample
        assert dash.query_one("#ttft", Headline).text == format_ms(s.ttft_p50_ms)[0]
        assert dash.query_one("#e2e-last", Headline).text == format_ms(dash.voice.last_e2e_ms)[0] != "-"
        await pilot.press("q")
        await wait_for(pilot, lambda: not app.is_running, 60, "the app to exit")
    assert not any(t.name == "engine" and t.is_alive() for t in threading.enumerate()), "the engine's worker is still up"
    # every thread the app started has ended (the test loop's own idle executor threads are not the app's)
    leftover = [t.name for t in threading.enumerate() if t not in threads_before and not t.name.startswith("asyncio_")]
    assert leftover == []
    assert child_processes() == []


def state(engine):
    return engine.snapshot().state


async def test_b_s_and_c_change_the_engine(engine):
    app = app_on(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.ready, 60, "start-up")
        await wait_for(pilot, lambda: app.dashboard.sample is not None, 10, "a first reading")
        assert state(engine).mode == "latency"
        await pilot.press("b")
        await wait_for(pilot, lambda: state(engine).mode == "batched", 30, "batched mode")
        await wait_for(pilot, lambda: app.dashboard.sample.mode == "batched", 10, "a sample in batched mode")
        await pilot.press("b")
        await wait_for(pilot, lambda: state(engine).mode == "latency", 30, "latency mode")
        drafter = state(engine).speculation.drafter
        assert drafter is not None
        # two presses in a row, faster than a reading: the second toggles from the first one's result
        await pilot.press("s", "s")
        await wait_for(pilot, lambda: app.controller.controls_applied == app.controller.controls_sent, 10, "the controls")
        assert state(engine).speculation.drafter == drafter
        await pilot.press("s")
        await wait_for(pilot, lambda: state(engine).speculation.drafter is None, 10, "speculation off")
        await pilot.press("s")
        await wait_for(pilot, lambda: state(engine).speculation.drafter == drafter, 10, "speculation on")
        chunked = state(engine).chunked_prefill
        await pilot.press("c")
        await wait_for(pilot, lambda: state(engine).chunked_prefill is not chunked, 10, "chunked prefill toggled")
        await pilot.press("c")
        await wait_for(pilot, lambda: state(engine).chunked_prefill is chunked, 10, "chunked prefill back")
        await pilot.press("q")


async def test_plus_and_minus_change_the_synthetic_users(engine):
    app = app_on(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.ready, 60, "start-up")
        await wait_for(pilot, lambda: app.dashboard.sample is not None, 10, "a first reading")
        loadgen = app.controller.loadgen
        assert loadgen.users == 0 and loadgen.submitted == []
        await pilot.press("plus")
        await wait_for(pilot, lambda: loadgen.users == 1, 10, "one user")
        await pilot.press("plus", "plus")
        await wait_for(pilot, lambda: loadgen.users == 4, 10, "four users")
        # the users really send requests to the engine
        await wait_for(pilot, lambda: len(loadgen.submitted) >= 4, 30, "synthetic requests")
        assert all(m.user_class == "synthetic" for m in loadgen.submitted)
        await wait_for(pilot, lambda: app.dashboard.sample.users == 4, 10, "a sample with four users")
        await pilot.press("minus")
        await wait_for(pilot, lambda: loadgen.users == 2, 10, "two users")
        await pilot.press("q")


async def test_a_typed_message_gets_a_reply(engine):
    app = app_on(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.ready, 60, "start-up")
        finished = engine.snapshot().stats.user.finished
        await pilot.press("slash")
        await wait_for(pilot, lambda: isinstance(app.screen, MessagePrompt), 5, "the message prompt")
        await pilot.press(*"Hi", "space", *"quick", "space", *"question!", "enter")  # q and space are text here
        transcript = app.dashboard.query_one(Transcript)
        await wait_for(pilot, lambda: any(e.role == "bot" and e.status == "completed" for e in transcript.entries), 60,
                       "the reply")
        you = next(e for e in transcript.entries if e.role == "you")
        bot = next(e for e in transcript.entries if e.role == "bot")
        assert you.text.startswith("Hi quick question!") and bot.text.strip()
        await wait_for(pilot, lambda: app.dashboard.voice.turns, 10, "the turn's numbers")
        turn = app.dashboard.voice.turns[-1]
        assert turn.typed and turn.parts_ms == () and turn.llm_ttft_ms > 0 and turn.reply_text == bot.text
        # it went through the engine as the real user's request
        assert engine.snapshot().stats.user.finished > finished
        await pilot.press("q")


async def toggle_the_servers_mode_and_say_hello(pilot, app: TradeoffApp, engine) -> None:
    """`b` twice switches the server's engine there and back; a typed "Hello" gets a reply through it, and the
    dashboard's numbers count it."""
    await wait_for(pilot, lambda: app.dashboard.sample is not None, 10, "a first reading")
    mode = state(engine).mode
    await pilot.press("b")
    await wait_for(pilot, lambda: state(engine).mode != mode, 10, "the server's mode to change")
    await pilot.press("b")
    await wait_for(pilot, lambda: state(engine).mode == mode, 10, "the server's mode to change back")
    await pilot.press("slash")
    await wait_for(pilot, lambda: isinstance(app.screen, MessagePrompt), 5, "the message prompt")
    await pilot.press(*"Hello", "enter")
    transcript = app.dashboard.query_one(Transcript)
    await wait_for(pilot, lambda: any(e.role == "bot" and e.status == "completed" for e in transcript.entries),
                   60, "the reply from the server")
    await wait_for(pilot, lambda: app.dashboard.sample is not None and app.dashboard.sample.finished >= 1, 10,
                   "the numbers to count it")


async def test_connect_attaches_to_a_running_server(engine):
    from voice.server import VoiceServer, make_services
    from voice.tts import EspeakTTS

    async with VoiceServer(make_services(engine, EspeakTTS()), port=0) as server:
        host_port = server.url.removesuffix("/v1/realtime")  # as a user types it: ws://HOST:PORT
        app = TradeoffApp(Options(connect=host_port, caller=False))
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.ready, 60, "start-up")
            assert isinstance(app.controller.engine, RemoteEngine) and app.controller.engine.tradeoff
            await wait_for(pilot, lambda: len(server.sessions) == 1, 10, "the dashboard's session on the server")
            await toggle_the_servers_mode_and_say_hello(pilot, app, engine)
            # the engine panels show the server's own numbers, which include the reply it just made
            await pilot.press("q")
            await wait_for(pilot, lambda: not app.is_running, 30, "the app to exit")
        while server.sessions:  # the client went away: the server ends its session (the test's timeout bounds this)
            await asyncio.sleep(0.05)


async def test_backend_runs_the_llm_on_another_server(engine):
    """--backend: the voice loop runs here, its LLM on another server; the numbers are measured here from its stream."""
    from voice.server import VoiceServer, make_services
    from voice.tts import EspeakTTS

    async with VoiceServer(make_services(engine, EspeakTTS()), port=0) as server:
        app = TradeoffApp(Options(backend=server.http_url.replace("http://", "openai://"), caller=False))
        async with app.run_test(size=SIZE) as pilot:
            await wait_for(pilot, lambda: app.ready, 60, "start-up")
            remote = app.controller.engine
            assert isinstance(remote, RemoteEngine) and remote.url == server.http_url
            await toggle_the_servers_mode_and_say_hello(pilot, app, engine)
            # measured here: the remote engine's own client-side stats hold the request
            assert remote.snapshot().stats.user.finished >= 1
            await pilot.press("q")
            await wait_for(pilot, lambda: not app.is_running, 30, "the app to exit")
