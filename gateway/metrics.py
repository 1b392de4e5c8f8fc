"""Prometheus metrics and the health check: what the gateway counts, and the HTTP endpoint.

`Metrics` holds the counters and the C-STORE histogram in a `CollectorRegistry` of the running
gateway's own (never prometheus_client's global one: a process may run several gateways). It is
passed down by constructor to the parts where each event happens, and each event is counted in
one place: the DICOM handlers (`gateway.scp.handlers`: instances, associations, requests), the
acceptor (`gateway.scp.acceptor`: requests refused before a handler; `gateway.scp.tls`: TLS
handshakes that failed), the dispatcher (deliveries and failed attempts) and the control server
(requests and errors). prometheus_client's counters are thread-safe; handlers run in worker
threads.

What the index holds (jobs, retrieval requests, completion waits, devices, the store's running
totals) is read when it is asked for, never written per instance: `Probe.figures` reads it on
the gateway's event loop, `GatewayCollector` hands that read to the loop from the HTTP thread
(`asyncio.run_coroutine_threadsafe`, with a timeout) at each scrape, and the `status` control
method awaits the same read.

`MetricsEndpoint` serves `/metrics` (prometheus_client's `make_wsgi_app`) and `/healthz` with
the standard library's wsgiref server, one request at a time, in one thread of its own; it is
started by `gateway.app.run` when `[metrics] port` is set and stopped in its shutdown (thread
joined, socket closed). docs/config.md lists every metric.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

import anyio
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from gateway import __version__
from gateway.config import MetricsSettings
from gateway.errors import GatewayError, StoreError
from gateway.store.store import Store

__all__ = [
    "DEVICE_STATES",
    "JOB_STATES",
    "REJECTION_REASONS",
    "RETRIEVAL_STATUSES",
    "Figures",
    "GatewayCollector",
    "Metrics",
    "MetricsEndpoint",
    "Probe",
    "query_level",
    "status_text",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

# Label values known in advance: their series exist (at 0) from the start, so that a first
# event is a rise a rate() sees, and dashboards show every state.
REJECTION_REASONS = (
    "called_ae_title_not_recognised",
    "calling_ae_title_not_allowed",
    "calling_host_not_allowed",
    "association_limit_reached",
    "tls_handshake_failed",
)
JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
RETRIEVAL_STATUSES = ("Queued", "Processing", "Successful", "Failed", "QueueFailed")
DEVICE_STATES = ("ONLINE", "BUSY", "ERROR", "OFFLINE")
_QR_LEVELS = {"PATIENT": "patient", "STUDY": "study", "SERIES": "series", "IMAGE": "image"}
# Seconds of one C-STORE's handling (checks, fsync, index commit): from ~1 ms to a slow disk.
_STORE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Control methods are labelled by name only when registered; anything else is one of these.
UNKNOWN_METHOD = "unknown"
INVALID_REQUEST = "invalid"
OTHER_PROJECT = "other"  # a retrieval request naming a project that is not configured


def status_text(status: int) -> str:
    """A DIMSE status as a label value: 0xNNNN, upper-case hex."""
    return f"0x{status & 0xFFFF:04X}"


def query_level(request: Any) -> str:
    """The Query/Retrieve Level of a C-FIND / C-MOVE / C-GET request (its identifier, or a
    the request) as a label value: patient, study, series, image, or other (missing,
    unknown, undecodable)."""
    try:
        identifier = getattr(request, "identifier", request)
        level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    except Exception:  # a malformed identifier: its handler answers it; the label is "other"
        return "other"
    return _QR_LEVELS.get(level, "other")


class Metrics:
    """The gateway's counters, in a registry of its own (see the module docstring)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "gateway_instances_received",
            "Instances received by C-STORE and answered with a success status (new, replaced"
            " or an identical re-send).",
            registry=r,
        )
        self.received_bytes = Counter(
            "gateway_received_bytes",
            "Dataset bytes (File Meta excluded, as the store counts them) of the instances in"
            " gateway_instances_received_total.",
            registry=r,
        )
        self.instances_refused = Counter(
            "gateway_instances_refused",
            "C-STORE requests answered with a failure status, by that status.",
            ["status"],
            registry=r,
        )
        self.store_seconds = Histogram(
            "gateway_cstore_duration_seconds",
            "Time from a complete C-STORE request to its answer (checks, fsync, index commit).",
            buckets=_STORE_BUCKETS,
            registry=r,
        )
        self.associations_accepted = Counter(
            "gateway_associations_accepted", "Inbound associations accepted.", registry=r
        )
        self.associations_rejected = Counter(
            "gateway_associations_rejected",
            "Inbound associations rejected (or TLS connections that failed their handshake),"
            " by reason.",
            ["reason"],
            registry=r,
        )
        self.dimse_requests = Counter(
            "gateway_dimse_requests",
            "DIMSE requests served other than C-STORE, by service (echo, find, move, get,"
            " worklist, mpps) and Query/Retrieve level (find, move, get; empty for the others).",
            ["service", "level"],
            registry=r,
        )
        self.dimse_refused = Counter(
            "gateway_dimse_requests_refused",
            "DIMSE requests other than C-STORE refused before a handler (0x0124 not authorised,"
            " 0x0122 SOP class off its context), by service and status.",
            ["service", "status"],
            registry=r,
        )
        self.dispatch_delivered = Counter(
            "gateway_dispatch_instances_delivered",
            "Instances dispatch jobs delivered (acknowledged by a peer, written to a folder),"
            " by target.",
            ["target"],
            registry=r,
        )
        self.dispatch_completed = Counter(
            "gateway_dispatch_jobs_completed",
            "Dispatch job attempts that finished their job (everything delivered, a webhook"
            " answered 2xx), by target.",
            ["target"],
            registry=r,
        )
        self.dispatch_failures = Counter(
            "gateway_dispatch_failures",
            "Dispatch job attempts that failed (the job is retried later or, at"
            " max_attempts, failed), by target.",
            ["target"],
            registry=r,
        )
        self.control_requests = Counter(
            "gateway_control_requests",
            "Control requests answered, by method (unknown: a method that does not exist;"
            " invalid: no method could be read).",
            ["method"],
            registry=r,
        )
        self.control_errors = Counter(
            "gateway_control_errors",
            "Control requests answered with an error, by method (as for the requests).",
            ["method"],
            registry=r,
        )
        self.index_read_failures = Counter(
            "gateway_metrics_index_read_failures",
            "Scrapes whose read of the index failed or timed out (its gauges were left out).",
            registry=r,
        )
        for reason in REJECTION_REASONS:
            self.associations_rejected.labels(reason=reason)
        for service in ("echo", "find", "move", "get"):
            levels = ("",) if service == "echo" else ("patient", "study", "series", "image")
            for level in levels:
                self.dimse_requests.labels(service=service, level=level)
        self.control_requests.labels(method=UNKNOWN_METHOD)
        self.control_errors.labels(method=UNKNOWN_METHOD)

    def declare_targets(self, targets: Iterable[str]) -> None:
        """Start the per-target counters of *targets* at 0."""
        for target in targets:
            for counter in (self.dispatch_delivered, self.dispatch_completed,
                            self.dispatch_failures):  # fmt: skip
                counter.labels(target=target)

    def declare_methods(self, methods: Iterable[str]) -> None:
        """Start the per-method control counters of *methods* at 0."""
        for method in methods:
            self.control_requests.labels(method=method)
            self.control_errors.labels(method=method)

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON-ready values (for the `status` control method)."""
        requests: dict[str, int] = {}
        for (service, _level), value in _values(self.dimse_requests).items():
            requests[service] = requests.get(service, 0) + value
        refused: dict[str, dict[str, int]] = {}
        for (service, status), value in _values(self.dimse_refused).items():
            refused.setdefault(service, {})[status] = value
        store = {s.name: s.value for s in _samples(self.store_seconds)}
        return {
            "associations": {
                "accepted": _value(self.associations_accepted),
                "rejected": _by_label(self.associations_rejected),
            },
            "instances": {
                "received": _value(self.instances_received),
                "received_bytes": _value(self.received_bytes),
                "refused": _by_label(self.instances_refused),
                "cstore_seconds": {
                    "count": int(store.get("gateway_cstore_duration_seconds_count", 0)),
                    "sum": round(store.get("gateway_cstore_duration_seconds_sum", 0.0), 6),
                },
            },
            "dimse_requests": requests,
            "dimse_requests_refused": refused,
            "dispatch": {
                "delivered": _by_label(self.dispatch_delivered),
                "completed": _by_label(self.dispatch_completed),
                "failures": _by_label(self.dispatch_failures),
            },
            "control": {
                "requests": _by_label(self.control_requests),
                "errors": _by_label(self.control_errors),
            },
        }


def _samples(metric: Counter | Histogram) -> Iterator[Any]:
    for family in metric.collect():
        yield from family.samples


def _values(counter: Counter) -> dict[tuple[str, ...], int]:
    """A labelled counter's values (the `_total` samples) by label values."""
    return {
        tuple(sample.labels.values()): int(sample.value)
        for sample in _samples(counter)
        if sample.name.endswith("_total")
    }


