"""The browser client served at GET /, in a real browser: Debian's chromium, headless, driven by Playwright.

Chromium's fake media flags feed a synthesized spoken question (espeak plus a noise floor, as a WAV file) in
as the microphone. The page must connect, stream it to /v1/realtime, show the transcript, play the reply
audio (its played-samples counter rises), and draw the turn's latency bar with the browser's own E2E.
"""

import asyncio
import os
import shutil
import subprocess
from pathlib import Path
from urllib.request import urlopen

import numpy as np
import pytest
import soundfile

from tests.voice.conftest import closest
from voice.audio import WIRE_RATE
from voice.caller import QUESTIONS, spoken_question

QUESTION = "What is the capital of France?"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--use-fake-ui-for-media-stream",
                  "--use-fake-device-for-media-stream", "--autoplay-policy=no-user-gesture-required"]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, installed with apt if it is missing and we may (root); else the test skips."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("chromium is not installed and this user cannot install it (needs root and apt-get)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
            result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
            if result.returncode != 0:
                pytest.skip(f"could not install chromium ({' '.join(cmd)}): {result.stderr[-500:]}")
        path = shutil.which("chromium") or "/usr/bin/chromium"
    return path


async def test_page_and_its_files_are_served(server):
    """GET / and the page's files come from the package's voice/web folder; nothing else does."""
    import httpx

    from voice.server import WEB

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as http:
        for path, name in (("/", "index.html"), ("/app.js", "app.js"), ("/capture-worklet.js", "capture-worklet.js")):
            response = await http.get(path)
            assert response.status_code == 200
            assert response.content == (WEB / name).read_bytes()
        assert (await http.get("/app.js")).headers["Content-Type"].startswith("text/javascript")
        for path in ("/../server.py", "/%2e%2e/server.py", "/nope.js", "/web/app.js", "/__init__.py", "/server.py"):
            assert (await http.get(path)).status_code == 404, path


async def test_served_over_http_on_the_realtime_port(server):
    page = await asyncio.to_thread(lambda: urlopen(f"http://127.0.0.1:{server.port}/", timeout=10).read().decode())
    assert '<script type="module" src="app.js">' in page
    with pytest.raises(Exception, match="404"):
        await asyncio.to_thread(urlopen, f"http://127.0.0.1:{server.port}/nothing-here", timeout=10)


