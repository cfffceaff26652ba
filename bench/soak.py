"""`tradeoff bench soak --minutes N`: a real `tradeoff serve` (a child process) under mixed, careless load for N
minutes, watched for growth. What a server must survive for days, compressed: simulated callers speaking through
the audio path (and barging in), synthetic users streaming chats over HTTP, text sessions over the realtime
WebSocket, and random disconnects of all three (before the first byte, mid-stream, without a close handshake), with
the engine switched between latency and batched mode now and then.

Every minute it prints the server's RSS, open file descriptors, threads, child processes (recognizer and
synthesizer workers), KV blocks in use and requests running or waiting, with the counts of what the clients saw:
requests answered, refused (429), errors (5xx, `server_error` events, failed responses, connections the server
broke), and disconnects. At the end it lets the server drain (nothing running, no KV block held) and writes the
rows as JSON (bench/report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from bench.report import table, write_json
from voice.caller import QUESTIONS, SimulatedCaller
from voice.client import RealtimeClient
from voice.tts import EspeakTTS

COLUMNS = [("minute", "min", ".1f"), ("rss_mb", "RSS MB", ".0f"), ("fds", "fds", "d"), ("threads", "threads", "d"),
           ("children", "children", "d"), ("kv_blocks", "KV blocks", "d"), ("running", "run", "d"),
           ("waiting", "wait", "d"), ("mode", "mode", ""), ("answered", "answered", "d"), ("refused", "429", "d"),
           ("disconnects", "dropped", "d"), ("errors", "errors", "d"), ("log_errors", "log errors", "d")]
CHAT = ("What is the capital of France?", "Give me three tips for focus.", "Why is the sky blue?",
        "Write a haiku about the sea.", "Name five red fruits.", "How do bees make honey?")


def configure(p: argparse.ArgumentParser) -> None:
    p.description = ("Run `tradeoff serve` in a child process under simulated callers, synthetic users, text sessions "
                     "and random disconnects for N minutes; a table of RSS, fds, threads, KV blocks and errors every "
                     "minute, JSON at the end.")
    p.add_argument("--minutes", type=float, default=30, help="how long to run (default: %(default)s)")
    p.add_argument("--callers", type=int, default=2, help="simulated callers speaking at once (default: %(default)s)")
    p.add_argument("--users", type=int, default=4, help="synthetic HTTP users streaming chats (default: %(default)s)")
    p.add_argument("--texters", type=int, default=2, help="text-only realtime sessions (default: %(default)s)")
    p.add_argument("--drop", type=float, default=0.3,
                   help="share of requests and sessions the clients drop (default: %(default)s)")
    p.add_argument("--switch-every", type=float, default=120,
                   help="seconds between mode switches; 0 = never (default: %(default)s)")
    p.add_argument("--every", type=float, default=60, help="seconds between table rows (default: %(default)s)")
    p.add_argument("--asr", default="pocketsphinx", choices=("whisper", "pocketsphinx"),
                   help="the server's recognizer (default: %(default)s: a worker process per session, so session churn "
                        "starts and ends processes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default="bench/out/soak.json", help="where to write the JSON (default: %(default)s)")
    p.set_defaults(func=main)


class Server:
    """`tradeoff serve` in a child process; its stderr is read all the time (a full pipe would block its logging)."""

    def __init__(self, asr: str):
        cmd = [sys.executable, "-m", "tradeoff", "serve", "--port", "0", "--asr", asr, "--max-tokens", "48"]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
        self.lines: list[str] = []
        self.log_errors = 0  # tracebacks and ERROR lines in its log
        self._ready = threading.Event()
        self.base = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(600) or not self.base:
            self.stop()
            raise RuntimeError("tradeoff serve did not become ready:\n" + "".join(self.lines[-30:]))

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines = self.lines[-200:] + [line]
            if m := re.search(r"listening on (http://\S+)", line):
                self.base = m.group(1)
            if "ready." in line:
                self._ready.set()
            if "Traceback" in line or " ERROR " in line or line.startswith("ERROR"):
                self.log_errors += 1
        self._ready.set()  # it exited

    def sample(self) -> dict:
        pid = self.proc.pid
        status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
        # a child belongs to the thread that started it (the recognizer's and the synthesizer's are started on others)
        children = {c for task in Path(f"/proc/{pid}/task").iterdir() for c in _read(task / "children").split()}
        return {"rss_mb": int(status["VmRSS"].split()[0]) / 1024, "threads": int(status["Threads"]),
                "fds": len(os.listdir(f"/proc/{pid}/fd")), "children": len(children)}

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:  # that thread has just ended
        return ""


class Load:
    """The clients, as asyncio tasks until `deadline`; `counts` is what they saw."""

    def __init__(self, server: Server, args: argparse.Namespace):
        self.base, self.ws = server.base, server.base.replace("http://", "ws://") + "/v1/realtime"
        self.args = args
        self.rng = random.Random(args.seed)
        self.counts: Counter = Counter()
        self.deadline = time.monotonic() + args.minutes * 60
        self.model = ""

    def _error(self, what: str) -> None:
        self.counts["errors"] += 1
        self.counts[f"error: {what}"] += 1

    async def run(self) -> None:
        async with httpx.AsyncClient(base_url=self.base, timeout=120) as http:
            self.model = (await http.get("/v1/models")).json()["data"][0]["id"]
            tts = EspeakTTS()  # the callers' voice, shared: one synthesizer worker for all of them
            try:
                await asyncio.gather(*[self._user(http) for _ in range(self.args.users)],
                                     *[self._caller(tts) for _ in range(self.args.callers)],
                                     *[self._texter() for _ in range(self.args.texters)], self._switcher(http))
            finally:
                tts.close()

    def _going(self) -> bool:
        return time.monotonic() < self.deadline

    async def _user(self, http: httpx.AsyncClient) -> None:
        """Streamed chats; some dropped before the first byte, some mid-stream."""
        while self._going():
            drop = self.rng.random() < self.args.drop
            body = {"model": self.model, "messages": [{"role": "user", "content": self.rng.choice(CHAT)}],
                    "max_tokens": self.rng.randint(8, 64), "stream": True}
            try:
                timeout = httpx.Timeout(120, read=self.rng.uniform(0.01, 1.0)) if drop and self.rng.random() < 0.5 else None
                async with http.stream("POST", "/v1/chat/completions", json=body,
                                       **({"timeout": timeout} if timeout else {})) as r:
                    if r.status_code == 429:
                        self.counts["refused"] += 1
                        await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                        continue
                    if r.status_code != 200:
                        self._error(f"HTTP {r.status_code}")
                        continue
                    lines = 0
                    async for line in r.aiter_lines():
                        if '"error"' in line:
                            self._error("error in a stream")
                        lines += 1
                        if drop and lines >= self.rng.randint(1, 8):
                            break
                    self.counts["disconnects" if drop else "answered"] += 1
            except httpx.ReadTimeout:
                self.counts["disconnects"] += 1  # ours: gone before the first byte
            except httpx.HTTPError as e:
                self._error(type(e).__name__)
            await asyncio.sleep(self.rng.expovariate(2.0))

    async def _caller(self, tts: EspeakTTS) -> None:
        """A spoken call of a few turns (barging in on some), then hang up: cleanly, or by dropping the connection."""
        while self._going():
            questions = tuple(self.rng.sample(QUESTIONS, 3))
            try:
                async with RealtimeClient(self.ws) as client:
                    caller = SimulatedCaller(client, questions, turns=self.rng.randint(1, 3), barge_in_every=2,
                                             seed=self.rng.randrange(1 << 30), tts=tts)
                    turns = await caller.run()
                    self._check(client.log)
                    self.counts["answered"] += len(turns)
                    if self.rng.random() < self.args.drop:
                        client.ws.transport.abort()  # gone without a close handshake
                        self.counts["disconnects"] += 1
            except (OSError, ConnectionError) as e:
                self._error(f"caller: {type(e).__name__}")

    async def _texter(self) -> None:
        """Typed turns over the realtime WebSocket; some cancelled, some sessions dropped mid-reply."""
        while self._going():
            try:
                async with RealtimeClient(self.ws) as client:
                    for _ in range(self.rng.randint(1, 4)):
                        await client.send({"type": "conversation.item.create", "item": {
                            "type": "message", "role": "user",
                            "content": [{"type": "input_text", "text": self.rng.choice(CHAT)}]}})
                        await client.send({"type": "response.create", "response": {"output_modalities": ["text"]}})
                        if self.rng.random() < self.args.drop:
                            await client.send({"type": "response.cancel"})
                        done = await self._until(client, "response.done", 120)
                        if done is None:
                            self._error("no response.done")
                            break
                        self.counts["answered"] += 1
                    self._check(client.log)
                    if self.rng.random() < self.args.drop:
                        client.ws.transport.abort()
                        self.counts["disconnects"] += 1
            except (OSError, ConnectionError) as e:
                self._error(f"texter: {type(e).__name__}")

    async def _until(self, client, kind: str, timeout: float) -> dict | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                _, event = await client.next_event(timeout=end - time.monotonic())
            except asyncio.TimeoutError:
                return None
            if event["type"] == kind:
                return event
            if event["type"] == "client.closed":
                return None
        return None

    def _check(self, log: list[tuple[float, dict]]) -> None:
        for _, event in log:
            if event["type"] == "error" and event["error"]["type"] == "server_error":
                self._error("server_error event")
            elif event["type"] == "response.done" and event["response"]["status"] == "failed":
                self._error("failed response")
        log.clear()

    async def _switcher(self, http: httpx.AsyncClient) -> None:
        mode = "latency"
        while self._going():
            await asyncio.sleep(min(self.args.switch_every or 1e9, max(0.0, self.deadline - time.monotonic())))
            if self.args.switch_every and self._going():
                mode = "batched" if mode == "latency" else "latency"
                r = await http.post("/v1/tradeoff/control", json={"mode": mode})
                if r.status_code != 200:
                    self._error(f"control HTTP {r.status_code}")


def row(server: Server, load: Load, started: float) -> dict:
    snapshot = httpx.get(server.base + "/v1/tradeoff/metrics", timeout=30).json()["state"]
    kv = snapshot["kv"]
    counts = load.counts
    return {"minute": (time.monotonic() - started) / 60, **server.sample(), "kv_blocks": kv["blocks_used"] if kv else 0,
            "running": snapshot["running"], "waiting": snapshot["waiting"], "mode": snapshot["mode"],
            "answered": counts["answered"], "refused": counts["refused"], "disconnects": counts["disconnects"],
            "errors": counts["errors"], "log_errors": server.log_errors}


def line(r: dict | None) -> str:
    """One row of the table (the header for None), in fixed widths so rows printed a minute apart line up."""
    cells = [h if r is None else ("-" if r.get(k) is None else format(r[k], f)) for k, h, f in COLUMNS]
    return "  ".join(c.rjust(max(len(h), 7)) for c, (_, h, _) in zip(cells, COLUMNS))


def main(args: argparse.Namespace) -> int:
    print(f"soak: starting tradeoff serve (--asr {args.asr}) ...", flush=True)
    server = Server(args.asr)
    rows: list[dict] = []
    started = time.monotonic()
    load = Load(server, args)
    runner = threading.Thread(target=asyncio.run, args=(load.run(),), daemon=True)
    try:
        rows.append(row(server, load, started))
        runner.start()
        print(f"soak: {server.base}, {args.minutes:g} min: {args.callers} callers, {args.users} HTTP users, "
              f"{args.texters} text sessions, {args.drop:.0%} dropped\n\n{line(None)}\n{line(rows[0])}", flush=True)
        while runner.is_alive():
            runner.join(timeout=max(0.0, started + len(rows) * args.every - time.monotonic()))
            if runner.is_alive():
                rows.append(row(server, load, started))
                print(line(rows[-1]), flush=True)
        end = time.monotonic() + 120  # then drained: nothing running or waiting, no KV block, no session's worker left
        while time.monotonic() < end and ((last := row(server, load, started))["running"] + last["waiting"]
                                          + last["kv_blocks"] or last["children"] > rows[0]["children"]):
            time.sleep(1)
        rows.append(last)
        print(line(last), "(the clients stopped; drained)\n", flush=True)
    finally:
        code = server.stop()
    print(table(rows, COLUMNS))
    problems = {k.removeprefix("error: "): v for k, v in load.counts.items() if k.startswith("error: ")}
    first = next((r for r in rows if r["minute"] >= 1), rows[-1])
    print(f"\nerrors by kind: {problems or 'none'}; {server.log_errors} error lines in the server's log; RSS idle "
          f"{rows[0]['rss_mb']:.0f} MB, after a minute {first['rss_mb']:.0f}, at most {max(r['rss_mb'] for r in rows):.0f}, "
          f"at the end {rows[-1]['rss_mb']:.0f} (batched mode builds its KV cache, ~750 MB, once: on its first use)")
    path = write_json(args.json, "soak", rows, errors=problems, server_exit=code, settings=vars(args) | {"func": None})
    print(f"JSON: {path}")
    return 0 if not problems and not server.log_errors else 1
