"""C-ECHO of a configured peer."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pynetdicom.sop_class import Verification

from gateway.config import NodeSettings, PeerSettings
from gateway.scu.association import associate, client_ae, no_answer

__all__ = ["EchoResult", "echo_peer"]


@dataclass(frozen=True, slots=True)
class EchoResult:
    """A successful C-ECHO: the status the peer answered and the round trip."""

    status: int
    seconds: float


def echo_peer(node: NodeSettings, peer: PeerSettings) -> EchoResult:
    """Associate with *peer*, send C-ECHO, release. Blocking: run it in a worker thread.

    Raises
    ------
    PeerError
        The peer could not be reached, refused the association or did not answer.
    """
    ae = client_ae(node)
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = associate(ae, node, peer)
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in status:
        raise no_answer(peer, "C-ECHO", node.dimse_timeout)
    return EchoResult(int(status.Status), time.monotonic() - started)
