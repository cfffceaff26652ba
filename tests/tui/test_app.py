"""Pilot tests of the dashboard on the real engine and voice loop: start-up with the default model and the
simulated caller, numbers that update, the keys (checked on the engine and the load generator, not on
labels), a typed message and its reply, a clean quit, and attaching to a running server (--connect)."""

import asyncio
import math
import os
import threading
from dataclasses import replace
from pathlib import Path

from serve.profiles import PROFILES, load_profile
from serve.remote import RemoteEngine
from tests.tui.conftest import wait_for
from tui.app import TradeoffApp
from tui.controller import Controller, Options
from tui.model import format_ms
from tui.screens import LinePrompt
from tui.widgets.headline import Headline
from tui.widgets.planner import PlannerPanel
from tui.widgets.status import StatusLine
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
    # processes of earlier tests may live on for the whole run (multiprocessing's resource tracker, once a test has
    # spawned a worker): what counts is that the app adds none
    children_before = set(child_processes())
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
    assert not any(t.name == "engine" and t.is_alive() and t not in threads_before for t in threading.enumerate()), \
        "the app's engine worker is still up"
    # every thread the app started has ended (the test loop's own idle executor threads are not the app's)
    leftover = [t.name for t in threading.enumerate() if t not in threads_before and not t.name.startswith("asyncio_")]
    assert leftover == []
    assert set(child_processes()) <= children_before


def state(engine):
    return engine.snapshot().state


async def test_b_l_s_and_c_change_the_engine(engine):
    app = app_on(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.ready, 60, "start-up")
        await wait_for(pilot, lambda: app.dashboard.sample is not None, 10, "a first reading")
        assert state(engine).mode == "latency"
        await pilot.press("b")
        await wait_for(pilot, lambda: state(engine).mode == "batched", 30, "batched mode")
        await wait_for(pilot, lambda: app.dashboard.sample.mode == "batched", 10, "a sample in batched mode")
        await pilot.press("b")
        await wait_for(pilot, lambda: state(engine).mode == "disaggregated", 60, "disaggregated mode")
        # `l`: a long prompt arrives, runs on the prefill worker and is handed to the decode worker
        handoffs = state(engine).workers.handoffs
        await pilot.press("l")
        await wait_for(pilot, lambda: state(engine).workers.handoffs > handoffs, 60, "the long prompt's hand-off")
        await wait_for(pilot, lambda: "DISAGGREGATED" in str(app.dashboard.query_one(StatusLine).render()), 10,
                       "the status line to name the mode")
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


QUICK = """
description = "short requests, so that a sweep fits in a test"
think_time_s = 0.5
prompt_tokens = { mean = 40, stdev = 8, lo = 24, hi = 64 }
output_tokens = { mean = 6, stdev = 1, lo = 4, hi = 8 }
slo = { ttft_s = 3.0, tbt_s = 1.0, percentile = 50 }
"""


def panel_text(app) -> str:
    return str(app.dashboard.query_one(PlannerPanel).render())


async def test_the_auto_sweep_fills_the_planner_which_follows_the_target_and_the_profile(engine, tmp_path):
    (tmp_path / "quick.toml").write_text(QUICK)
    quick = load_profile(str(tmp_path / "quick.toml"))
    app = app_on(engine, profile=quick, sweep_users=(1, 2), plan_users=40, price_per_hour=2.0)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.ready, 60, "start-up")
        await wait_for(pilot, lambda: app.dashboard.sample is not None, 10, "a first reading")
        dash, loadgen = app.dashboard, app.controller.loadgen
        assert loadgen.workload == replace(quick.workload, think_time_s=0.0)  # the profile's lengths, back to back
        assert dash.sample.slo_ttft_ms == 3000.0 and dash.plan is None
        await pilot.press("r")
        # latency mode at 1 user, then batched at 1 and 2, each until 20 requests (a p50's) completed after warm-up
        await wait_for(pilot, lambda: dash._sweep is not None and not dash._sweep.is_running and dash.planned
                       and dash.plan is not None, 240, "the sweep and its plan")
        rows = dash.book.rows["quick"]
        assert sorted(rows) == [("batched", 1), ("batched", 2), ("latency", 1)]
        assert all(r["requests"] >= 20 and not r["capped"] for r in rows.values())
        # batched mode's steps, timed in this process, with as many decode rows as it had users
        assert {n for n, _, _ in rows[("batched", 1)]["steps"]} <= {0, 1} and "steps" not in rows[("latency", 1)]
        assert max(n for n, _, _ in rows[("batched", 2)]["steps"]) == 2
        # the sweep went back to where the user was: latency mode, no synthetic users
        await wait_for(pilot, lambda: dash.sample.mode == "latency" and loadgen.users == 0, 10, "the user's level")
        # a target this loose is met at every level: replicas = ceil(users x 1.2 / users per replica)
        plan = dash.plan
        assert plan.feasible == set(rows) and plan.knees == {"batched": 2, "latency": 1}
        for row in plan.rows:
            assert row.users_per_replica >= 1 and row.replicas == math.ceil(40 * 1.2 / row.users_per_replica - 1e-9)
            assert row.cost_per_hour == row.replicas * 2.0
            assert f"{row.users_per_replica} users" in panel_text(app)
        # a new target through the input line: the same levels, re-planned
        await pilot.press("t")
        await wait_for(pilot, lambda: isinstance(app.screen, LinePrompt), 5, "the target prompt")
        app.screen.query_one("Input").value = ""
        await pilot.press(*"4000", "space", *"3", "enter")
        await wait_for(pilot, lambda: dash.planned and dash.plan.target.users == 4000, 60, "the new plan")
        for row in dash.plan.rows:
            assert row.replicas == math.ceil(4000 * 1.2 / row.users_per_replica - 1e-9)
            assert row.cost_per_hour == row.replicas * 3.0
        assert "4,000 users" in panel_text(app)
        # a bad target is refused with a message and changes nothing
        await pilot.press("t")
        await wait_for(pilot, lambda: isinstance(app.screen, LinePrompt), 5, "the target prompt")
        app.screen.query_one("Input").value = ""
        await pilot.press(*"-3", "enter")
        await wait_for(pilot, lambda: not isinstance(app.screen, LinePrompt), 5, "the prompt to close")
        assert dash.plan_users == 4000 and dash.price_per_hour == 3.0
        # the next profile: its lengths, its SLO in the colours, its own (empty) levels
        await pilot.press("p")
        chat = PROFILES["chat"]
        await wait_for(pilot, lambda: dash.sample.profile == "chat", 10, "a reading under the chat profile")
        assert app.controller.profile == chat and loadgen.workload.prompt_tokens == chat.workload.prompt_tokens
        assert dash.sample.slo_ttft_ms == chat.slo.ttft_s * 1000
        await wait_for(pilot, lambda: dash.plan is None, 10, "no plan for chat's lengths yet")
        assert "profile chat: p99 TTFT ≤ 500 ms" in panel_text(app) and "no plan yet" in panel_text(app)
        # and back (through code, rag, voice, batch): quick's levels and plan again
        await pilot.press(*"ppppp")
        await wait_for(pilot, lambda: dash.planned and dash.plan is not None and dash.plan.profile == "quick", 60,
                       "quick's plan again")
        await pilot.press("q")


