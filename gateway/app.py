"""The gateway's whole lifecycle in one function: wire the parts, serve, drain, close.

Signals set an event; a task group owns every long-lived task; shutdown stops the DICOM
listener first, gives open associations `shutdown_grace` seconds, then closes the control socket
and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field

import anyio
import structlog

from gateway import __version__
from gateway.config import Settings
from gateway.control.methods import register_core_methods
from gateway.control.server import ControlServer
from gateway.scp.bridge import LoopBridge
from gateway.scp.node import DicomNode
from gateway.store.store import Store

__all__ = ["Gateway", "run"]

log = structlog.get_logger(__name__)


@dataclass
class Gateway:
    """The running parts, as the control methods see them."""

    settings: Settings
    store: Store
    node: DicomNode
    control: ControlServer
    started_at: float = field(default_factory=time.time)
    version: str = __version__


async def run(
    settings: Settings,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM / SIGINT, or until *stop* is set (tests set it)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(signum, stop.set)
    store = Store(settings.node.data_dir, settings.node.duplicate_policy)
    await store.open()
    node = DicomNode(settings, store, LoopBridge(loop))
    control = ControlServer(settings.control_socket, settings.control)
    gateway = Gateway(settings, store, node, control)
    register_core_methods(control, gateway)
    try:
        await control.start()
        node.start()
        log.info("gateway_started", version=__version__, ae_title=settings.node.ae_title)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("gateway_stopping", open_associations=node.open_associations)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(node.stop, settings.node.shutdown_grace)
            await control.stop()
            await store.close()
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)
        log.info("gateway_stopped")