def _by_label(counter: Counter) -> dict[str, int]:
    return {key[0]: value for key, value in _values(counter).items()}


def _value(counter: Counter) -> int:
    return next(iter(_values(counter).values()), 0)


# -- what the index and the process hold, read when asked --------------------------------------


@dataclass(frozen=True)
class Figures:
    """The gauges' values at one moment."""

    counts: dict[str, int]  # Store.counts(): patients, studies, series, instances, bytes
    disk_free: int
    disk_total: int
    jobs: dict[tuple[str, str], int]  # (state, target) -> jobs
    retrievals: dict[tuple[str, str], int]  # (project, status) -> requests
    waits: dict[str, int]  # scope (series, study) -> completions waiting
    devices: dict[str, int]  # state -> devices

    def jobs_by_state(self) -> dict[str, int]:
        totals = dict.fromkeys(JOB_STATES, 0)
        for (state, _target), count in self.jobs.items():
            totals[state] = totals.get(state, 0) + count
        return totals

    def retrievals_by_status(self) -> dict[str, int]:
        totals = dict.fromkeys(RETRIEVAL_STATUSES, 0)
        for (_project, status), count in self.retrievals.items():
            totals[status] = totals.get(status, 0) + count
        return totals


def _index_figures(conn: Any) -> tuple[dict[Any, int], ...]:
    """One pass over the small grouped counts (on a read connection of the store's pool)."""
    jobs = {
        (str(state), str(target)): int(n)
        for state, target, n in conn.execute(
            "SELECT state, target, count(*) FROM jobs GROUP BY state, target"
        )
    }
    retrievals = {
        (str(project), str(status)): int(n)
        for project, status, n in conn.execute(
            "SELECT project, status, count(*) FROM retrievals GROUP BY project, status"
        )
    }
    waits = {
        str(scope): int(n)
        for scope, n in conn.execute(
            "SELECT scope, count(*) FROM completions WHERE state = 'waiting' GROUP BY scope"
        )
    }
    devices = {
        str(state): int(n)
        for state, n in conn.execute("SELECT state, count(*) FROM devices GROUP BY state")
    }
    return jobs, retrievals, waits, devices


