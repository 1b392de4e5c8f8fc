"""The listener under the DICOM node: sockets, PDU bounds, wake-ups and association policy.

pynetdicom's server is kept, with four changes made where pynetdicom offers the seam:

- every accepted socket gets TCP_NODELAY (pynetdicom leaves Nagle on: ~20 instances/s);
- a PDU longer than the negotiated maximum is refused before it is read (pynetdicom would buffer
  whatever length the peer claims), and reads use 64 KB chunks instead of 4 KB;
- the two threads of an association wait for work instead of polling. pynetdicom's DUL thread
  sleeps 1 ms whenever a loop found nothing, and the association thread sleeps 1 ms every loop;
  measured here, that polling was ~3.5 ms of the ~8 ms a small C-STORE took. The DUL now blocks
  in `poll` on the socket and a wake-up pipe written whenever a primitive is queued for it,
  and the association thread waits on an event set whenever the DUL queues a message for it.
  The pipe is the association's: it is closed when the association's thread ends, whatever
  ended it (release, abort by either side, rejection, timeout, a vanished peer, an exception);
- a C-STORE response is encoded directly (a fixed layout of seven command elements) instead of
  through a pydicom Dataset: measured, pynetdicom's generic path cost ~1 ms of each C-STORE
  (how a received dataset reaches its file is `receiving.py`);
- the acceptor checks the association policy (called AE, calling AE allowlist bound to hosts,
  association limit) itself, so the log names the reason for every rejection.

`make_event_driven` applies the same socket and wake-ups to the gateway's outbound
(requestor) associations (`gateway.scu.association`). pynetdicom is pinned to 3.0.x:
`_EventDrivenAssociation._run_reactor` is pynetdicom 3.0's reactor loop with its sleep replaced
by that wait.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_GET, C_MOVE, C_STORE, N_CREATE, N_SET
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from gateway.audit import AuditLog
from gateway.config import CallerSettings
from gateway.metrics import Metrics, status_text
from gateway.net.dimse import response
from gateway.scp.access import Grant, ServiceAccess, log_refusal, service_of
from gateway.scp.tls import handshake_failed

__all__ = [
    "MIN_PDU_LIMIT",
    "Abandonable",
    "AssociationPolicy",
    "DulResources",
    "EventDrivenAE",
    "GatewayServer",
    "dul_resources",
    "encode_c_store_rsp",
    "make_event_driven",
    "set_nodelay",
]

log = structlog.get_logger(__name__)

_READ_CHUNK = 64 * 1024
# How long an idle association's threads wait before re-checking timers (ARTIM, idle timeout).
_IDLE_WAIT = 0.05
# How long a DUL with no connection waits for a primitive before looking again. Short, because
# pynetdicom's kill() waits for the DUL thread to end in a loop of sleep(0) (a spin) after asking
# it to stop, and the DUL sees the request only when this wait ends.
_UNCONNECTED_WAIT = 0.01
# A-ASSOCIATE-RQ/AC PDUs are not bounded by the maximum PDU length; allow them this much.
MIN_PDU_LIMIT = 256 * 1024


def set_nodelay(sock: socket.socket | None) -> None:
    """Turn Nagle's algorithm off on a TCP socket."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class AssociationPolicy:
    """Who may associate with the node."""

    ae_title: str
    check_called_ae: bool
    allowed_callers: tuple[CallerSettings, ...]
    max_associations: int

    def rejection(
        self, calling: str, called: str, host: str, active: int
    ) -> tuple[str, int, int, int] | None:
        """Return (reason, result, source, diagnostic) when the association must be refused."""
        if self.check_called_ae and called.strip() != self.ae_title:
            return ("called_ae_title_not_recognised", 0x01, 0x01, 0x07)
        if self.allowed_callers:
            calling = calling.strip()
            matches = [c for c in self.allowed_callers if c.ae_title == calling]
            if not matches:
                return ("calling_ae_title_not_allowed", 0x01, 0x01, 0x03)
            if not any(c.host is None or c.host == host for c in matches):
                return ("calling_host_not_allowed", 0x01, 0x01, 0x03)
        if active > self.max_associations:
            return ("association_limit_reached", 0x02, 0x03, 0x02)
        return None


class Abandonable(Protocol):
    """Something a DUL thread opens for a message in progress (a received dataset's file)."""

    def abandon(self) -> None:
        """Release it: the association ended before the message was complete."""


