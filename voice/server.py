"""The WebSocket server: ws://HOST:PORT/v1/realtime, one `Session` per connection, all sharing one engine.

Plain HTTP GETs of `/` and the files beside it in voice/web/ get the browser client (static files, no
token needed: the page itself holds nothing). The handshake is refused with a plain HTTP status on any
other path (404) or, when a token is set, without `Authorization: Bearer TOKEN` (401). Binding anywhere
but loopback requires a token. Messages larger than `max_message_bytes` close the connection (WebSocket
code 1009). When a client goes away its session is closed: generation stops, tasks end, the recognizer's
worker exits.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from functools import cache
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from engine import Engine
from voice.asr import ASR, make_asr
from voice.session import Services, Session
from voice.tts import TTS

log = logging.getLogger("voice.server")

PATH = "/v1/realtime"
WEB = Path(__file__).parent / "web"  # the browser client, served at GET /
WEB_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_services(engine: Engine, tts: TTS, asr: str = "whisper", **options) -> Services:
    """Services with `asr` loaded now (so the first turn does not wait for it) and others on first use."""

    @cache
    def backend(name: str) -> ASR:
        return make_asr(name)

    backend(asr)
    return Services(engine=engine, tts=tts, asr=backend, **options)


class VoiceServer:
    def __init__(self, services: Services, host: str = "127.0.0.1", port: int = 8765, token: str | None = None,
                 max_message_bytes: int = 1 << 20):
        if not is_loopback(host) and not token:
            raise ValueError(f"binding {host} exposes the server beyond this machine: pass --token to require one")
        self.services, self.host, self.port, self.token = services, host, port, token
        self.max_message_bytes = max_message_bytes
        self.sessions: set[Session] = set()
        self._server: Server | None = None

    async def start(self) -> None:
        self._server = await serve(self._handle, self.host, self.port, process_request=self._check_request,
                                   max_size=self.max_message_bytes, compression=None)
        self.port = self._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}{PATH}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def __aenter__(self) -> VoiceServer:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    def _check_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path.rstrip("/") != PATH:
            return web_file(path) or connection.respond(HTTPStatus.NOT_FOUND, f"the realtime endpoint is {PATH}\n")
        if self.token is not None:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.token}".encode()):
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong 'Authorization: Bearer TOKEN'\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        async def send(event: dict) -> None:
            await ws.send(json.dumps(event))

        session = Session(self.services, send)
        self.sessions.add(session)
        try:
            await session.start()
            async for message in ws:
                await session.handle(message)
        except ConnectionClosed:
            pass
        finally:
            self.sessions.discard(session)
            await session.close()


def web_file(path: str) -> Response | None:
    """The browser client's file for an HTTP path (`/` is index.html), or None. Only files directly in WEB."""
    name = "index.html" if path == "/" else path.removeprefix("/")
    file = WEB / name
    if "/" in name or file.suffix not in WEB_TYPES or not file.is_file():
        return None
    body = file.read_bytes()
    headers = Headers({"Content-Type": f"{WEB_TYPES[file.suffix]}; charset=utf-8", "Content-Length": str(len(body)),
                       "Cache-Control": "no-cache", "Connection": "close"})
    return Response(HTTPStatus.OK, "OK", headers, body)


async def run_server(server: VoiceServer) -> None:
    async with server:
        log.info("listening on %s", server.url)
        await asyncio.Future()  # until cancelled
