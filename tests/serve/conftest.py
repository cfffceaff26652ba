"""Fixtures of the serving-layer tests: an ASGI app on a loopback port in a background thread, the OpenAI API over
an engine, and one engine behind a module's HTTP tests."""

import threading
import time

import pytest


class APIServer:
    """An ASGI app served by uvicorn on a free loopback port, in a background thread (so sync clients can call it)."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "APIServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the API server did not start"
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def api_app(engine, token=None, tradeoff_routes=True, max_body_bytes=None):
    """The OpenAI API over `engine` as an app; without tradeoff's own routes it looks like any OpenAI-compatible server."""
    from starlette.applications import Starlette

    from serve.openai_api import EXCEPTION_HANDLERS, MAX_BODY_BYTES, OpenAIAPI

    api = OpenAIAPI(engine, token=token, max_body_bytes=max_body_bytes or MAX_BODY_BYTES)
    routes = [r for r in api.routes if tradeoff_routes or not r.path.startswith("/v1/tradeoff")]
    return Starlette(routes=routes, exception_handlers=EXCEPTION_HANDLERS)


@pytest.fixture(scope="module")
def served_engine(default_model):
    """The engine behind a module's HTTP API tests (module scope: later tests check that no engine thread is left)."""
    from engine import Engine

    # Speculation off: its k adapts to measured step times, and with int4 weights verifying k + 1 rows at once is not
    # bitwise equal to single steps, so a near-tie could flip between two greedy runs (test_speculative checks that
    # path in fp32). These tests compare the API's text with the engine's, so they need the same text every run.
    e = Engine(default_model, spec="off")
    yield e
    e.close()


@pytest.fixture(scope="module")
def api_server(served_engine):
    with APIServer(api_app(served_engine)) as s:
        yield s
