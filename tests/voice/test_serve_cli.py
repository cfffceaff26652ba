"""`tradeoff serve` as a user runs it, in a child process: it listens at once and answers 503 until the model is
loaded, then serves the OpenAI API; a second `tradeoff serve --backend` in front of it serves the same model
through it; Ctrl-C stops both."""

import re
import signal
import subprocess
import sys
import time

import httpx
import openai

QUESTION = [{"role": "user", "content": "Name a colour."}]


class Serve:
    def __init__(self, *extra: str):
        cmd = [sys.executable, "-m", "tradeoff", "serve", "--port", "0", "--asr", "pocketsphinx", *extra]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.base = self._wait_for(r"listening on (http://\S+)")
        self.loading_health = httpx.get(self.base + "/health").status_code  # asked while the model loads
        self._wait_for(r"ready\.")

    def _wait_for(self, pattern: str, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            assert line, f"tradeoff serve exited: {''.join(self.lines)}"
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m.group(1) if m.groups() else line
        raise AssertionError(f"no {pattern!r} in {''.join(self.lines)}")

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.kill()


def test_serve_and_a_second_serve_in_front_of_it():
    first = Serve()
    try:
        assert first.loading_health == 503
        assert httpx.get(first.base + "/health").json()["status"] == "ok"
        with openai.OpenAI(base_url=first.base + "/v1", api_key="unused", max_retries=0) as client:
            model = client.models.list().data[0].id
            direct = client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8, temperature=0)
        assert direct.choices[0].message.content
        front = Serve("--backend", first.base.replace("http://", "openai://") + "/v1")
        try:
            with openai.OpenAI(base_url=front.base + "/v1", api_key="unused", max_retries=0) as client:
                assert client.models.list().data[0].id == model  # the back server's model
                chunks = list(client.chat.completions.create(model=model, messages=QUESTION, max_tokens=8,
                                                             temperature=0, stream=True))
            assert "".join(c.choices[0].delta.content or "" for c in chunks)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
            # both servers counted the request: the front one measured it from the back one's stream
            for server in (front, first):
                metrics = httpx.get(server.base + "/metrics").text
                assert re.search(r'tradeoff:time_to_first_token_seconds_count\{[^}]*user_class="user"\} [1-9]', metrics)
        finally:
            assert front.stop() in (0, 130)
    finally:
        assert first.stop() in (0, 130)