class DulResources:
    """What each association's DUL thread holds open for messages still arriving, released when
    the association ends, however it ends (an A-ABORT or a vanished peer mid-dataset leaves the
    file of a half-received instance: without this, its descriptor and its temp file stayed).

    Keyed by the thread object, not its ident: idents are reused as soon as a thread ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[threading.Thread, set[Abandonable]] = {}

    def add(self, item: Abandonable) -> None:
        """Hold *item* for the calling thread (a DUL thread)."""
        with self._lock:
            self._held.setdefault(threading.current_thread(), set()).add(item)

    def discard(self, item: Abandonable) -> None:
        """The message is complete: *item* is no longer the association's to release."""
        with self._lock:
            for held in self._held.values():
                held.discard(item)

    def release(self, thread: threading.Thread) -> int:
        """Abandon what *thread* still holds; return how many there were."""
        with self._lock:
            held = self._held.pop(thread, set())
        for item in held:
            item.abandon()
        return len(held)


dul_resources = DulResources()


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls *wake* after every put, so its consumer need not poll."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _BoundedSocket(AssociationSocket):  # type: ignore[misc]
    """An AssociationSocket that refuses over-long PDUs, reads in large chunks, and lets the DUL
    thread block until the peer sends or a primitive is queued for sending.

    The wake-up pipe belongs to the association, not to the TCP connection: pynetdicom closes the
    transport on some paths and leaves it to the garbage collector on others (an acceptor that
    released and saw the peer close, for one), so the pipe is closed by `close_wakeups` once the
    DUL thread that reads it has ended (`_EventDrivenAssociation.run`), on every path. The DUL
    waits with `poll`, which takes descriptors of any number (`select` fails above 1023).
    """

    pdu_limit: int = MIN_PDU_LIMIT
    _wake_r: int = -1
    _wake_w: int = -1
    _wake_lock: threading.Lock
    _poller: select.poll | None = None  # the socket and the pipe, once connected
    _polled_fd: int = -1
    _wake_poller: select.poll  # the pipe alone, while there is no connection

    def connect(self, primitive: Any) -> None:
        # pynetdicom drops the socket of a connect that fails without closing it (its shutdown
        # fails on an unconnected socket, which skips the close): one descriptor per refused
        # attempt until the garbage collector ran, and a ResourceWarning then.
        transport = self.socket
        super().connect(primitive)
        if self.socket is None and transport is not None:
            with contextlib.suppress(OSError):
                transport.close()

    def close_transport(self) -> None:
        """Close the TCP socket if pynetdicom left it open. Its `close` shuts the socket down
        first and skips the close when that fails, as it does on a socket whose connect was
        refused: such sockets waited for the garbage collector, one per failed attempt."""
        transport = self.socket
        if transport is not None:
            with contextlib.suppress(OSError):
                transport.close()

    def enable_wakeups(self) -> None:
        self._wake_lock = threading.Lock()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._wake_poller = select.poll()
        self._wake_poller.register(self._wake_r, select.POLLIN)

    def _drain_wakeups(self) -> None:
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)

    def wake(self) -> None:
        # Under the lock, so that a wake-up never reaches a descriptor number reused after
        # `close_wakeups`.
        with self._wake_lock:
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError):  # pipe full: already awake
                    os.write(self._wake_w, b"\0")

    def close_wakeups(self) -> None:
        """Close the wake-up pipe (idempotent); call once no thread waits on it any more."""
        with self._wake_lock:
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1
            self._poller = None

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False or self._wake_r < 0:
            self._wait_unconnected()
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True  # decrypted bytes already buffered: poll would not see them
        fd = sock.fileno()
        if fd < 0 or (self._poller is not None and fd != self._polled_fd):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(fd, select.POLLIN | select.POLLPRI)
            self._poller.register(self._wake_r, select.POLLIN)
            self._polled_fd = fd
        readable = False
        for ready_fd, mask in self._poller.poll(_IDLE_WAIT * 1000):
            if ready_fd == fd:
                if mask & select.POLLNVAL:
                    self.event_queue.put("Evt17")
                    return False
                readable = True  # data, or a hang-up / error that recv() will report
            else:
                self._drain_wakeups()
        return readable

    def _wait_unconnected(self) -> None:
        """With no connection (before a requestor connects, after the transport closed), wait
        for a primitive to send, at most `_UNCONNECTED_WAIT`. pynetdicom slept 1 ms here: a
        connection that closed before its A-ASSOCIATE-RQ (a port probe, a health check) left
        two threads waking 1000 times a second until the ACSE timeout, and a few dozen of them
        starved the listener of the GIL, so new connections waited for SYN retransmits."""
        if self._wake_r < 0:
            time.sleep(_UNCONNECTED_WAIT)
            return
        if self._wake_poller.poll(_UNCONNECTED_WAIT * 1000):
            self._drain_wakeups()

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.pdu_limit:
            log.warning("pdu_too_long", length=nr_bytes, limit=self.pdu_limit)
            raise OSError(f"PDU of {nr_bytes} bytes exceeds the limit of {self.pdu_limit}")
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            count = sock.recv_into(view[read:], min(_READ_CHUNK, nr_bytes - read))
            if not count:
                del view
                return buffer[:read]
            read += count
        del view
        return buffer


