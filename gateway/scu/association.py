"""Outbound associations: one way to open them, with the node's timeouts and TCP_NODELAY.

Every SCU of the gateway (echo, the C-STORE sender, C-FIND, C-MOVE and C-GET of retrieval)
opens its association here, so they share the node's AE title and timeouts, set TCP_NODELAY
on the socket, and fail with the same `PeerError` messages.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from gateway.config import NodeSettings, PeerSettings
from gateway.errors import PeerError
from gateway.scp.storage_classes import register_storage_classes
from gateway.scp.transport import MIN_PDU_LIMIT, EventDrivenAE, set_nodelay

__all__ = ["associate", "client_ae", "no_answer"]


def _nodelay(event: evt.Event) -> None:
    set_nodelay(event.assoc.dul.socket.socket if event.assoc.dul.socket else None)


def client_ae(node: NodeSettings) -> AE:
    """An AE with the node's AE title and timeouts, for one outbound association."""
    register_storage_classes()  # a C-GET may receive a retired class on it
    ae = EventDrivenAE(ae_title=node.ae_title)
    ae.pdu_limit = max(MIN_PDU_LIMIT, node.max_pdu_size + 6)
    ae.acse_timeout = node.acse_timeout
    ae.dimse_timeout = node.dimse_timeout
    ae.network_timeout = node.network_timeout
    ae.connection_timeout = node.connection_timeout
    return ae


def associate(
    ae: AE,
    node: NodeSettings,
    peer: PeerSettings,
    *,
    contexts: Sequence[PresentationContext] | None = None,
    ext_neg: Sequence[Any] | None = None,
    evt_handlers: Sequence[tuple[Any, Any]] = (),
) -> Association:
    """Open an association with *peer* (blocking), TCP_NODELAY set.

    Raises
    ------
    PeerError
        The peer could not be reached, or rejected the association.
    """
    assoc = ae.associate(
        peer.host,
        peer.port,
        contexts=list(contexts) if contexts is not None else None,
        ae_title=peer.ae_title,
        max_pdu=node.max_pdu_size,
        ext_neg=list(ext_neg) if ext_neg else None,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay), *evt_handlers],
    )
    if assoc.is_established:
        return assoc
    if assoc.is_rejected:
        raise PeerError(f"peer {peer.name} rejected the association")
    raise PeerError(f"peer {peer.name} ({peer.host}:{peer.port}) could not be reached")


def no_answer(peer: PeerSettings, what: str) -> PeerError:
    """The error for a request the peer did not answer (an abort or a DIMSE timeout)."""
    return PeerError(f"peer {peer.name} did not answer the {what} (aborted or timed out)")
