"""The server: one ASGI app on one port, as OpenAI's API is laid out.

- `ws://HOST:PORT/v1/realtime`: the realtime voice WebSocket, one `Session` per connection, all sharing one engine;
- `http://HOST:PORT/v1/...`: the OpenAI HTTP API of that engine (serve/openai_api.py), `/health`, `/metrics`;
- `GET /` and the files beside it in voice/web/: the browser client (static, no token needed: the page holds nothing).

A token, when set, is required as `Authorization: Bearer TOKEN` on the WebSocket handshake (else 401) and on /v1
HTTP calls; binding anywhere but loopback requires one. Other WebSocket paths get 404. Messages larger than
`max_message_bytes` close the connection (code 1009); HTTP bodies larger than `max_body_bytes` get 413. A connection
must send a request's headers within `header_timeout_s` and an idle keep-alive connection closes after
`KEEP_ALIVE_S`, so idle or half-sent connections cannot pile up. When a client goes away its session is closed:
generation stops, tasks end, the recognizer's worker exits. Until `attach` gives it an engine, everything answers
503, so a server can listen while its model loads. Errors over HTTP, ours or Starlette's (404, 405, 500), have
OpenAI's shape. Starlette routes, served by uvicorn.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from dataclasses import replace
from functools import cache
from pathlib import Path

import h11
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request as HTTPRequest
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine import Backend
from serve.openai_api import EXCEPTION_HANDLERS, MAX_BODY_BYTES, APIError, OpenAIAPI
from voice.asr import ASR, RecognizerLimitError, make_asr
from voice.protocol import PATH, TurnDetection
from voice.responder import Disconnected
from voice.session import Services, Session
from voice.smart_turn import SmartTurn, TurnModelError
from voice.tts import TTS

log = logging.getLogger("voice.server")
WEB = Path(__file__).parent / "web"  # the browser client, served at GET /
WEB_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}
HEADER_TIMEOUT_S = 10.0  # a request's headers must arrive within this
KEEP_ALIVE_S = 5  # an idle keep-alive connection closes after this (uvicorn's default)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_services(engine: Backend, tts: TTS, asr: str = "whisper", max_asr_workers: int = 8,
                  turn_model: str | None = None, **options) -> Services:
    """Services with `asr` loaded now (so the first turn does not wait for it) and others on first use.
    `max_asr_workers`: the most pocketsphinx worker processes this server runs at once. `turn_model`: semantic_vad's
    Smart Turn .onnx (default: the one from the pipecat-ai wheel). A turn model that cannot be loaded is reported,
    and the server runs with server_vad only (a default of semantic_vad falls back to server_vad)."""

    @cache
    def backend(name: str) -> ASR:
        return make_asr(name, max_asr_workers)

    backend(asr)
    try:
        model, error = SmartTurn(turn_model), ""
    except Exception as e:  # a missing, corrupt or undownloadable model must not stop a server_vad server
        model, error = None, str(e) if isinstance(e, TurnModelError) else f"{type(e).__name__}: {e}"
        log.error("semantic_vad unavailable, serving server_vad only: %s", error)
        defaults = options.get("defaults")
        if defaults is not None and defaults.turn_detection is not None and defaults.turn_detection.semantic:
            options["defaults"] = replace(defaults, turn_detection=TurnDetection(
                create_response=defaults.turn_detection.create_response,
                interrupt_response=defaults.turn_detection.interrupt_response))
    return Services(engine=engine, tts=tts, asr=backend, turn_model=model, turn_model_error=error, **options)


class VoiceServer:
    def __init__(self, services: Services | None, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 max_message_bytes: int = 1 << 20, max_body_bytes: int = MAX_BODY_BYTES,
                 header_timeout_s: float = HEADER_TIMEOUT_S):
        if not is_loopback(host) and not token:
            raise ValueError(f"binding {host} exposes the server beyond this machine: pass --token to require one")
        self.host, self.port, self.token = host, port, token
        self.max_message_bytes = max_message_bytes
        self.header_timeout_s = header_timeout_s
        self.services: Services | None = None
        self.api = OpenAIAPI(token=token, max_body_bytes=max_body_bytes)
        if services is not None:
            self.attach(services)
        self.sessions: set[Session] = set()
        self.app = Starlette(routes=[
            WebSocketRoute(PATH, self._realtime),
            *self.api.routes,
            Route("/", web_file),
            Route("/{name}", web_file),
            WebSocketRoute("/{path:path}", self._not_found),
        ], exception_handlers=EXCEPTION_HANDLERS)
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task | None = None

    def attach(self, services: Services) -> None:
        """Start serving with these services (the engine has loaded)."""
        self.services = services
        self.api.attach(services.engine)

    async def start(self) -> None:
        http = type("HeaderTimeoutH11", (HeaderTimeoutH11,), {"header_timeout_s": self.header_timeout_s})
        config = uvicorn.Config(self.app, host=self.host, port=self.port, http=http, ws="websockets-sansio",
                                ws_max_size=self.max_message_bytes, ws_per_message_deflate=False, lifespan="off",
                                log_level="warning", timeout_graceful_shutdown=2, timeout_keep_alive=KEEP_ALIVE_S)
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():  # e.g. the port is taken
                self._task.result()
                raise OSError(f"could not listen on {self.host}:{self.port}")
            await asyncio.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]  # the real port when 0 was asked for

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{PATH}"

    @property
    def http_url(self) -> str:
        """The OpenAI API's base URL."""
        return f"http://{self.host}:{self.port}/v1"

    async def close(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task
            self._server = self._task = None

    async def __aenter__(self) -> VoiceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        await self._task

    # ---- the realtime WebSocket -------------------------------------------------------------

    async def _realtime(self, ws: WebSocket) -> None:
        if self.token is not None:
            given = ws.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                await ws.send_denial_response(PlainTextResponse("missing or wrong 'Authorization: Bearer TOKEN'\n", 401))
                return
        if self.services is None:
            await ws.send_denial_response(PlainTextResponse("the model is still loading; retry shortly\n", 503))
            return
        async def send(event: dict) -> None:
            try:
                await ws.send_text(json.dumps(event))
            except (WebSocketDisconnect, RuntimeError, OSError) as e:  # closed: Starlette and uvicorn say it these ways
                raise Disconnected(str(e)) from e

        try:
            session = Session(self.services, send)
        except RecognizerLimitError as e:  # the default recognizer has no worker free
            await ws.send_denial_response(PlainTextResponse(f"{e}\n", 503))
            return
        self.sessions.add(session)
        try:
            await ws.accept()
            await session.start()
            while (message := await ws.receive())["type"] != "websocket.disconnect":
                await session.handle(message["text"] if message.get("text") is not None else message.get("bytes") or b"")
        except (Disconnected, WebSocketDisconnect):
            pass
        finally:
            self.sessions.discard(session)
            await session.close()

    async def _not_found(self, ws: WebSocket) -> None:
        await ws.send_denial_response(PlainTextResponse(f"the realtime endpoint is {PATH}\n", 404))


async def web_file(request: HTTPRequest) -> Response:
    """The browser client's file for an HTTP path (`/` is index.html). Only files directly in WEB."""
    name = request.path_params.get("name", "index.html")
    file = WEB / name
    if file.suffix not in WEB_TYPES or not file.is_file():
        return APIError(404, f"no file {name!r}; the realtime endpoint is {PATH} and the HTTP API is under /v1",
                        "not_found_error").response()
    return FileResponse(file, media_type=f"{WEB_TYPES[file.suffix]}; charset=utf-8", headers={"Cache-Control": "no-cache"})


class HeaderTimeoutH11(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers. uvicorn itself times out only an idle
    keep-alive connection after a response, so a client that connects and sends nothing, or half a request line,
    would hold its socket (and a file descriptor) for good."""

    header_timeout_s = HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_late(self) -> None:
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():  # still no whole request line + headers
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # the headers are in: the app has the request now
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets the same deadline

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        self._disarm()  # the connection is the WebSocket's now
        super().handle_websocket_upgrade(event)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)


class _DenialNoise(logging.Filter):
    """uvicorn (0.54, websockets-sansio) logs this error after a WebSocket handshake is refused with an HTTP
    response through the ASGI denial extension, though the response went out correctly."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing handshake" not in record.getMessage()


logging.getLogger("uvicorn.error").addFilter(_DenialNoise())
