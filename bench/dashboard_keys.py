"""`tradeoff bench keys`: how fast the dashboard answers keys while the engine is saturated.

The dashboard runs headless at 160 x 60 on the real engine, in batched mode with N synthetic users and the
simulated caller talking, as `tradeoff --batched --users N` would. After a warm-up it presses, in turn, `?`
(the help screen opens), `escape` (the dashboard comes back: the whole screen is drawn again) and `s`
(speculation toggles and a notice pops up), and times each press from posting the key event to
- key: the UI loop taking the key (its action runs then), and
- frame: the first frame composed after that, turned into terminal output (headless, it is not written).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from textual import events

from bench.report import table, write_json
from engine.metrics import percentile

KEYS = ("question_mark", "escape", "s")


async def measure(users: int, presses: int, warmup_s: float) -> tuple[list[dict], dict]:
    from tui.backend import Options

    from tui.app import TradeoffApp

    seen: dict[str, float] = {}

    def hook(message) -> None:
        if isinstance(message, events.Key):
            seen.setdefault("key", time.perf_counter())

    app = TradeoffApp(Options(mode="batched", users=users, caller=True))

    def frame_timed(display):
        """App._display gets each composed update; headless it writes nothing, so build the output here."""
        def timed(screen, update) -> None:
            display(screen, update)
            if update is not None and "key" in seen and "frame" not in seen:
                if hasattr(update, "render_segments"):
                    update.render_segments(app.console)
                seen["frame"] = time.perf_counter()
        return timed

    rows = []
    async with app.run_test(size=(160, 60), message_hook=hook, notifications=True) as pilot:
        while not app.ready:
            await pilot.pause(0.2)
        app._display = frame_timed(app._display)
        await pilot.pause(warmup_s)
        for i in range(presses):
            key = KEYS[i % len(KEYS)]
            seen.clear()
            t0 = time.perf_counter()
            await pilot.press(key)
            while "frame" not in seen:
                await pilot.pause(0.01)
            rows.append({"key": key, "key_ms": (seen["key"] - t0) * 1000, "frame_ms": (seen["frame"] - t0) * 1000})
            await pilot.pause(0.5)
        state = app.dashboard.sample
        await pilot.press("q")
        while app.is_running:
            await pilot.pause(0.1)
    return rows, {"running": state.running, "tok_s": state.tok_s, "tbt_p50_ms": state.tbt_p50_ms} if state else {}


def configure(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--users", type=int, default=16, help="synthetic users in batched mode (default: %(default)s)")
    p.add_argument("--presses", type=int, default=30, help="keys to press (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds of load before the first press (default: %(default)s)")
    p.add_argument("--json", default="bench/out/keys.json", help="(default: %(default)s)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    rows, engine_state = asyncio.run(measure(args.users, args.presses, args.warmup))
    summary = []
    for key in KEYS:
        mine = [r for r in rows if r["key"] == key]
        for what in ("key", "frame"):
            values = [r[f"{what}_ms"] for r in mine]
            summary.append({"press": key, "until": what, "n": len(values), "p50": percentile(values, 50),
                            "p90": percentile(values, 90), "max": max(values)})
    print(f"{len(rows)} presses at 160x60, batched mode, {args.users} synthetic users + the simulated caller; "
          f"engine at the end: {engine_state}")
    print(table(summary, [("press", "press", "s"), ("until", "until", "s"), ("n", "n", "d"), ("p50", "p50 ms", ".1f"),
                          ("p90", "p90 ms", ".1f"), ("max", "max ms", ".1f")]))
    print(f"JSON: {write_json(args.json, 'keys', rows, users=args.users, engine=engine_state, summary=summary)}")
    return 0
