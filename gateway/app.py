"""The gateway's whole lifecycle in one function: wire the parts, serve, drain, close.

The parts: the store; the DICOM node, whose committed instances feed the completion engine; the
completion engine, whose completed series and studies become dispatch jobs; the dispatcher,
which sends them; the retriever, which fetches cohorts from the archives and hands them to the
dispatcher; retention, which deletes studies whose work is over; the control socket; the
metrics (counted by the parts, served by the `[metrics]` endpoint when it is on).
Signals set an event; shutdown stops the DICOM listener first (`/healthz` answers 503 from
then on), gives open associations `shutdown_grace` seconds, stops the engine, retention and the
dispatcher (interrupted jobs resume at the next start), then closes the control socket, the
metrics endpoint and the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import structlog

from gateway import __version__
from gateway.acquire.registry import Registry
from gateway.acquire.results import Uploads
from gateway.audit import AuditLog
from gateway.config import Settings, load_settings
from gateway.control.acquire import register_acquisition_methods
from gateway.control.auth import device_arrived, device_gone, make_authenticator
from gateway.control.jobs import register_job_methods
from gateway.control.methods import StatusSources, register_core_methods
from gateway.control.retrieve import register_retrieve_methods
from gateway.control.server import ControlServer
from gateway.errors import ConfigError
from gateway.metrics import Metrics, MetricsEndpoint, Probe
from gateway.retrieve.requests import RetrievalQueue
from gateway.retrieve.worker import Retriever
from gateway.rules.runtime import CompletedWork, CompletionEngine
from gateway.scp.bridge import LoopBridge
from gateway.scp.node import DicomNode
from gateway.scu.dispatch import Dispatcher
from gateway.store.completions import CompletionStore
from gateway.store.jobs import JobQueue
from gateway.store.retention import Retention
from gateway.store.store import Store
from gateway.work import Backoff

__all__ = ["Gateway", "register_control_methods", "run"]

log = structlog.get_logger(__name__)


@dataclass
class Gateway:
    """The running parts; `register_control_methods` gives each control method the ones it uses."""

    settings: Settings
    store: Store
    node: DicomNode
    control: ControlServer
    jobs: JobQueue
    dispatcher: Dispatcher
    completion: CompletionEngine
    retriever: Retriever
    retrievals: RetrievalQueue
    registry: Registry
    uploads: Uploads
    metrics: Metrics
    probe: Probe
    endpoint: MetricsEndpoint | None = None
    config_path: Path | None = None
    started_at: float = field(default_factory=time.time)
    version: str = __version__
    _background: set[asyncio.Task[None]] = field(default_factory=set)

    def reload(self) -> dict[str, Any]:
        """Re-read the config file and apply its rules, peers, folders and webhooks.

        A file that does not load (a malformed rule, an unknown target) raises ConfigError
        and changes nothing: the running settings stay. Other sections apply at the next
        start; the result lists those that differ.
        """
        if self.config_path is None:
            raise ConfigError("the gateway was started without a config file to reload")
        new = load_settings(self.config_path)
        before = {peer.name: peer for peer in self.settings.peers}
        changed = [peer.name for peer in new.peers if before.get(peer.name) != peer]
        applied: dict[str, Any] = {key: getattr(new, key) for key in _RELOADABLE}
        # Operator tokens apply at once; the rest of [control] at the next start.
        hashes = new.control.operator_token_hashes
        applied["control"] = self.settings.control.model_copy(
            update={"operator_token_hashes": hashes}
        )
        removed = set(self.settings.control.operator_token_hashes) - set(hashes)
        restart = [
            key
            for key in type(new).model_fields
            if key not in _RELOADABLE
            and getattr(new, key) != (applied.get(key) or getattr(self.settings, key))
        ]
        self.settings = self.settings.model_copy(update=applied)
        self.completion.set_rules(self.settings.rules)
        self.dispatcher.settings = self.settings
        self.retriever.settings = self.settings
        self.node.services.use_peers(self.settings)
        self.node.access.use(self.settings)
        if removed:
            self.control.close_sessions(removed, "operator token removed from the configuration")
        if changed:
            # A job failed for good against a peer (it did not know our AE title, or was not
            # configured) may go now that the peer's settings changed.
            task = asyncio.get_running_loop().create_task(self._requeue(changed))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        self.dispatcher.wake()
        if self.store.audit is not None:
            self.store.audit.record("Application Activity", what="configuration reloaded",
                                    peers_changed=changed)  # fmt: skip
        log.info(
            "config_reloaded",
            rules=len(self.settings.rules),
            peers=len(self.settings.peers),
            restart_needed=restart,
        )
        return {
            "peers_changed": changed,
            "rules": [rule.name for rule in self.settings.rules],
            "applied": [*_RELOADABLE, "control.operator_token_hashes"],
            "restart_needed": restart,
        }

    async def _requeue(self, targets: list[str]) -> None:
        requeued = await self.jobs.retry(state="failed", targets=targets)
        if requeued:
            log.info(
                "jobs_requeued", targets=targets, jobs=requeued, reason="peer settings changed"
            )
            self.dispatcher.wake()
        retrievals = await self.retriever.queue.retry_blocked(targets)
        if retrievals:
            log.info(
                "retrievals_requeued",
                peers=targets,
                requests=retrievals,
                reason="peer settings changed",
            )
            self.retriever.wake()


# What `Gateway.reload` applies while running; the other sections are read at start-up.
_RELOADABLE = ("rules", "peers", "folders", "webhooks", "projects")


def register_control_methods(control: ControlServer, gateway: Gateway) -> None:
    """Register every control method on *control*, each given the parts it uses (the running
    settings through a getter: `Gateway.reload` replaces them)."""

    def settings() -> Settings:
        return gateway.settings

    sources = StatusSources(
        version=gateway.version,
        started_at=gateway.started_at,
        node=gateway.node,
        probe=gateway.probe,
        metrics=gateway.metrics,
        endpoint=lambda: gateway.endpoint,
    )
    register_core_methods(control, gateway.store, settings, sources, gateway.reload)
    register_job_methods(control, gateway.jobs, gateway.dispatcher.wake, gateway.completion)
    register_retrieve_methods(control, gateway.retrievals, gateway.retriever, settings)
    register_acquisition_methods(control, gateway.registry, gateway.uploads, gateway.store)


def _dispatch_targets(settings: Settings) -> list[str]:
    """Where jobs go: rule targets, and the anonymisers retrieval forwards to."""
    names = [target for rule in settings.rules for target in rule.targets]
    names += [settings.retrieve.anonymiser or "", *(p.anonymiser or "" for p in settings.projects)]
    return sorted({name for name in names if name})


async def run(
    settings: Settings,
    *,
    config_path: Path | None = None,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until SIGTERM / SIGINT, or until *stop* is set (tests set it).

    SIGHUP reloads *config_path* like the `rules.reload` control method.
    """
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
            loop.add_signal_handler(signum, stop.set)
    store = Store(
        settings.node.data_dir,
        settings.node.duplicate_policy,
        min_free_bytes=settings.node.min_free_mb * 2**20,
    )
    await store.open()
    audit = AuditLog(settings.node.data_dir / "audit", settings.audit.syslog_address())
    store.audit = audit
    jobs = JobQueue(store, lease_seconds=settings.dispatch.lease_seconds)
    await jobs.ensure_schema()
    await CompletionStore(store).ensure_schema()
    retrievals = RetrievalQueue(store, lease_seconds=settings.retrieve.lease_seconds)
    await retrievals.ensure_schema()
    registry = Registry(store)
    await registry.ensure_schema()
    uploads = Uploads(store, registry, settings.control.upload_idle_timeout)
    await uploads.ensure_schema()
    await jobs.recover_running()
    await retrievals.recover()
    metrics = Metrics()
    metrics.declare_targets(_dispatch_targets(settings))
    dispatch = settings.dispatch
    backoff = Backoff(
        dispatch.retry_base_seconds, dispatch.retry_max_seconds, dispatch.max_attempts
    )
    dispatcher = Dispatcher(
        settings,
        store,
        jobs,
        backoff=backoff,
        per_target_concurrency=dispatch.per_target_concurrency,
        metrics=metrics,
    )

    async def completed(work: CompletedWork) -> None:
        dispatcher.wake()  # its jobs were queued with the completion

    completion = CompletionEngine(settings.rules, store, completed)
    retriever = Retriever(settings, store, retrievals, jobs, wake_dispatcher=dispatcher.wake)
    dispatcher.on_job_ended = retriever.job_ended
    store.set_ingest_listener(completion.arrived_from_thread)
    node = DicomNode(settings, store, LoopBridge(loop), registry, metrics)
    node.services.audit = audit
    control = ControlServer(settings.control_socket, settings.control, metrics)
    control.audit = audit
    dispatcher.audit = audit
    gateway = Gateway(
        settings,
        store,
        node,
        control,
        jobs,
        dispatcher,
        completion,
        retriever,
        retrievals,
        registry,
        uploads,
        metrics,
        Probe(
            loop,
            store,
            listening=lambda: node.listening,
            open_associations=lambda: node.open_associations,
            names=lambda: (
                _dispatch_targets(gateway.settings),
                [project.name for project in gateway.settings.projects],
            ),
        ),
        config_path=config_path,
    )

    def reload_on_signal() -> None:
        try:
            gateway.reload()
        except ConfigError as exc:
            log.error("config_reload_refused", error=str(exc))

    with contextlib.suppress(NotImplementedError, RuntimeError):
        loop.add_signal_handler(signal.SIGHUP, reload_on_signal)
    register_control_methods(control, gateway)
    control.authenticator = make_authenticator(lambda: gateway.settings, registry)
    # A device's session makes it ONLINE (or BUSY, told its task again) and its end OFFLINE.
    control.on_session_start = lambda session: device_arrived(registry, session)
    control.on_session_end = lambda session: device_gone(control, registry, uploads, session)
    metrics.declare_methods([*control.methods, "auth.login"])
    if settings.metrics.port is not None:
        gateway.endpoint = MetricsEndpoint(settings.metrics, metrics, gateway.probe)
    retention = Retention(store, settings.retention)
    tasks = [
        asyncio.create_task(completion.run(), name="completion"),
        asyncio.create_task(dispatcher.run(), name="dispatcher"),
        asyncio.create_task(retriever.run(), name="retriever"),
        asyncio.create_task(uploads.run_expiry(), name="upload-expiry"),
    ]
    if retention.enabled:
        tasks.append(asyncio.create_task(retention.run(), name="retention"))
    try:
        await control.start()
        if gateway.endpoint is not None:  # before the node: a port taken stops before any DICOM
            gateway.endpoint.start()
        await node.open()
        log.info("gateway_started", version=__version__, ae_title=settings.node.ae_title)
        audit.record("Application Activity", what="started", version=__version__,
                     ae_title=settings.node.ae_title)  # fmt: skip
        if ready is not None:
            ready.set()
        await _wait_for_stop(stop, tasks)
        log.info("gateway_stopping", open_associations=node.open_associations)
        audit.record("Application Activity", what="stopped", version=__version__)
    finally:
        with anyio.CancelScope(shield=True):
            gateway.probe.stopping.set()  # /healthz: 503 while open associations finish
            await node.close(settings.node.shutdown_grace)
            for task in tasks:
                if task.get_name() not in ("dispatcher", "retriever"):
                    task.cancel()
            dispatcher.stop()
            retriever.stop()
            await asyncio.gather(*tasks, return_exceptions=True)
            await control.stop()
            if gateway.endpoint is not None:  # before the store: a scrape may be reading it
                await anyio.to_thread.run_sync(gateway.endpoint.stop)
            await store.close()
            audit.close()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
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