class Browser:
    """Headless chromium (Debian's, via Playwright) on a fresh empty profile with `audio` as its microphone,
    showing the server's page with Connect pressed; collects page errors, console errors and failed requests."""

    def __init__(self, chromium: str, tmp_path: Path, port: int, audio: np.ndarray, allow_microphone: bool = True,
                 push_to_talk: bool = False):
        self.chromium, self.profile, self.port, self.allow = chromium, tmp_path / "profile", port, allow_microphone
        self.push_to_talk = push_to_talk
        self.microphone = tmp_path / "microphone.wav"
        soundfile.write(self.microphone, audio, WIRE_RATE, subtype="PCM_16")
        self.errors: list[str] = []

    async def __aenter__(self):
        async_api = pytest.importorskip("playwright.async_api", reason="playwright is in the test extra: pip install -e .[test]")
        self.playwright = await async_api.async_playwright().start()
        flags = [f for f in CHROMIUM_FLAGS if self.allow or f != "--use-fake-ui-for-media-stream"]
        self.context = await self.playwright.chromium.launch_persistent_context(
            str(self.profile), executable_path=self.chromium, headless=True,
            args=[*flags, f"--use-file-for-fake-audio-capture={self.microphone}%noloop"])
        page = self.context.pages[0] if self.context.pages else await self.context.new_page()
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        page.on("response", lambda r: self.errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        await page.goto(f"http://127.0.0.1:{self.port}/")
        if self.push_to_talk:
            await page.check("#push-to-talk")
        await page.click("#connect")
        return page

    async def __aexit__(self, *exc) -> None:
        await self.context.close()
        await self.playwright.stop()


PLAYED = "Number(document.querySelector('#played').dataset.samples)"


async def test_browser_holds_a_spoken_turn(server, tts, chromium, tmp_path):
    # a second of silence first: the fake microphone starts playing the file as soon as the page opens it
    browser = Browser(chromium, tmp_path, server.port, spoken_question(tts, QUESTION, lead_s=1.0, tail_s=1.0))
    async with browser as page:
        await page.wait_for_selector("#transcript .user", timeout=30_000)
        await page.wait_for_selector("#turns .turn[data-e2e-ms]", timeout=30_000)
        await page.wait_for_function(f"{PLAYED} > {WIRE_RATE // 4}", timeout=30_000)
        heard = await page.inner_text("#transcript .user")
        reply = await page.inner_text("#transcript .bot")
        turn = page.locator("#turns .turn").first
        e2e_ms = float(await turn.get_attribute("data-e2e-ms"))
        server_e2e_ms = float(await turn.get_attribute("data-server-e2e-ms"))
        segments = await turn.locator(".bar span").count()
        bar_width = (await turn.locator(".bar").bounding_box())["width"]
        message = await page.inner_text("#message")
        await page.click("#connect")  # disconnect
        await page.wait_for_function("document.querySelector('#status').textContent === 'disconnected'")
    assert closest(heard, QUESTIONS) == QUESTION, heard
    assert reply.strip()
    assert message == "" and not browser.errors, (message, browser.errors)
    assert segments == 7 and bar_width > 0  # six server stages plus the browser's transport + playout
    # the browser sees the server's E2E plus transport and output latency, never less
    assert server_e2e_ms <= e2e_ms + 30, (e2e_ms, server_e2e_ms)
    print(f"browser-measured E2E {e2e_ms:.0f} ms (server {server_e2e_ms:.0f} ms)")


async def test_speaking_over_the_reply_stops_its_playback(server, tts, chromium, tmp_path):
    first, second = QUESTION, "How many legs does a spider have?"
    # the second question starts 1.4 s after the first ends: while the first reply is playing
    speech = np.concatenate([spoken_question(tts, first, lead_s=1.0, tail_s=1.4),
                             spoken_question(tts, second, seed=1, lead_s=0.0, tail_s=3.0)])
    browser = Browser(chromium, tmp_path, server.port, speech)
    async with browser as page:
        await page.wait_for_function("document.querySelectorAll('#transcript .user').length === 2", timeout=30_000)
        await page.wait_for_function("document.querySelectorAll('#turns .turn').length === 2", timeout=30_000)
        heard = await page.locator("#transcript .user").all_inner_texts()
        cut = await page.locator("#transcript .bot").first.get_attribute("class")
        counters = await page.evaluate("({...document.querySelector('#played').dataset})")
    assert [closest(h, QUESTIONS) for h in heard] == [first, second], heard
    assert "cut" in cut  # the first reply was interrupted ...
    assert int(counters["bargeIns"]) == 1  # ... while its audio was still playing, and playback stopped there
    assert int(counters["dropped"]) == 0  # the server sent nothing after speech_started
    assert not browser.errors, browser.errors


async def test_push_to_talk_sends_only_while_held(server, tts, chromium, tmp_path):
    speech = spoken_question(tts, QUESTION, lead_s=1.0, tail_s=1.0)
    browser = Browser(chromium, tmp_path, server.port, speech, push_to_talk=True)
    async with browser as page:
        await page.wait_for_function("document.querySelector('#status').textContent.startsWith('connected')")
        await page.keyboard.down("Space")  # hold while the file's question plays, then let go
        await asyncio.sleep(len(speech) / WIRE_RATE)
        await page.keyboard.up("Space")
        await page.wait_for_selector("#turns .turn[data-e2e-ms]", timeout=30_000)
        heard = await page.inner_text("#transcript .user")
        segments = await page.locator("#turns .turn .bar span").count()
        (session,) = server.sessions
        turn_detection = session.config.turn_detection
    assert closest(heard, QUESTIONS) == QUESTION, heard
    assert turn_detection is None  # the page switched the server's VAD off: the key ends the turn
    assert segments == 5 and not browser.errors, browser.errors  # LLM, clause, TTS, send; then the browser's rest


async def test_refused_microphone_gets_a_clear_message(server, chromium, tmp_path):
    browser = Browser(chromium, tmp_path, server.port, np.zeros(WIRE_RATE, np.float32), allow_microphone=False)
    async with browser as page:
        await page.wait_for_function("document.querySelector('#message').textContent !== ''", timeout=15_000)
        message = await page.inner_text("#message")
        button = await page.inner_text("#connect")
    assert "permission was refused" in message, message
    assert button == "Connect" and not server.sessions