@dataclass
class Probe:
    """What the endpoint and `status` read of the running gateway.

    *listening*, *open_associations* and *names* are called from any thread; `figures` runs on
    the gateway's loop, and `on_loop` runs a coroutine there from another thread.
    """

    loop: asyncio.AbstractEventLoop
    store: Store
    listening: Callable[[], bool]
    open_associations: Callable[[], int]
    # (configured targets, configured projects), read from the current (reloaded) settings
    names: Callable[[], tuple[Collection[str], Collection[str]]]
    timeout: float = 5.0
    stopping: threading.Event = field(default_factory=threading.Event)

    async def figures(self) -> Figures:
        counts = await self.store.counts()
        usage = await anyio.to_thread.run_sync(shutil.disk_usage, self.store.files.root)
        jobs, retrievals, waits, devices = await self.store.read(_index_figures)
        targets, projects = self.names()
        for target in {*targets, *(t for _s, t in jobs)}:
            for state in JOB_STATES:
                jobs.setdefault((state, target), 0)
        by_project: dict[tuple[str, str], int] = {}
        for (project, status), count in retrievals.items():
            key = (project if project in projects else OTHER_PROJECT, status)
            by_project[key] = by_project.get(key, 0) + count
        for project in {*projects, *(p for p, _s in by_project)}:
            for status in RETRIEVAL_STATUSES:
                by_project.setdefault((project, status), 0)
        return Figures(
            counts=counts,
            disk_free=usage.free,
            disk_total=usage.total,
            jobs=jobs,
            retrievals=by_project,
            waits={"series": waits.get("series", 0), "study": waits.get("study", 0)},
            devices={**dict.fromkeys(DEVICE_STATES, 0), **devices},
        )

    def on_loop(self, make: Callable[[], Coroutine[Any, Any, T]], timeout: float) -> T:
        """Run a coroutine on the gateway's loop from another thread; raise `GatewayError` when
        it fails or does not end within *timeout* seconds (it is then cancelled)."""
        coroutine = make()
        try:
            future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        except RuntimeError as exc:  # the loop is closed
            coroutine.close()
            raise GatewayError(f"the event loop is not running: {exc}") from None
        try:
            return future.result(timeout)
        except TimeoutError:
            future.cancel()
            raise GatewayError(f"the event loop did not answer within {timeout:g} s") from None
        except GatewayError:
            raise
        except Exception as exc:
            raise GatewayError(f"{type(exc).__name__}: {exc}") from exc

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, JSON body): the node accepts instances, or the reason it does not."""
        body: dict[str, Any] = {"status": "ok"}
        reason = None
        if self.stopping.is_set():
            reason = "shutting down"
        elif not self.listening():
            reason = "the DICOM listener is not running"
        else:
            try:
                free = self.store.free_bytes(max_age=0)
                body["disk_free_bytes"] = free
                self.store.check_free()  # the guard instances pass, on the figure just read
            except OSError as exc:
                body["disk_free_bytes"] = 0
                reason = f"cannot read the free disk space: {exc.strerror}"
            except StoreError as exc:
                reason = str(exc)
            body["min_free_bytes"] = self.store.min_free_bytes
            if reason is None:
                try:
                    self.on_loop(lambda: self.store.read(_ping), min(self.timeout, 2.0))
                except GatewayError as exc:
                    reason = f"the store cannot be read: {exc}"
        if reason is not None:
            body.update(status="unavailable", reason=reason)
        body["open_associations"] = self.open_associations()
        return reason is None, body


def _ping(conn: Any) -> int:
    return int(conn.execute("SELECT 1").fetchone()[0])


class GatewayCollector:
    """The gauges, read at each scrape: the index's through `Probe.figures` on the loop, the
    process's directly. An index read that fails or times out leaves its gauges out of that
    scrape (and counts `gateway_metrics_index_read_failures_total`); the others are served."""

    def __init__(self, metrics: Metrics, probe: Probe) -> None:
        self._metrics = metrics
        self._probe = probe
        self._started = time.time()

    def describe(self) -> Iterable[Metric]:
        """The families `collect` yields, without samples (for the registry's name checks and
        `/metrics?name[]=...`), read from nothing."""
        for name in _GAUGES:
            yield GaugeMetricFamily(name, "")
        yield CounterMetricFamily("gateway_store_sop_instance_uid_conflicts", "")

    def collect(self) -> Iterable[Metric]:
        probe = self._probe
        yield _gauge("gateway_build_info", "The running gateway's version.", 1.0,
                     version=__version__)  # fmt: skip
        yield _gauge("gateway_start_time_seconds", "When this gateway started (Unix time).",
                     self._started)  # fmt: skip
        yield _gauge("gateway_associations_open", "Inbound associations established now.",
                     probe.open_associations())  # fmt: skip
        healthy = not probe.stopping.is_set() and probe.listening()
        yield _gauge("gateway_dicom_listener_up", "1 while the DICOM listener accepts"
                     " connections and the gateway is not shutting down.",
                     1.0 if healthy else 0.0)  # fmt: skip
        yield _gauge("gateway_disk_min_free_bytes", "Free disk below which instances are"
                     " refused 0xA700 (node.min_free_mb; 0: no check).",
                     probe.store.min_free_bytes)  # fmt: skip
        try:
            figures = probe.on_loop(probe.figures, probe.timeout)
        except GatewayError as exc:
            self._metrics.index_read_failures.inc()
            log.warning("metrics_index_read_failed", error=str(exc))
            return
        yield from _figure_families(figures)


_GAUGES = (
    "gateway_build_info",
    "gateway_start_time_seconds",
    "gateway_associations_open",
    "gateway_dicom_listener_up",
    "gateway_disk_min_free_bytes",
    "gateway_store_bytes",
    "gateway_store_objects",
    "gateway_disk_free_bytes",
    "gateway_disk_total_bytes",
    "gateway_dispatch_jobs",
    "gateway_retrieval_requests",
    "gateway_completion_waits",
    "gateway_devices",
)


def _gauge(name: str, documentation: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def _figure_families(figures: Figures) -> Iterator[Metric]:
    counts = figures.counts
    yield _gauge("gateway_store_bytes", "Dataset bytes of the instances held.", counts["bytes"])
    objects = GaugeMetricFamily(
        "gateway_store_objects", "Patients, studies, series and instances held.", labels=["level"]
    )
    for level, key in (("patient", "patients"), ("study", "studies"), ("series", "series"),
                       ("instance", "instances")):  # fmt: skip
        objects.add_metric([level], counts[key])
    yield objects
    yield CounterMetricFamily(
        "gateway_store_sop_instance_uid_conflicts",
        "Instances refused (0xC112) as another object under a held SOP Instance UID, since"
        " the index was made.",
        value=counts.get("sop_instance_uid_conflicts", 0),
    )
    yield _gauge("gateway_disk_free_bytes", "Bytes free for the store on its file system.",
                 figures.disk_free)  # fmt: skip
    yield _gauge("gateway_disk_total_bytes", "Size of the store's file system.",
                 figures.disk_total)  # fmt: skip
    jobs = GaugeMetricFamily(
        "gateway_dispatch_jobs", "Dispatch jobs in the index, by state and target.",
        labels=["state", "target"],
    )  # fmt: skip
    for (state, target), count in sorted(figures.jobs.items()):
        jobs.add_metric([state, target], count)
    yield jobs
    retrievals = GaugeMetricFamily(
        "gateway_retrieval_requests",
        "Retrieval requests in the index, by project (other: not configured) and status.",
        labels=["project", "status"],
    )
    for (project, status), count in sorted(figures.retrievals.items()):
        retrievals.add_metric([project, status], count)
    yield retrievals
    waits = GaugeMetricFamily(
        "gateway_completion_waits",
        "Series and studies a rule is waiting on (quiet period, required series, force).",
        labels=["scope"],
    )
    for scope, count in sorted(figures.waits.items()):
        waits.add_metric([scope], count)
    yield waits
    devices = GaugeMetricFamily(
        "gateway_devices", "Registered acquisition devices, by state.", labels=["state"]
    )
    for state, count in sorted(figures.devices.items()):
        devices.add_metric([state], count)
    yield devices


# -- the HTTP endpoint ----------------------------------------------------------------------------


class _Handler(WSGIRequestHandler):
    """One request per connection; a client silent this long is dropped; nothing printed."""

    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(WSGIServer):
    request_queue_size = 64

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        log.warning("metrics_request_failed", peer=str(client_address[0]), error=repr(error))


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_app(registry: CollectorRegistry, probe: Probe) -> WSGIApplication:
    """`/metrics` (the text format), `/healthz` (200 or 503, JSON), anything else 404."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
                return _reply(start_response, "405 Method Not Allowed", b"use GET\n",
                              "text/plain", [("Allow", "GET, HEAD")])  # fmt: skip
            healthy, body = probe.health()
            data = json.dumps(body).encode() + b"\n"
            status = "200 OK" if healthy else "503 Service Unavailable"
            return _reply(start_response, status, data, "application/json")
        return _reply(start_response, "404 Not Found", b"not found: /metrics, /healthz\n",
                      "text/plain")  # fmt: skip

    return app