def encode_c_store_rsp(primitive: C_STORE) -> bytes | None:
    """The command set of a C-STORE-RSP in Implicit VR Little Endian, or None when the
    response carries optional elements (Error Comment, Offending Element) left to pynetdicom."""
    if primitive.ErrorComment is not None or primitive.OffendingElement is not None:
        return None
    return response(
        0x8001,  # C-STORE-RSP
        int(primitive.MessageIDBeingRespondedTo),
        int(primitive.Status),
        str(primitive.AffectedSOPClassUID or ""),
        str(primitive.AffectedSOPInstanceUID or ""),
    )


class _FastResponseDIMSE(DIMSEServiceProvider):  # type: ignore[misc]
    """pynetdicom's DIMSE provider, with C-STORE responses encoded by `encode_c_store_rsp`."""

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            command = encode_c_store_rsp(primitive)
            if command is not None and len(command) + 7 <= (self.maximum_pdu_size or 1 << 32):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class _EventDrivenAssociation(Association):  # type: ignore[misc]
    """pynetdicom's acceptor with a reactor that waits for work instead of sleeping 1 ms."""

    _wake_event: threading.Event
    refused_requests = 0  # requests answered here with a refusal (`_refuse`)
    access: ServiceAccess | None = None  # inbound: what the caller may use; None: no screen
    audit: AuditLog | None = None  # inbound: where refusals are recorded
    metrics: Metrics | None = None  # inbound: where refusals are counted
    _grant: Grant | None = None

    def run(self) -> None:
        # The association's thread; every association, accepted or requested, ends here, so
        # this is where its per-association resources are released, whatever ended it.
        try:
            super().run()
        finally:
            self._release_resources()

    def _release_resources(self) -> None:
        """End the DUL thread, then close the wake-up pipe it waited on (see _BoundedSocket)."""
        dul = self.dul
        if dul.is_alive() and not self._kill:
            # The reactor ended without killing the association (an unexpected exception):
            # abort, which sends A-ABORT and stops the DUL.
            with contextlib.suppress(Exception):
                self.abort()
        if dul.ident is not None:
            # After kill() the DUL ends once its state machine is idle (the transport closed,
            # or the ARTIM timer expired): bounded by the ACSE timeout.
            dul.join(timeout=(self.acse_timeout or 30) + 5)
        sock = dul.socket
        if dul.is_alive():
            log.warning("dul_thread_still_running", peer=self.remote.get("address"))
            return
        if isinstance(sock, _BoundedSocket):
            sock.close_wakeups()
            sock.close_transport()
        if abandoned := dul_resources.release(dul):
            log.info("incomplete_messages_discarded", count=abandoned)

    def _run_reactor(self) -> None:
        # pynetdicom 3.0 Association._run_reactor, with `time.sleep(0.001)` replaced by a wait
        # on `_wake_event` (set when the DUL queues a DIMSE message or an ACSE primitive). The
        # reactor counts as paused while it waits: a requestor's send_*() (which clears the
        # checkpoint and waits for the pause) goes at once, and the reactor, woken by the
        # response, stops at the checkpoint until that send_*() has taken its responses.
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._wake_event.wait(_IDLE_WAIT)
            self._wake_event.clear()
            self._reactor_checkpoint.wait()
            self._is_paused = False
            if not self._reactor_checkpoint.is_set():
                # A send_*() cleared the checkpoint after we passed it but may have read the
                # pause flag before we cleared it, and sent its request: the answer is its own,
                # not ours to take (pynetdicom's loop has this window; a fast peer's response
                # taken by the reactor left the requestor waiting until its DIMSE timeout).
                continue
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._wake_event.set()  # more may be queued: look again without waiting
                if not (
                    self._refused_off_context(msg, context_id)
                    or self._refused_unauthorised(msg, context_id)
                ):
                    self._serve_request(msg, context_id)
                # The network timeout is for a silent peer: time spent answering (a slow disk,
                # a C-MOVE of a large study) is not silence. pynetdicom restarts the timer only
                # when a PDU arrives, so an answer that took longer than the timeout was
                # followed by an A-ABORT.
                self.dul._idle_timer.restart()
            if self.is_established and self.acse.is_release_requested():  # type: ignore[has-type]
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.warning("network_timeout", peer=self.requestor.address)
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return

    def _refused_off_context(self, msg: Any, context_id: int | None) -> bool:
        """Answer a C-service request whose SOP Class is not its presentation context's with
        0x0122 (Refused: SOP Class not supported, PS3.7 C.5.8) and go on; True if answered.

        pynetdicom picks the service by the message's SOP Class, not the context's, and aborts
        the association when it has none for it (a sender that puts an instance on an
        inappropriate context: DCMTK dcmsend does when a file's meta and dataset disagree). A
        request on a context that was never accepted is left to pynetdicom, which aborts: that
        is a protocol error, not a message to answer.
        """
        if not isinstance(msg, _C_SERVICES) or not msg.is_valid_request:
            return False
        context = self._accepted_cx.get(context_id)
        sop_class = msg.AffectedSOPClassUID
        if context is None or sop_class is None or sop_class == context.abstract_syntax:
            return False
        self._refuse(msg, context_id, _SOP_CLASS_NOT_SUPPORTED)
        log.warning(
            "dimse_request_refused",
            peer=self.requestor.address,
            message=msg.msg_type,
            status=f"0x{_SOP_CLASS_NOT_SUPPORTED:04X}",
            reason=f"SOP Class {str(sop_class)[:64]} on presentation context {context_id},"
            f" which was negotiated for {context.abstract_syntax}",
        )
        return True

    def _refused_unauthorised(self, msg: Any, context_id: int | None) -> bool:
        """Answer a request for a service the caller may not use (`gateway.scp.access`) with
        0x0124 (Refused: Not Authorized, PS3.7 C.5) and go on; True if answered."""
        if self.access is None or not isinstance(msg, _REQUESTS) or not msg.is_valid_request:
            return False
        if self._grant is None:
            self._grant = self.access.grant(str(self.requestor.ae_title))
        sop_class = str(_sop_class_of(msg) or "")
        service = service_of(msg.msg_type.replace("-", "_"), sop_class)
        if service is None or service in self._grant.services:
            return False
        self._refuse(msg, context_id, _NOT_AUTHORIZED)
        log_refusal(self._grant, service, str(self.requestor.ae_title), self.requestor.address,
                    self.audit)  # fmt: skip
        return True

    def _refuse(self, msg: Any, context_id: int | None, status: int) -> None:
        """Send *msg*'s response with a refusal *status*; nothing of its dataset is kept."""
        rsp = type(msg)()
        rsp.MessageIDBeingRespondedTo = msg.MessageID
        rsp.AffectedSOPClassUID = _sop_class_of(msg)
        if isinstance(msg, C_STORE | N_CREATE):
            rsp.AffectedSOPInstanceUID = msg.AffectedSOPInstanceUID
        elif isinstance(msg, N_SET):
            rsp.AffectedSOPInstanceUID = msg.RequestedSOPInstanceUID
        received = getattr(getattr(msg, "_dataset_file", None), "name", None)
        if received:  # a streamed C-STORE dataset
            with contextlib.suppress(OSError):
                os.unlink(received)
        rsp.Status = status
        self.dimse.send_msg(rsp, context_id)
        self.refused_requests += 1
        if self.metrics is not None:
            if isinstance(msg, C_STORE):
                self.metrics.instances_refused.labels(status=status_text(status)).inc()
            else:
                service = service_of(msg.msg_type.replace("-", "_"), str(_sop_class_of(msg) or ""))
                self.metrics.dimse_refused.labels(
                    service=service or "other", status=status_text(status)
                ).inc()


