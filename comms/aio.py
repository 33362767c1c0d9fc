"""An asyncio event loop in its own daemon thread, for synchronous code to reach the network.

The training loop is synchronous; gRPC (grpc.aio) and HTTP (aiohttp) clients live on an event
loop. ``LoopThread`` runs that loop in a background thread. Synchronous code hands it
coroutines: ``run(coro, timeout)`` blocks for the result (every blocking call takes a
timeout), ``submit(coro)`` returns a ``concurrent.futures.Future`` to collect later, so a push
can be in flight while training goes on. Exceptions raised by a coroutine re-raise in the
caller.

Concurrency: one loop, one thread. Objects created on the loop (channels, servers) must be
used only through it. ``run`` must not be called from the loop's own thread (it would wait
for itself); it raises RuntimeError instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class LoopThread:
    """An asyncio loop running in a daemon thread. Use as a context manager or start/stop."""

    def __init__(self, name: str = "archipelago-loop"):
        self.name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or not self.running:
            raise RuntimeError(f"{self.name}: loop thread is not running; call start() first")
        return self._loop

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> LoopThread:
        if self.running:
            return self
        loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._main, args=(loop, ready), name=self.name, daemon=True
        )
        self._loop = loop
        self._thread.start()
        ready.wait()
        return self

    @staticmethod
    def _main(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            _cancel_all(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; the future holds its result or exception."""
        try:
            loop = self.loop
        except RuntimeError:
            coro.close()  # never awaited; close it to avoid a "never awaited" warning
            raise
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the loop and block for its result for at most ``timeout`` seconds.

        On timeout the coroutine is cancelled and TimeoutError is raised.
        """
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError(f"{self.name}: run() called from the loop thread; await instead")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()  # finished just now, or raised TimeoutError itself
            future.cancel()
            raise TimeoutError(
                f"{self.name}: coroutine did not finish within {timeout} s"
            ) from None

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel pending tasks, stop the loop and join the thread (at most ``timeout`` s)."""
        if not self.running:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"{self.name}: loop thread did not stop within {timeout} s")
        self._thread = None

    def __enter__(self) -> LoopThread:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel every task still pending on ``loop`` and let them unwind."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
