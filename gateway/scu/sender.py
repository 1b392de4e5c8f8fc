"""C-STORE of stored instances to a DICOM peer, as they are stored.

`send_instances` is what every route, forward and retrieval hand-off uses to deliver files. It
proposes the contexts of `gateway.scu.syntaxes` for what it sends (each stored syntax, and the
uncompressed ones unless the peer has ``transcode = false``), at most 128 per association (more
take further associations), sends each file's dataset bytes unchanged where the peer accepted
its stored syntax and re-encoded otherwise, and reports per instance: delivered (success, or a
warning status, which is logged) or failed with the reason (a failure status, no accepted
context, a dataset that cannot be re-encoded, an aborted association, a peer that cannot be
reached). A coroutine on the event loop; each file is read in a worker thread
(`gateway.scu.requestor.store_instance`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import structlog

from gateway.config import NodeSettings, PeerSettings
from gateway.errors import PeerError
from gateway.net.association import Association
from gateway.scu.requestor import (
    IdleAssociations,
    Proposal,
    end_association,
    open_association,
    proposal_of,
    store_instance,
)
from gateway.scu.syntaxes import MAX_CONTEXTS, context_count, outgoing, storage_contexts
from gateway.store.store import StoredInstance

__all__ = ["MAX_CONTEXTS", "Delivery", "context_batches", "send_instances"]

log = structlog.get_logger(__name__)

_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})


@dataclass(frozen=True, slots=True)
class Delivery:
    """The outcome of one instance: `status` is the peer's answer, when it answered."""

    sop_instance_uid: str
    status: int | None
    error: str | None = None
    permanent: bool = False  # the error lasts until the configuration changes

    @property
    def delivered(self) -> bool:
        return self.status is not None and (self.status == 0x0000 or self.status in _WARNINGS)


def context_batches(
    instances: Sequence[StoredInstance], *, transcode: bool = True
) -> Iterator[list[StoredInstance]]:
    """Split *instances* (order kept within a batch) so no batch needs more than 128 contexts."""
    batch: list[StoredInstance] = []
    pairs: set[tuple[str, str]] = set()
    for instance in instances:
        pair = (instance.sop_class_uid, instance.transfer_syntax)
        if pair not in pairs and context_count({*pairs, pair}, transcode=transcode) > MAX_CONTEXTS:
            yield batch
            batch, pairs = [], set()
        pairs.add(pair)
        batch.append(instance)
    if batch:
        yield batch


async def send_instances(
    node: NodeSettings,
    peer: PeerSettings,
    instances: Sequence[StoredInstance],
    *,
    on_result: Callable[[Delivery], None] | None = None,
    idle: IdleAssociations | None = None,
) -> list[Delivery]:
    """C-STORE *instances* to *peer*; one `Delivery` per instance, in order.

    *on_result* is called as each instance's outcome is known (a caller records deliveries
    durably as they happen, so a retry sends only what the peer has not acknowledged); what it
    raises stops the sending (the association is released) and propagates. With *idle*, an
    association kept from an earlier send is used where it fits, and this one is kept.
    """
    results: list[Delivery] = []

    def record(delivery: Delivery) -> None:
        results.append(delivery)
        if on_result is not None:
            on_result(delivery)

    for batch in context_batches(instances, transcode=peer.transcode):
        await _send_batch(node, peer, batch, record, idle)
    return results


async def _send_batch(
    node: NodeSettings,
    peer: PeerSettings,
    batch: list[StoredInstance],
    record: Callable[[Delivery], None],
    idle: IdleAssociations | None,
) -> None:
    pairs = [(i.sop_class_uid, i.transfer_syntax) for i in batch]
    contexts = storage_contexts(pairs, transcode=peer.transcode)
    proposal = proposal_of(contexts)
    started = time.monotonic()
    kept = idle.take(peer, proposal) if idle is not None else None
    if kept is not None:
        # A peer may end an idle association at any moment: the first instance that finds it
        # gone (before it was sent, or with no answer) is sent again on a new association.
        delivery = await _store(kept, batch[0], node, peer)
        if delivery is not None and (delivery.status is not None or kept.is_established):
            record(delivery)
            await _send_rest(kept, batch[1:], node, peer, record, idle, proposal, started, 1)
            return
        await kept.abort()
    try:
        assoc = await open_association(node, peer, contexts)
    except PeerError as exc:
        for instance in batch:
            error = exc
            if exc.kind == "no_context":  # each instance says what was proposed for it
                try:
                    outgoing(instance, [], transcode=peer.transcode, peer=peer.name)
                except PeerError as own:
                    error = own
            record(Delivery(instance.sop_instance_uid, None, str(error), error.permanent))
        return
    await _send_rest(assoc, batch, node, peer, record, idle, proposal, started, 0)


async def _send_rest(
    assoc: Association,
    batch: list[StoredInstance],
    node: NodeSettings,
    peer: PeerSettings,
    record: Callable[[Delivery], None],
    idle: IdleAssociations | None,
    proposal: Proposal,
    started: float,
    done: int,
) -> None:
    """Send *batch* on *assoc* (*done* instances were sent on it already), then give it back
    to *idle* or release it."""
    deliveries: list[Delivery] = []
    try:
        for instance in batch:
            delivery = await _store(assoc, instance, node, peer)
            if delivery is None:
                delivery = Delivery(instance.sop_instance_uid, None, f"aborted: peer {peer.name}:"
                                    " the association ended before this instance")  # fmt: skip
            deliveries.append(delivery)
            record(delivery)
    finally:
        if idle is not None:
            await idle.give(peer, assoc, proposal)
        else:
            await end_association(assoc)
        sent = sum(d.delivered for d in deliveries)
        log.info(
            "instances_sent",
            peer=peer.name,
            delivered=sent + done,
            warnings=sum(d.status in _WARNINGS for d in deliveries),
            failed=len(deliveries) - sent,
            duration=round(time.monotonic() - started, 3),
        )


async def _store(
    assoc: Association, instance: StoredInstance, node: NodeSettings, peer: PeerSettings
) -> Delivery | None:
    """One instance's C-STORE and its outcome; None when the association had ended before
    it was sent."""
    uid = instance.sop_instance_uid
    if not assoc.is_established:
        return None
    try:
        status = await store_instance(assoc, instance, transcode=peer.transcode, peer=peer.name,
                                      dimse_timeout=node.dimse_timeout)  # fmt: skip
    except PeerError as exc:
        if exc.kind != "aborted":
            log.warning("store_not_sent", peer=peer.name, reason=str(exc))
        return Delivery(uid, None, str(exc), exc.permanent)
    return _delivery(uid, status, peer)


def _delivery(uid: str, code: int, peer: PeerSettings) -> Delivery:
    if code in _WARNINGS:
        log.warning("store_warning", peer=peer.name, status=f"0x{code:04X}")
        return Delivery(uid, code)
    if code != 0x0000:
        return Delivery(uid, code, f"status: peer {peer.name} answered C-STORE with 0x{code:04X}")
    return Delivery(uid, code)