_SOP_CLASS_NOT_SUPPORTED = 0x0122
_NOT_AUTHORIZED = 0x0124
_C_SERVICES = (C_STORE, C_FIND, C_GET, C_MOVE, C_ECHO)
_REQUESTS = (*_C_SERVICES, N_CREATE, N_SET)


def _sop_class_of(msg: Any) -> Any:
    """The SOP class a request names (an N-SET names it as Requested, the others Affected)."""
    return msg.RequestedSOPClassUID if isinstance(msg, N_SET) else msg.AffectedSOPClassUID


class _PolicyACSE(ACSE):  # type: ignore[misc]
    """ACSE that applies the node's association policy before negotiating contexts."""

    policy: AssociationPolicy
    on_reject: Callable[[Association, str], None]

    def _negotiate_as_acceptor(self) -> None:
        assoc_rq = self.requestor.primitive
        host = (
            self.assoc.requestor.address_info.address if self.assoc.requestor.address_info else ""
        )
        # Established associations only, plus this one: a connection that has not (yet) sent an
        # A-ASSOCIATE-RQ (a port probe, a half-open socket) does not take a place.
        active = 1 + len(
            [a for a in self.assoc.ae.active_associations if a.is_acceptor and a.is_established]
        )
        verdict = self.policy.rejection(
            assoc_rq.calling_ae_title, assoc_rq.called_ae_title, host, active
        )
        if verdict is None:
            super()._negotiate_as_acceptor()
            return
        reason, result, source, diagnostic = verdict
        self.requestor.ae_title = assoc_rq.calling_ae_title
        self.on_reject(self.assoc, reason)
        self.send_reject(result, source, diagnostic)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