def _reply(
    start_response: StartResponse,
    status: str,
    data: bytes,
    content_type: str,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    headers = [("Content-Type", f"{content_type}; charset=utf-8"),
               ("Content-Length", str(len(data))), ("Cache-Control", "no-store"),
               *(extra or [])]  # fmt: skip
    start_response(status, headers)
    return [data]


class MetricsEndpoint:
    """The HTTP listener of `[metrics]`, in one thread of its own (see the module docstring)."""

    def __init__(self, settings: MetricsSettings, metrics: Metrics, probe: Probe) -> None:
        self._settings = settings
        self._metrics = metrics
        self._probe = probe
        self._collector = GatewayCollector(metrics, probe)
        self._process = ProcessCollector(registry=None)
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int | None:
        """The bound port (the one chosen for `port = 0`), or None when not listening."""
        return None if self._server is None else int(self._server.server_address[1])

    @property
    def url(self) -> str | None:
        if self.port is None:
            return None
        host = self._settings.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}/metrics"

    def start(self) -> None:
        """Bind and serve; raises `GatewayError` when the address cannot be bound."""
        settings = self._settings
        assert settings.port is not None
        try:
            family, address = _family(settings.host, settings.port)
        except OSError as exc:
            raise GatewayError(f"metrics.host: cannot resolve {settings.host!r}: {exc}") from exc
        server_class = _Server6 if family == socket.AF_INET6 else _Server
        # No `<counter>_created` series beside each counter (process-wide: a setting of the
        # exposition, which nothing else in the gateway uses); they doubled the series served.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        registry = self._metrics.registry
        registry.register(self._collector)
        registry.register(self._process)
        try:
            server = make_server(address, settings.port, make_app(registry, self._probe),
                                 server_class, _Handler)  # fmt: skip
        except OSError as exc:
            self._unregister()
            raise GatewayError(
                f"metrics: cannot listen on {settings.host}:{settings.port}: {exc.strerror}"
            ) from exc
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="metrics-http",
            daemon=True,
        )  # fmt: skip
        self._thread.start()
        log.info("metrics_listening", host=settings.host, port=self.port)

    def stop(self) -> None:
        """Stop serving (after the request in progress), close the socket, join the thread.

        Blocking: run it in a worker thread (a scrape in progress may be waiting for the loop).
        """
        server, self._server = self._server, None
        thread, self._thread = self._thread, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()
        self._unregister()
        log.info("metrics_stopped")

    def _unregister(self) -> None:
        for collector in (self._collector, self._process):
            with contextlib.suppress(KeyError):
                self._metrics.registry.unregister(collector)


def _family(host: str, port: int) -> tuple[socket.AddressFamily, str]:
    """The address family and address to bind *host* (an IPv4 or IPv6 address, or a name)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _type, _proto, _name, address = infos[0]
    return family, str(address[0])
