"""The listener under the DICOM node: sockets, PDU bounds and association policy.

pynetdicom's server is kept, with three changes made where pynetdicom offers the seam:

- every accepted socket gets TCP_NODELAY (pynetdicom leaves Nagle on: ~20 instances/s);
- a PDU longer than the negotiated maximum is refused before it is read (pynetdicom would buffer
  whatever length the peer claims), and reads use 64 KB chunks instead of 4 KB;
- the acceptor checks the association policy (called AE, calling AE allowlist bound to hosts,
  association limit) itself, so the log names the reason for every rejection.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from pynetdicom import evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.transport import (
    AssociationSocket,
    RequestHandler,
    ThreadedAssociationServer,
)

from gateway.config import CallerSettings

__all__ = ["AssociationPolicy", "GatewayServer", "set_nodelay"]

log = structlog.get_logger(__name__)

_READ_CHUNK = 64 * 1024
# A-ASSOCIATE-RQ/AC PDUs are not bounded by the maximum PDU length; allow them this much.
_MIN_PDU_LIMIT = 256 * 1024


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


class _BoundedSocket(AssociationSocket):  # type: ignore[misc]
    """An AssociationSocket that refuses over-long PDUs and reads in large chunks."""

    pdu_limit: int = _MIN_PDU_LIMIT

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


class _PolicyACSE(ACSE):  # type: ignore[misc]
    """ACSE that applies the node's association policy before negotiating contexts."""

    policy: AssociationPolicy
    on_reject: Callable[[Association, str], None]

    def _negotiate_as_acceptor(self) -> None:
        assoc_rq = self.requestor.primitive
        host = (
            self.assoc.requestor.address_info.address if self.assoc.requestor.address_info else ""
        )
        active = len([a for a in self.assoc.ae.active_associations if a.is_acceptor])
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


class _RequestHandler(RequestHandler):  # type: ignore[misc]
    server: GatewayServer

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        set_nodelay(self.request)
        sock = assoc.dul.socket
        sock.__class__ = _BoundedSocket
        sock.pdu_limit = max(_MIN_PDU_LIMIT, self.ae.maximum_pdu_size + 6)
        acse = _PolicyACSE(assoc)
        acse.policy = self.server.policy
        acse.on_reject = self.server.on_reject
        assoc.acse = acse
        return assoc


class GatewayServer(ThreadedAssociationServer):  # type: ignore[misc]
    """pynetdicom's threaded server with the gateway's request handler."""

    policy: AssociationPolicy
    on_reject: Callable[[Association, str], None]
    daemon_threads = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["request_handler"] = _RequestHandler
        super().__init__(*args, **kwargs)