def make_event_driven(assoc: Association, pdu_limit: int) -> None:
    """Give an association (acceptor or requestor, its threads not started yet) the bounded
    socket and the wake-ups instead of polling (see the module docstring)."""
    sock = assoc.dul.socket
    sock.__class__ = _BoundedSocket
    sock.pdu_limit = pdu_limit
    sock.enable_wakeups()
    assoc.__class__ = _EventDrivenAssociation
    assoc._wake_event = threading.Event()
    assoc.dul._run_loop_delay = 0
    assoc.dul.to_provider_queue = _WakingQueue(sock.wake)
    assoc.dul.to_user_queue = _WakingQueue(assoc._wake_event.set)
    assoc.dimse.msg_queue = _WakingQueue(assoc._wake_event.set)
    assoc.dimse.__class__ = _FastResponseDIMSE


class EventDrivenAE(AE):  # type: ignore[misc]
    """An AE whose requested associations are event driven like the node's accepted ones (the
    bounded socket, the wake-ups, `poll`): the gateway's outbound associations and the node's
    C-MOVE sub-associations alike. pynetdicom's own requestor polls every 1 ms in two threads
    and waits with `select`, which fails on descriptors above 1023."""

    pdu_limit: int = MIN_PDU_LIMIT

    def _create_socket(self, assoc: Association, address: Any, tls_args: Any) -> Any:
        sock = super()._create_socket(assoc, address, tls_args)
        assoc.dul.socket = sock  # AE.associate sets it again (set_socket) once this returns
        make_event_driven(assoc, self.pdu_limit)
        assoc.dul.socket = None
        return sock


class _RequestHandler(RequestHandler):  # type: ignore[misc]
    server: GatewayServer

    def handle(self) -> None:
        # A TLS connection's handshake runs here, in the connection's own thread and within
        # the ACSE timeout: pynetdicom would run it in the listener's thread while accepting,
        # where one client that connects and says nothing stops every other from connecting.
        sock = self.request
        if isinstance(sock, ssl.SSLSocket):
            sock.settimeout(self.ae.acse_timeout or 30)
            try:
                sock.do_handshake()
            except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
                handshake_failed(self.client_address[0], str(exc), self.server.metrics,
                                 self.server.audit)  # fmt: skip
                with contextlib.suppress(OSError):
                    sock.close()
                return
            sock.settimeout(None)
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        set_nodelay(self.request)
        make_event_driven(assoc, max(MIN_PDU_LIMIT, self.ae.maximum_pdu_size + 6))
        acse = _PolicyACSE(assoc)
        acse.policy = self.server.policy
        acse.on_reject = self.server.on_reject
        assoc.acse = acse
        assoc.access = self.server.access
        assoc.audit = self.server.audit
        assoc.metrics = self.server.metrics
        return assoc


class GatewayServer(ThreadedAssociationServer):  # type: ignore[misc]
    """pynetdicom's threaded server with the gateway's request handler."""

    policy: AssociationPolicy
    on_reject: Callable[[Association, str], None]
    access: ServiceAccess | None = None
    audit: AuditLog | None = None
    metrics: Metrics | None = None
    daemon_threads = True
    # socketserver's default backlog is 5: a burst of connections (modalities reconnecting after
    # an outage, health checks) while the listener thread waited for the GIL overflowed it, and
    # the dropped SYNs were retried by the peers' kernels only after 1 s.
    request_queue_size = socket.SOMAXCONN

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = _RequestHandler
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept a connection; a TLS one is wrapped without its handshake, which the
        connection's thread runs (`_RequestHandler.handle`)."""
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address


def cancel_check(event: evt.Event) -> Callable[[], bool]:
    """Whether the request of *event* (a C-FIND, C-MOVE or C-GET) was cancelled, as a check
    that stays true: pynetdicom's `event.is_cancelled` forgets a C-CANCEL once it has said
    so, and a handler asks more than once (between answers, and while SQLite runs)."""
    seen = False

    def cancelled() -> bool:
        nonlocal seen
        seen = seen or bool(event.is_cancelled)
        return seen

    return cancelled
