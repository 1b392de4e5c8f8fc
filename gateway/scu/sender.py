"""C-STORE of stored instances to a DICOM peer, as they are stored.

`send_instances` is what every route, forward and retrieval hand-off uses to deliver files. It
proposes the contexts of `gateway.scu.syntaxes` for what it sends (each stored syntax, and the
uncompressed ones unless the peer has ``transcode = false``), at most 128 per association (more
take further associations), sends each file's dataset bytes unchanged where the peer accepted
its stored syntax and re-encoded otherwise, and reports per instance: delivered (success, or a
warning status, which is logged) or failed with the reason (a failure status, no accepted
context, a dataset that cannot be re-encoded, an aborted association, a peer that cannot be
reached). Blocking: callers run it in a worker thread.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog
from pydicom.dataset import Dataset
from pynetdicom import _config

from gateway.config import NodeSettings, PeerSettings
from gateway.errors import PeerError
from gateway.scu.association import associate, client_ae, no_answer
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


def send_instances(
    node: NodeSettings,
    peer: PeerSettings,
    instances: Sequence[StoredInstance],
    *,
    on_result: Callable[[Delivery], None] | None = None,
) -> list[Delivery]:
    """C-STORE *instances* to *peer*; one `Delivery` per instance, in order.

    *on_result* is called as each instance's outcome is known (a caller records deliveries
    durably as they happen, so a retry sends only what the peer has not acknowledged).
    """
    _config.STORE_SEND_CHUNKED_DATASET = True  # a file goes out as its stored bytes
    results: list[Delivery] = []

    def record(delivery: Delivery) -> None:
        results.append(delivery)
        if on_result is not None:
            on_result(delivery)

    for batch in context_batches(instances, transcode=peer.transcode):
        _send_batch(node, peer, batch, record)
    return results


def _send_batch(
    node: NodeSettings,
    peer: PeerSettings,
    batch: list[StoredInstance],
    record: Callable[[Delivery], None],
) -> None:
    pairs = [(i.sop_class_uid, i.transfer_syntax) for i in batch]
    contexts = storage_contexts(pairs, transcode=peer.transcode)
    started = time.monotonic()
    try:
        assoc = associate(client_ae(node), node, peer, contexts=contexts)
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
    accepted = assoc.accepted_contexts
    sent = warned = failed = 0
    try:
        for instance in batch:
            if not assoc.is_established:
                record(
                    Delivery(
                        instance.sop_instance_uid,
                        None,
                        f"aborted: peer {peer.name}: the association ended before this instance",
                    )
                )
                failed += 1
                continue
            try:
                payload = outgoing(instance, accepted, transcode=peer.transcode, peer=peer.name)
            except PeerError as exc:
                log.warning("store_not_sent", peer=peer.name, reason=str(exc))
                record(Delivery(instance.sop_instance_uid, None, str(exc), exc.permanent))
                failed += 1
                continue
            delivery = _store_one(assoc, instance.sop_instance_uid, payload, peer)
            record(delivery)
            if delivery.delivered:
                sent += 1
                warned += delivery.status in _WARNINGS
            else:
                failed += 1
    finally:
        if assoc.is_established:
            assoc.release()
        log.info(
            "instances_sent",
            peer=peer.name,
            delivered=sent,
            warnings=warned,
            failed=failed,
            duration=round(time.monotonic() - started, 3),
        )


def _store_one(assoc: object, uid: str, payload: Path | Dataset, peer: PeerSettings) -> Delivery:
    try:
        status = assoc.send_c_store(payload)  # type: ignore[attr-defined]
    except (OSError, ValueError, AttributeError, RuntimeError) as exc:
        return Delivery(uid, None, f"aborted: could not send: {exc}")
    if "Status" not in status:
        return Delivery(uid, None, str(no_answer(peer, "C-STORE", assoc.dimse_timeout)))  # type: ignore[attr-defined]
    code = int(status.Status)
    if code in _WARNINGS:
        log.warning("store_warning", peer=peer.name, status=f"0x{code:04X}")
        return Delivery(uid, code)
    if code != 0x0000:
        return Delivery(uid, code, f"status: peer {peer.name} answered C-STORE with 0x{code:04X}")
    return Delivery(uid, code)
