"""C-ECHO of a configured peer."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification

from gateway.config import NodeSettings, PeerSettings
from gateway.errors import PeerError
from gateway.scp.transport import set_nodelay

__all__ = ["EchoResult", "echo_peer"]


@dataclass(frozen=True, slots=True)
class EchoResult:
    """A successful C-ECHO: the status the peer answered and the round trip."""

    status: int
    seconds: float


def _nodelay(event: evt.Event) -> None:
    set_nodelay(event.assoc.dul.socket.socket if event.assoc.dul.socket else None)


def echo_peer(node: NodeSettings, peer: PeerSettings) -> EchoResult:
    """Associate with *peer*, send C-ECHO, release. Blocking: run it in a worker thread.

    Raises
    ------
    PeerError
        The peer could not be reached, refused the association or did not answer.
    """
    ae = AE(ae_title=node.ae_title)
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.connection_timeout = node.connection_timeout
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)],
    )
    if not assoc.is_established:
        if assoc.is_rejected:
            raise PeerError(f"peer {peer.name} rejected the association")
        raise PeerError(f"peer {peer.name} ({peer.host}:{peer.port}) could not be reached")
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        raise PeerError(f"peer {peer.name} did not answer the C-ECHO")
    return EchoResult(int(status.Status), time.monotonic() - started)
