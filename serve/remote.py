"""A remote OpenAI-compatible endpoint behind the engine's interface, so the voice loop, the synthetic users and
the dashboard run unchanged on vLLM, SGLang, llama.cpp's server, OpenAI, or another tradeoff.

`--backend openai://HOST:PORT/v1` (`openai+https://` for TLS; plain http(s):// URLs work too). Every request
is a streamed `/v1/chat/completions` (or `/v1/completions` for a raw prompt) with usage included, and its TTFT,
TBT and E2E are measured here, at the client, from the stream: arrival = `submit`, each SSE chunk with text is
one emission (engine/metrics.py's definitions, as vLLM's benchmark client measures). Token counts come from
the final usage; a chunk that carries several tokens (a speculative step) stays one emission.

Controls: a tradeoff server takes mode, speculation and batching policy itself (`/v1/tradeoff/control`), and its
engine's state (running, waiting, KV use, speculation) is the snapshot's `state`. Any other server batches however
it was configured, so "latency mode" is emulated here: one request in flight at a time, the rest waiting in FIFO
order, exactly what latency mode means; "batched" admits up to `max_batch_size` at once. Such a server's engine
state comes from its Prometheus `/metrics`, read in vLLM's names (serve/prometheus.py `read_vllm`) at each snapshot,
so at the rate the dashboard samples: running is the server's (all its clients'), waiting the server's queue plus
the requests held back here. What it does not tell (no `/metrics`, or no such series: its KV cache, speculation,
chunked prefill) is None in the snapshot; running and waiting fall back to the requests of this client.
HTTP runs on a private event loop in a background thread, so `submit` works from any thread or loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx

from engine.backend import ControlError, Controls
from engine.engine import ContextLengthError, OverloadedError, policy_with
from engine.metrics import RequestMetrics
from engine.scheduler import BatchPolicy
from engine.sequence import EngineError, Request, Stream, TokenEvent
from engine.snapshot import EngineState, Snapshot
from engine.stats import RollingStats
from engine.tokenizer import Tokenizer
from serve.background import BackgroundLoop
from serve.prometheus import VLLMState, read_vllm

MODE = "remote"  # the emission mode recorded in request metrics
SCHEMES = {"openai": "http", "openai+http": "http", "openai+https": "https", "http": "http", "https": "https"}


class RemoteError(RuntimeError):
    """The endpoint cannot be used (unreachable, not OpenAI-compatible, unknown model); the message names it."""


def base_url(spec: str) -> str:
    """openai://HOST:PORT/v1 -> http://HOST:PORT/v1 (a URL without a path gets /v1)."""
    parts = urlsplit(spec)
    if parts.scheme not in SCHEMES or not parts.netloc:
        raise ValueError(f"{spec!r} is not a backend URL; expected openai://HOST:PORT/v1 (or openai+https://, http://, https://)")
    path = parts.path.rstrip("/") or "/v1"
    return f"{SCHEMES[parts.scheme]}://{parts.netloc}{path}"


