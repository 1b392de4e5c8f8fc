"""LoopBridge: association threads reach the event loop, and a stuck call fails on its own."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from gateway.scp.bridge import BridgeTimeout, LoopBridge


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_a_stuck_call_fails_its_request_and_is_cancelled(loop: asyncio.AbstractEventLoop) -> None:
    bridge = LoopBridge(loop, timeout=0.2)
    cancelled = threading.Event()

    async def stuck() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    started = time.monotonic()
    with pytest.raises(BridgeTimeout, match=r"stuck did not finish within 0.2 s"):
        bridge.call(stuck)
    assert time.monotonic() - started < 2
    assert cancelled.wait(2)  # the coroutine does not go on holding what it held

    async def quick(value: int) -> int:
        await asyncio.sleep(0)
        return value * 2

    assert bridge.call(quick, 21) == 42  # the bridge and the loop go on
