"""The gateway's whole lifecycle in one function: wire the parts, serve, drain, close.

The parts: the store; the DICOM node, whose committed instances feed the completion engine; the
completion engine, whose completed series and studies become dispatch jobs; the dispatcher,
which sends them; the control socket. Signals set an event; shutdown stops the DICOM listener
first, gives open associations `shutdown_grace` seconds, stops the engine and the dispatcher
(interrupted jobs resume at the next start), then closes the control socket and the store.
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
from gateway.control.jobs import register_job_methods
from gateway.control.methods import register_core_methods
from gateway.control.server import ControlServer
from gateway.rules.runtime import CompletedWork, CompletionEngine
from gateway.scp.bridge import LoopBridge
from gateway.scp.node import DicomNode
from gateway.scu.dispatch import Dispatcher
from gateway.store.jobs import Backoff, JobQueue
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
    jobs: JobQueue
    dispatcher: Dispatcher
    completion: CompletionEngine
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
    jobs = JobQueue(store)
    await jobs.ensure_schema()
    await jobs.recover_running()
    dispatcher = Dispatcher(settings, store, jobs, backoff=Backoff())

    async def enqueue(work: CompletedWork) -> None:
        if work.rule.action != "route":  # notify is not sent yet (docs/rules.md)
            return
        for target in work.rule.targets:
            await jobs.enqueue(work.scope, work.uid, target, work.rule.name, work.rule.priority)
        dispatcher.wake()

    completion = CompletionEngine(settings.rules, store, enqueue)
    store.set_ingest_listener(completion.arrived_from_thread)
    node = DicomNode(settings, store, LoopBridge(loop))
    control = ControlServer(settings.control_socket, settings.control)
    gateway = Gateway(settings, store, node, control, jobs, dispatcher, completion)
    register_core_methods(control, gateway)
    register_job_methods(control, gateway)
    tasks = [
        asyncio.create_task(completion.run(), name="completion"),
        asyncio.create_task(dispatcher.run(), name="dispatcher"),
    ]
    try:
        await control.start()
        node.start()
        log.info("gateway_started", version=__version__, ae_title=settings.node.ae_title)
        if ready is not None:
            ready.set()
        await _wait_for_stop(stop, tasks)
        log.info("gateway_stopping", open_associations=node.open_associations)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(node.stop, settings.node.shutdown_grace)
            tasks[0].cancel()
            dispatcher.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await control.stop()
            await store.close()
            for signum in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(signum)
        log.info("gateway_stopped")


async def _wait_for_stop(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    """Wait for *stop*; a long-lived task that ends first is a fault, raised here."""
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
    if waiter not in done:
        waiter.cancel()
        for task in done:
            task.result()  # raises what ended it
            raise RuntimeError(f"{task.get_name()} stopped unexpectedly")
