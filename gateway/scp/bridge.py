"""The one way worker threads reach the event loop.

The node's handlers that block (a C-FIND reading answers, a C-MOVE listing its instances,
MPPS) run in worker threads. One that needs async work (a query on the index, a control-plane
notification) calls `LoopBridge.call`, which runs the
coroutine on the gateway's loop and blocks the calling thread, never the loop, until it is done
or `timeout` seconds have passed: a call stuck on the loop fails the one request it serves
(`BridgeTimeout`, a `GatewayError`, which handlers answer with a failure status) and is
cancelled, instead of holding a worker thread for ever.
structlog's context variables do not follow into threads; `call` carries the caller's bound
context over to the coroutine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from gateway.errors import GatewayError

__all__ = ["BridgeTimeout", "LoopBridge"]

DEFAULT_TIMEOUT = 120.0  # seconds; a C-MOVE's listing of a large study takes well under one


class BridgeTimeout(GatewayError):
    """A call from an association's thread to the event loop did not finish in time."""

    status = 0xA700


P = ParamSpec("P")
T = TypeVar("T")


class LoopBridge:
    """Run coroutines on *loop* from other threads and wait for their results."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = DEFAULT_TIMEOUT) -> None:
        self._loop = loop
        self.timeout = timeout

    def call(
        self,
        fn: Callable[P, Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn(*args, **kwargs)`` on the loop; block this thread until it returns.

        Raises
        ------
        BridgeTimeout
            It did not return within `timeout` seconds; it is cancelled on the loop.
        """
        if _running_loop() is self._loop:
            raise RuntimeError("LoopBridge.call from the event loop's own thread would deadlock")
        context = contextvars.copy_context()

        async def run() -> T:
            return await fn(*args, **kwargs)

        future = asyncio.run_coroutine_threadsafe(_in_context(context, run), self._loop)
        try:
            return future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            name = getattr(fn, "__qualname__", repr(fn))
            raise BridgeTimeout(
                f"{name} did not finish within {self.timeout:g} s on the event loop"
            ) from None

    def notify(self, fn: Callable[..., object], *args: object) -> None:
        """Schedule a plain callback on the loop without waiting for it."""
        self._loop.call_soon_threadsafe(fn, *args)


async def _in_context(context: contextvars.Context, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    task: asyncio.Task[T] = asyncio.get_running_loop().create_task(fn(), context=context)
    return await task


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
