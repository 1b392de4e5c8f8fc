"""The one way association threads reach the event loop.

pynetdicom runs every association in threads of its own. A handler that needs async work (a
query on the index, a control-plane notification) calls `LoopBridge.call`, which runs the
coroutine on the gateway's loop and blocks the calling thread, never the loop, until it is done.
structlog's context variables do not follow into threads; `call` carries the caller's bound
context over to the coroutine.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

__all__ = ["LoopBridge"]

P = ParamSpec("P")
T = TypeVar("T")


class LoopBridge:
    """Run coroutines on *loop* from other threads and wait for their results."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def call(
        self,
        fn: Callable[P, Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``fn(*args, **kwargs)`` on the loop; block this thread until it returns."""
        if _running_loop() is self._loop:
            raise RuntimeError("LoopBridge.call from the event loop's own thread would deadlock")
        context = contextvars.copy_context()

        async def run() -> T:
            return await fn(*args, **kwargs)

        future = asyncio.run_coroutine_threadsafe(_in_context(context, run), self._loop)
        return future.result()

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
