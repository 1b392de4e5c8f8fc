"""Outbound associations: one way to open them, with the node's timeouts and TCP_NODELAY.

Every SCU of the gateway (echo, the C-STORE sender, C-FIND, C-MOVE and C-GET of retrieval)
opens its association here, so they share the node's AE title and timeouts, set TCP_NODELAY
on the socket, and fail with the same `PeerError` messages.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from gateway.config import NodeSettings, PeerSettings
from gateway.errors import PeerError
from gateway.scp.storage_classes import register_storage_classes
from gateway.scp.tls import tls_args
from gateway.scp.transport import MIN_PDU_LIMIT, EventDrivenAE, set_nodelay
from gateway.scu.syntaxes import named

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
        ``unreachable`` (connection refused, or none within the connection timeout),
        ``rejected`` (with the A-ASSOCIATE-RJ result, source and reason; `permanent` when the
        peer does not know the gateway's or its own AE title), ``no_context`` (the peer accepted
        the association but none of its presentation contexts), ``aborted`` (the peer ended the
        association while it was negotiated).
    """
    seen: dict[str, Any] = {}

    def on_acse(event: evt.Event) -> None:
        primitive = event.primitive
        result = getattr(primitive, "result", None)
        if result not in (None, 0x00):
            seen["reject"] = primitive  # an A-ASSOCIATE-RJ
        elif result == 0x00:
            seen["accept"] = primitive  # an A-ASSOCIATE-AC

    def on_open(event: evt.Event) -> None:
        seen["connected"] = True
        _nodelay(event)

    started = time.monotonic()
    assoc = ae.associate(
        peer.host,
        peer.port,
        contexts=list(contexts) if contexts is not None else None,
        ae_title=peer.ae_title,
        max_pdu=node.max_pdu_size,
        ext_neg=list(ext_neg) if ext_neg else None,
        tls_args=tls_args(node, peer),
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse), *evt_handlers],
    )
    if assoc.is_established:
        return assoc
    where = f"peer {peer.name} ({peer.ae_title} at {peer.host}:{peer.port})"
    reject = seen.get("reject")
    if assoc.is_rejected and reject is not None:
        result, source, reason = reject.result, reject.result_source, reject.diagnostic
        raise PeerError(
            "rejected",
            f"{where} rejected the association: {reject.result_str}, {reject.source_str},"
            f" {reject.reason_str} (A-ASSOCIATE-RJ result {result}, source {source},"
            f" reason {reason})",
            permanent=(result, source, reason) in _PERMANENT_REJECTIONS,
        )
    if assoc.is_rejected:
        raise PeerError("rejected", f"{where} rejected the association")
    if "accept" in seen:
        # pynetdicom aborts an association on which the peer accepted no context
        proposed = sorted({str(cx.abstract_syntax) for cx in assoc.requestor.requested_contexts})
        raise PeerError(
            "no_context",
            f"{where} accepted none of the presentation contexts proposed, for"
            f" {', '.join(named(uid) for uid in proposed)}",
        )
    if seen.get("connected"):
        raise PeerError("aborted", f"{where} aborted the association while it was negotiated")
    waited = time.monotonic() - started
    timeout = node.connection_timeout
    if timeout is not None and waited >= timeout:
        raise PeerError("unreachable", f"{where}: no connection within {timeout:g} s")
    raise PeerError("unreachable", f"{where}: connection refused or the host is unreachable")


# A-ASSOCIATE-RJ (result, source, reason) that retrying cannot change (PS3.8 9.3.4): rejected
# permanently by the service user because the application context name, the calling AE title
# or the called AE title is not recognised. Each lasts until a configuration changes.
_PERMANENT_REJECTIONS = frozenset({(1, 1, 2), (1, 1, 3), (1, 1, 7)})


def no_answer(peer: PeerSettings, what: str, dimse_timeout: float | None = None) -> PeerError:
    """The error for a request the peer did not answer: it aborted the association, or did not
    answer within the DIMSE timeout (after which the gateway aborts)."""
    waited = f" within the DIMSE timeout ({dimse_timeout:g} s)" if dimse_timeout else ""
    return PeerError(
        "aborted", f"peer {peer.name} did not answer the {what}{waited}: the association ended"
    )