async def test_v_cycles_the_voice_sessions_turn_detection_as_the_server_confirms_it(engine):
    app = app_on(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.ready and app.link.turn_detection is not None, 60, "start-up")
        assert app.link.turn_detection["type"] == "server_vad"
        seen = []
        for _ in range(4):
            before = app.link.turn_detection
            await pilot.press("v")
            await wait_for(pilot, lambda before=before: app.link.turn_detection != before, 10, "the server to confirm it")
            td = app.link.turn_detection
            seen.append(td.get("eagerness") if td["type"] == "semantic_vad" else td["silence_duration_ms"])
        assert seen == ["high", "medium", "low", 300]  # then round to the start
        status = str(app.dashboard.query_one(StatusLine).render())
        assert "turns server_vad 300 ms" in status, status


async def test_a_adds_callers_on_sessions_of_their_own_whose_turns_are_measured_and_stops_them(engine):
    app = app_on(engine)  # the first caller off: every turn measured comes from an added one
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.ready and app.link.turn_detection is not None, 60, "start-up")
        dash = app.dashboard
        await pilot.press("a")
        await wait_for(pilot, lambda: app.link.added_callers == 1, 10, "one added caller")
        await wait_for(pilot, lambda: dash.voice.spoken, 90, "an added caller's turn")
        turn = dash.voice.spoken[0]
        assert turn.caller == 1 and turn.user_text and dict(turn.parts_ms)["endpointing"] > 0
        assert "queue" in dict(turn.parts_ms)
        assert all(e.numbers is None for e in dash.query_one(Transcript).entries)  # not the transcript's conversation
        status = str(dash.query_one(StatusLine).render())
        assert "+1 added" in status and "goodput" in status, status
        await pilot.press("a", "a")  # 3, then 7 callers beside the first
        await wait_for(pilot, lambda: app.link.added_callers == 7 and app.link.added_running == 7, 60, "seven")
        await pilot.press("a")  # and none
        await wait_for(pilot, lambda: app.link.added_callers == 0 and app.link.added_running == 0, 60, "none")
        assert "added" not in str(dash.query_one(StatusLine).render())
        await pilot.press("q")


async def test_a_typed_message_gets_a_reply(engine):
    app = app_on(engine)
    async with app.run_test(size=SIZE) as pilot:
        await wait_for(pilot, lambda: app.ready, 60, "start-up")
        finished = engine.snapshot().stats.user.finished
        await pilot.press("slash")
        await wait_for(pilot, lambda: isinstance(app.screen, LinePrompt), 5, "the message prompt")
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
    """`b` three times takes the server's engine through the three modes and back; a typed "Hello" gets a reply
    through it, and the dashboard's numbers count it."""
    await wait_for(pilot, lambda: app.dashboard.sample is not None, 10, "a first reading")
    modes = [state(engine).mode]
    for _ in range(3):
        await pilot.press("b")
        await wait_for(pilot, lambda: state(engine).mode != modes[-1], 60, "the server's mode to change")
        modes.append(state(engine).mode)
    assert modes[-1] == modes[0] and set(modes) == {"latency", "batched", "disaggregated"}
    await pilot.press("slash")
    await wait_for(pilot, lambda: isinstance(app.screen, LinePrompt), 5, "the message prompt")
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