class RemoteStream(Stream):
    """A stream whose `cancel` also closes its HTTP request, so the server frees the request at once."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop | None):
        super().__init__(request, loop)
        self.task: asyncio.Future | None = None  # concurrent.futures.Future of the request's coroutine

    def cancel(self) -> None:
        super().cancel()
        if self.task is not None:
            self.task.cancel()


class RemoteEngine:
    """A `Backend` over HTTP. `tokenizer` (optional) only sizes the load generator's prompts; the server counts the
    real tokens."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, tokenizer: Tokenizer | None = None,
                 max_waiting: int = 64, policy: BatchPolicy | None = None, connect_timeout_s: float = 10.0):
        self.url = base_url(url)
        self.metrics_url = self.url.removesuffix("/v1") + "/metrics"  # Prometheus's path is beside the API, not in it
        self.tokenizer = tokenizer
        self.max_waiting = max_waiting
        self.policy = policy or BatchPolicy()  # the emulated admission's batch size (a server that is not tradeoff)
        self.stats = RollingStats()
        self.finish_listeners: list[Callable[[RequestMetrics], None]] = []
        self._bg = BackgroundLoop("remote-engine")
        self._loop = self._bg.loop
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        timeout = httpx.Timeout(connect=connect_timeout_s, read=None, write=30.0, pool=None)  # a queued request may wait long
        self._client: httpx.AsyncClient = self._bg.run(self._make_client(headers, timeout))
        self._in_flight = 0
        self._admission: deque[asyncio.Future] = deque()  # requests waiting for a slot (emulated latency mode)
        self._requests: set[RemoteStream] = set()  # in flight, so `close` can end them
        self._closed = False
        try:
            models = self._bg.run(self._get_json("/models"))["data"]
            self.name = model or models[0]["id"]
            if model is not None and model not in [m["id"] for m in models]:
                raise RemoteError(f"{self.url} does not serve {model!r}; it serves {', '.join(m['id'] for m in models)}")
            served = next((m.get("max_model_len") for m in models if m["id"] == self.name), None)
            self.max_seq_len: int | None = int(served) if served else None  # not every server says
        except BaseException:
            self.close()
            raise
        state = self._server_snapshot()
        self.tradeoff = state is not None  # a tradeoff server: it takes the controls itself
        self.mode = state.state.mode if state else "batched"  # the emulated mode (a server that is not tradeoff)

    def describe(self) -> str:
        kind = "a tradeoff server" if self.tradeoff else "an OpenAI-compatible server (latency mode emulated client-side)"
        return f"{self.name} at {self.url}, {kind}; TTFT/TBT measured here, at the client"

    # ---- the Backend interface --------------------------------------------------------------

    def submit(self, request: Request, loop: asyncio.AbstractEventLoop | None = None) -> Stream:
        """Start the request and return its stream; refusals and errors arrive through the stream."""
        if self._closed:
            raise RuntimeError("remote engine is closed")
        request.check()
        if request.sampling.logprobs:  # its answers name tokens by their text, not by the local tokenizer's ids
            raise ValueError("logprobs are not asked of a remote server")
        if len(self._admission) >= self.max_waiting:
            self.stats.record_rejected()
            raise OverloadedError(f"{self.max_waiting} requests already wait for {self.url}; retry later")
        stream = RemoteStream(request, loop)
        stream.metrics = RequestMetrics(arrival=time.monotonic(), user_class=request.user_class)
        self.stats.track(stream.metrics)
        self._requests.add(stream)
        stream.task = self._bg.submit(self._run(stream))
        stream.task.add_done_callback(lambda _: self._requests.discard(stream))
        return stream

    def control(self, controls: Controls) -> None:
        """A tradeoff server applies the controls itself (all or nothing, there). Elsewhere only the emulated mode and
        batch size exist: speculation and chunked prefill are set where that server is launched."""
        if self.tradeoff:
            self._control(controls.to_json())
            return
        if controls.speculation is not None or controls.chunked_prefill is not None:
            raise ValueError(f"{self.url} is not a tradeoff server: its speculative decoding and chunked prefill are "
                             "set where it runs")
        if controls.mode == "disaggregated":
            raise ControlError("mode", f"{self.url} is not a tradeoff server: disaggregated serving is how a deployment is "
                               "launched (vLLM with a KV connector, SGLang's PD split), not a mode a client can emulate")
        policy = policy_with(self.policy, controls)  # validates before anything changes
        self.policy = policy
        if controls.mode is not None:
            self.mode = controls.mode
        self._loop.call_soon_threadsafe(self._admit_waiting)

    def snapshot(self, window_s: float | None = None) -> Snapshot:
        """The client-side numbers; the state is a tradeoff server's own (one round trip), else what is known here."""
        stats = self.stats.window(window_s)
        if self.tradeoff:
            server = self._server_snapshot()
            if server is not None:
                return Snapshot(stats, server.state)
            vllm = VLLMState()  # it did not answer this time: what is known here
        else:
            vllm = self._vllm_state()
        running = self._in_flight if vllm.running is None else vllm.running
        waiting = len(self._admission) + (vllm.waiting or 0)
        return Snapshot(stats, EngineState(mode=self.mode, running=running, waiting=waiting,
                                           max_batch_size=self.policy.max_batch_size, chunked_prefill=None,
                                           can_speculate=False, speculation=vllm.speculation, kv=vllm.kv, setup=None))

    def server_snapshot(self, window_s: float | None = None) -> Snapshot | None:
        """A tradeoff server's own snapshot (server-side TTFT/TBT over every client's requests); None for others."""
        return self._server_snapshot(window_s) if self.tradeoff else None

    def clear_cache(self) -> None:
        """Nothing to clear from here: the server owns its cache."""

    def close(self) -> None:
        """Cancel the requests in flight (their streams end as cancelled) and close the connections."""
        if self._closed:
            return
        self._closed = True
        for stream in list(self._requests):
            stream.cancel()
        concurrent.futures.wait([s.task for s in list(self._requests)], timeout=5)
        if getattr(self, "_client", None) is not None:
            self._bg.run(self._client.aclose())
        self._bg.stop()

    # ---- on the private loop ----------------------------------------------------------------

    async def _make_client(self, headers: dict, timeout: httpx.Timeout) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, headers=headers, timeout=timeout,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    async def _get_json(self, path: str, timeout: float | None = None) -> dict:
        try:
            r = await self._client.get(path, timeout=timeout or httpx.USE_CLIENT_DEFAULT)
        except httpx.HTTPError as e:
            raise RemoteError(f"cannot reach {self.url}{path}: {type(e).__name__}: {e}") from None
        if r.status_code != 200:
            raise RemoteError(f"{self.url}{path} answered {r.status_code}: {error_message(r.content)}")
        try:
            return r.json()
        except ValueError:
            raise RemoteError(f"{self.url}{path} did not answer JSON: is it an OpenAI-compatible API?") from None

    def _server_snapshot(self, window_s: float | None = None) -> Snapshot | None:
        """The server's `/v1/tradeoff/metrics`; None if it has none (not a tradeoff server) or answers something else."""
        query = f"?window_s={window_s:.3f}" if window_s is not None else ""
        try:
            return Snapshot.from_json(self._bg.run(self._get_json("/tradeoff/metrics" + query, timeout=2.0)))
        except (RemoteError, KeyError, TypeError, ValueError):
            return None

    def _vllm_state(self) -> VLLMState:
        """The server's engine state from its `/metrics` in vLLM's names; nothing known if it has none."""
        async def scrape() -> str | None:
            try:
                r = await self._client.get(self.metrics_url, timeout=2.0)
            except httpx.HTTPError:
                return None
            return r.text if r.status_code == 200 else None

        text = self._bg.run(scrape())
        return read_vllm(text, self.name) if text else VLLMState()

    def _control(self, controls: dict) -> None:
        async def post() -> None:
            r = await self._client.post("/tradeoff/control", json=controls, timeout=5.0)
            if r.status_code == 400:  # refused, all of it: the same error as a local engine's
                raise ValueError(f"{self.url}/tradeoff/control: {error_message(r.content)}")
            if r.status_code != 200:
                raise RemoteError(f"{self.url}/tradeoff/control answered {r.status_code}: {error_message(r.content)}")

        self._bg.run(post())

    async def _run(self, stream: RemoteStream) -> None:
        m = stream.metrics
        admitted = False
        try:
            await self._admit()
            admitted = True
            m.scheduled = time.monotonic()
            await self._stream(stream)
        except asyncio.CancelledError:
            m.finish_reason = "cancelled"
            stream.end()
        except Exception as e:
            m.finish_reason = "error"
            stream.put(e if isinstance(e, (EngineError, OverloadedError, ContextLengthError)) else
                       EngineError(f"request to {self.url} failed: {type(e).__name__}: {e}"))
        else:
            stream.end()
        finally:
            if admitted:
                self._in_flight -= 1
                self._admit_waiting()
            for listener in self.finish_listeners:
                listener(m)

    async def _stream(self, stream: RemoteStream) -> None:
        request, m = stream.request, stream.metrics
        path, body = request_body(request, self.name)
        finish, counted = None, 0
        async with self._client.stream("POST", path, json=body) as r:
            if r.status_code != 200:
                raise http_error(r.status_code, await r.aread(), self.url + path)
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise EngineError(f"{self.url}{path} failed mid-stream: {error_message(data.encode())}")
                t = time.monotonic()
                for choice in chunk.get("choices") or ():
                    text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
                    if text:
                        counted += 1
                        m.record(t, 1, MODE)
                        stream.put(TokenEvent([], text, t))
                    finish = choice.get("finish_reason") or finish
                if usage := chunk.get("usage"):
                    m.prompt_tokens = usage.get("prompt_tokens", 0)
                    m.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    extra = usage.get("completion_tokens", counted) - counted
                    if extra > 0 and m.emissions:  # chunks that carried several tokens: count them at the end
                        last = m.emissions[-1]
                        m.emissions[-1] = (last[0], last[1] + extra, last[2])
        m.finish_reason = finish if finish in ("stop", "length") else "stop"

    async def _admit(self) -> None:
        """Wait for a slot: one in latency mode, `max_batch_size` in batched mode; a tradeoff server queues itself."""
        if self._in_flight < self._limit() and not self._admission:
            self._in_flight += 1
            return
        slot = self._loop.create_future()
        self._admission.append(slot)
        try:
            await slot
        except asyncio.CancelledError:
            if slot in self._admission:
                self._admission.remove(slot)
            elif not slot.cancelled():  # the slot was granted just before the cancel: hand it on
                self._in_flight -= 1
                self._admit_waiting()
            raise

    def _admit_waiting(self) -> None:
        while self._admission and self._in_flight < self._limit():
            slot = self._admission.popleft()
            if not slot.done():
                self._in_flight += 1
                slot.set_result(None)

    def _limit(self) -> int | float:
        if self.tradeoff:
            return float("inf")
        return 1 if self.mode == "latency" else self.policy.max_batch_size


def request_body(request: Request, model: str) -> tuple[str, dict]:
    s = request.sampling
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p}
    if s.seed is not None:
        body["seed"] = s.seed
    if s.stop:
        body["stop"] = list(s.stop)
    if s.top_k:
        body["top_k"] = s.top_k  # vLLM's and tradeoff's extensions, sent only when asked for
    if s.ignore_eos:
        body["ignore_eos"] = True
    if s.min_tokens:
        body["min_tokens"] = s.min_tokens
    if request.messages is not None:
        return "/chat/completions", {**body, "messages": request.messages}
    return "/completions", {**body, "prompt": request.prompt if request.prompt is not None else request.prompt_ids}


def error_message(content: bytes) -> str:
    try:
        return json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return content.decode(errors="replace")[:300]


def http_error(status: int, content: bytes, where: str) -> Exception:
    message = f"{where} answered {status}: {error_message(content)}"
    if status == 429:
        return OverloadedError(message)
    if status == 400 and b"context_length_exceeded" in content:
        return ContextLengthError(message)
    return EngineError(message)

