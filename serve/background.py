"""An asyncio event loop of its own, in a daemon thread: for components whose callers may be on any thread or
loop (the remote backend's HTTP client, the synthetic users, the dashboard's voice link)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any


class BackgroundLoop:
    def __init__(self, name: str):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        """Start `coro` on the loop; its future can be waited on or cancelled from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine) -> Any:
        """Run `coro` on the loop and wait for its result (never call this from the loop itself)."""
        return self.submit(coro).result()

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run the plain function fn(*args) on the loop's thread and wait for its result."""
        async def run() -> Any:
            return fn(*args)

        return self.run(run())

    def stop(self) -> None:
        """Stop the loop and wait for its thread (tasks still pending are dropped)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self.loop.close()
