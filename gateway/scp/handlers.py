"""DIMSE handlers of the DICOM node: C-ECHO, C-STORE, C-FIND, C-MOVE, C-GET.

Each handler takes one pynetdicom `Event`, reads everything from it, and turns failures into
DIMSE statuses here and nowhere else. Handlers run on association threads: index work goes to the
store's writer (C-STORE) or over the `LoopBridge` (queries).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pydicom.dataset import Dataset
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    Verification,
)

from gateway.audit import AuditLog
from gateway.config import PeerSettings, Settings
from gateway.errors import GatewayError, PeerError, RejectedInstance, StoreError
from gateway.metrics import Metrics, query_level, status_text
from gateway.scp.bridge import LoopBridge
from gateway.scp.receiving import DatasetSpool
from gateway.scp.tls import tls_args
from gateway.scp.transport import cancel_check, set_nodelay
from gateway.scp.worklist import AcquisitionServices
from gateway.scu.syntaxes import MAX_CONTEXTS, outgoing, storage_contexts
from gateway.store.index import Provenance
from gateway.store.query import QueryError, QueryModel, retrieve_filter, stream_capped
from gateway.store.store import Store, StoredInstance

__all__ = ["AssociationStats", "DicomServices"]

log = structlog.get_logger(__name__)

_PATIENT_ROOT = {
    str(PatientRootQueryRetrieveInformationModelFind),
    str(PatientRootQueryRetrieveInformationModelMove),
    str(PatientRootQueryRetrieveInformationModelGet),
}


class _SubOperations:
    """The C-STORE responses of a C-MOVE's destination association that completed (success or
    warning), counted as they arrive on the thread that sends the sub-operations."""

    def __init__(self) -> None:
        self.completed = 0

    def on_message(self, event: evt.Event) -> None:
        command = event.message.command_set
        if command.CommandField == _C_STORE_RSP:
            status = int(command.Status)
            if status == 0x0000 or 0xB000 <= status <= 0xBFFF:  # success, or a warning
                self.completed += 1


_C_STORE_RSP = 0x8001


class _SubOperationDataset(Dataset):
    """A stored instance as the dataset of a C-MOVE / C-GET sub-operation.

    pynetdicom's Q/R service takes only a `Dataset` for a sub-operation (a path is refused as an
    invalid dataset) and hands it to `send_c_store`. A `_SubOperationDataset` holds the UIDs
    pynetdicom reads and the file; `_send_stored_files` makes an association send what
    `outgoing` chooses for it: the file's path, so its dataset bytes go out unchanged
    (`STORE_SEND_CHUNKED_DATASET`), where the association accepted its stored syntax, else its
    dataset re-encoded in an accepted uncompressed syntax (a C-GET requestor such as DCMTK
    getscu proposes several).
    """

    stored: StoredInstance
    transcode: bool
    peer: str

    def __init__(self, instance: StoredInstance, *, transcode: bool, peer: str) -> None:
        super().__init__()
        self.SOPClassUID = instance.sop_class_uid
        self.SOPInstanceUID = instance.sop_instance_uid  # for a FailedSOPInstanceUIDList
        self.stored = instance
        self.transcode = transcode
        self.peer = peer

    def payload(self, assoc: Association) -> Path | Dataset:
        """What to send on *assoc* (`gateway.scu.syntaxes.outgoing`); raises `PeerError`,
        which pynetdicom counts as a failed sub-operation."""
        return outgoing(
            self.stored, assoc.accepted_contexts, transcode=self.transcode, peer=self.peer
        )


def _send_stored_files(assoc: Association) -> None:
    """Let *assoc*'s `send_c_store` take a `_SubOperationDataset` (once per association)."""
    if getattr(assoc, "_gateway_sends_stored_files", False):
        return
    send_c_store = assoc.send_c_store

    def send(dataset: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(dataset, _SubOperationDataset):
            try:
                dataset = dataset.payload(assoc)
            except PeerError as exc:
                log.warning("sub_operation_not_sent", peer=dataset.peer, reason=str(exc))
                raise
        return send_c_store(dataset, *args, **kwargs)

    assoc.send_c_store = send
    assoc._gateway_sends_stored_files = True


def _who(stats: AssociationStats) -> dict[str, str]:
    """An association's caller, for an audit record."""
    return {"calling_ae": stats.calling_ae.strip(), "called_ae": stats.called_ae.strip(),
            "address": stats.peer_address}  # fmt: skip


@dataclass
class AssociationStats:
    """Per-association counters, logged when the association ends."""

    association_id: str
    calling_ae: str
    called_ae: str
    peer_address: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    refused: int = 0
    queries: int = 0
    sent: int = 0
    studies: set[str] = field(default_factory=set)  # of the instances it stored


class DicomServices:
    """The node's DIMSE handlers and association bookkeeping."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        bridge: LoopBridge,
        acquisition: AcquisitionServices | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._store = store
        self._bridge = bridge
        self.audit: AuditLog | None = None  # set by the application
        self.metrics = metrics or Metrics()
        self._acquisition = acquisition
        self._stats: dict[int, AssociationStats] = {}

    def use_peers(self, settings: Settings) -> None:
        """Take the `[[peers]]` of reloaded settings (C-MOVE destinations); the rest stays."""
        self._settings = self._settings.model_copy(update={"peers": settings.peers})

    # -- association events ------------------------------------------------------------------

    def handlers(self) -> list[tuple[Any, Any]]:
        """The (event, handler) pairs to bind on the server."""
        return [
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_RELEASED, self.on_ended),
            (evt.EVT_ABORTED, self.on_ended),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
            (evt.EVT_C_FIND, self.on_find),
            (evt.EVT_C_MOVE, self.on_move),
            (evt.EVT_C_GET, self.on_get),
            (evt.EVT_N_CREATE, self.on_n_create),
            (evt.EVT_N_SET, self.on_n_set),
        ]

    def on_n_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        self._count("mpps")
        if self._acquisition is None:
            return 0x0110, None
        return self._acquisition.on_n_create(event)

    def on_n_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        self._count("mpps")
        if self._acquisition is None:
            return 0x0110, None
        return self._acquisition.on_n_set(event)

    def n_create(
        self, attributes: Dataset, requested: str | None, calling_ae: str
    ) -> tuple[int, str | None]:
        """MPPS N-CREATE on plain values (`AcquisitionServices.mpps_create`): (status, the
        SOP Instance UID created). Blocks."""
        self._count("mpps")
        if self._acquisition is None:
            return 0x0110, None
        return self._acquisition.mpps_create(attributes, requested, calling_ae)

    def n_set(self, changes: Dataset, sop_uid: str) -> int:
        """MPPS N-SET on plain values (`AcquisitionServices.mpps_set`): the status. Blocks."""
        self._count("mpps")
        if self._acquisition is None:
            return 0x0110
        return self._acquisition.mpps_set(changes, sop_uid)

    @property
    def open_associations(self) -> int:
        return len(self._stats)

    def _count(self, service: str, event: evt.Event | None = None) -> None:
        """Count a request of *service*, with its Query/Retrieve level when *event* is one."""
        level = "" if event is None else query_level(event)
        self.metrics.dimse_requests.labels(service=service, level=level).inc()

    def on_conn_open(self, event: evt.Event) -> None:
        set_nodelay(event.assoc.dul.socket.socket if event.assoc.dul.socket else None)

    def on_rejected(self, assoc: Association, reason: str) -> None:
        address = assoc.requestor.address_info
        self.rejected(
            reason,
            str(assoc.requestor.primitive.calling_ae_title),
            str(assoc.requestor.primitive.called_ae_title),
            address.address if address else None,
        )

    def rejected(self, reason: str, calling: str, called: str, address: str | None) -> None:
        """An association refused by the node's policy: counted, logged, audited."""
        self.metrics.associations_rejected.labels(reason=reason).inc()
        log.info("association_rejected", reason=reason, calling_ae=calling, called_ae=called,
                 peer=address)  # fmt: skip
        if self.audit is not None:
            self.audit.record("Security Alert", outcome="refused", what="association rejected",
                              reason=reason, calling_ae=calling.strip(),
                              called_ae=called.strip(), address=address)  # fmt: skip

    def on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        self._stats[id(assoc)] = self.accepted(
            assoc.requestor.ae_title,
            assoc.acceptor.ae_title,
            assoc.requestor.address,
            len(assoc.accepted_contexts),
        )

    def accepted(
        self, calling_ae: str, called_ae: str, peer_address: str, contexts: int
    ) -> AssociationStats:
        """An association established: its counters, counted, logged, audited."""
        stats = AssociationStats(
            association_id=uuid.uuid4().hex[:12],
            calling_ae=calling_ae,
            called_ae=called_ae,
            peer_address=peer_address,
        )
        self.metrics.associations_accepted.inc()
        if self.audit is not None:
            self.audit.record("Association Accepted", association_id=stats.association_id,
                              **_who(stats))  # fmt: skip
        log.info(
            "association_accepted",
            association_id=stats.association_id,
            calling_ae=stats.calling_ae,
            called_ae=stats.called_ae,
            peer=stats.peer_address,
            contexts=contexts,
        )
        return stats

    def on_ended(self, event: evt.Event) -> None:
        stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        # requests the transport answered itself (0x0122, a SOP class off its context)
        stats.refused += getattr(event.assoc, "refused_requests", 0)
        self.ended(stats, released=event.event is evt.EVT_RELEASED)

    def ended(self, stats: AssociationStats, *, released: bool) -> None:
        """An association over (released, or aborted either way): audited and logged."""
        if self.audit is not None and stats.studies:
            self.audit.record("Import", studies=stats.studies, association_id=stats.association_id,
                              instances=stats.stored + stats.duplicates, **_who(stats))  # fmt: skip
        log.info(
            "association_released" if released else "association_aborted",
            association_id=stats.association_id,
            calling_ae=stats.calling_ae,
            stored=stats.stored,
            duplicates=stats.duplicates,
            refused=stats.refused,
            queries=stats.queries,
            sent=stats.sent,
            duration=round(time.monotonic() - stats.started, 3),
        )

    def _stats_for(self, assoc: Association) -> AssociationStats:
        stats = self._stats.get(id(assoc))
        if stats is None:  # an event before EVT_ACCEPTED was seen; keep going regardless
            stats = AssociationStats("unknown", "", "", "")
        return stats

    # -- C-ECHO / C-STORE ---------------------------------------------------------------------

    def on_echo(self, event: evt.Event) -> int:
        self._count("echo")
        return 0x0000

    def on_store(self, event: evt.Event) -> int:
        """C-STORE: check, store durably and index the received dataset (`store_instance`)."""
        request = event.request
        received = request._dataset_file
        return self.store_instance(
            self._stats_for(event.assoc),
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            Path(event.dataset_path),
            received if isinstance(received, DatasetSpool) else None,
        )

    def store_instance(
        self,
        stats: AssociationStats,
        sop_class_uid: str,
        sop_instance_uid: str,
        path: Path,
        spool: DatasetSpool | None,
    ) -> int:
        """A C-STORE request's dataset, received into *path* (a Part 10 file, through *spool*
        when it was streamed there): check, store durably and index it; count the answer and
        the time it took; return the status (PS3.4 Table GG.4-1). Blocks: for a thread."""
        started = time.perf_counter()
        status, size = self._store_one(stats, sop_class_uid, sop_instance_uid, path, spool)
        metrics = self.metrics
        metrics.store_seconds.observe(time.perf_counter() - started)
        if status == 0x0000:
            metrics.instances_received.inc()
            metrics.received_bytes.inc(size)
        else:
            metrics.instances_refused.labels(status=status_text(status)).inc()
        return status

    def _store_one(
        self,
        stats: AssociationStats,
        sop_class_uid: str,
        sop_instance_uid: str,
        path: Path,
        received: DatasetSpool | None,
    ) -> tuple[int, int]:
        """(the C-STORE's status, the dataset's bytes as received)."""
        provenance = Provenance(
            calling_ae=stats.calling_ae,
            called_ae=stats.called_ae,
            peer_address=stats.peer_address,
            association_id=stats.association_id,
        )
        if received is not None and received.too_large:
            stats.refused += 1
            log.warning(
                "instance_refused",
                association_id=stats.association_id,
                sop_instance_uid=sop_instance_uid[:64],
                status="0xA700",
                reason=f"the dataset is larger than node.max_instance_bytes ({received.max_bytes}"
                " bytes): dropped as it arrived",
            )
            return 0xA700, 0
        try:
            result = self._store.ingest_blocking(
                path,
                provenance,
                expect=(sop_class_uid, sop_instance_uid),
                checksum=received.dataset_digest if received is not None else None,
            )
        except RejectedInstance as exc:
            stats.refused += 1
            log.warning(
                "instance_refused",
                association_id=stats.association_id,
                sop_instance_uid=sop_instance_uid[:64],
                status=f"0x{exc.status:04X}",
                reason=str(exc),
            )
            return exc.status, 0
        except (StoreError, OSError) as exc:
            stats.refused += 1
            log.error(
                "instance_not_stored",
                association_id=stats.association_id,
                status="0xA700",
                reason=str(exc),
            )
            return 0xA700, 0
        stats.studies.add(result.study_instance_uid)
        if result.outcome in ("stored", "replaced"):
            stats.stored += 1
        else:
            stats.duplicates += 1
        log.debug(
            "instance_received",
            association_id=stats.association_id,
            sop_instance_uid=result.sop_instance_uid,
            outcome=result.outcome,
        )
        return 0x0000, received.dataset_bytes if received is not None else 0

    # -- C-FIND -------------------------------------------------------------------------------

    def on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND: one pending response per match, then the final status.

        Patient Root and Study Root answers are capped at `[node] max_find_results` (0: no cap;
        a query naming a unique key value is bounded by it and not capped, see
        `query.stream_capped`). Answers are read from the index as they are sent, on a query
        connection of the association's own (`Store.stream`), and a C-CANCEL interrupts the
        statement as well as the answers. When the cap cuts the answers, the first that many
        are sent and the final status is 0xFE00 (Matching terminated due to Cancel request), with a
        `find_results_capped` warning. PS3.4 C.4.1.1.4 has no warning status for C-FIND: a
        final Success (0x0000) would tell the requester it has every match, which it does not;
        a refusal with no answers (dcm4chee-arc refuses a query that matches more than
        `dcmQueryMaxNumberOfResults`) leaves an operator with nothing where a narrower query is
        the fix. 0xFE00 says "matching stopped before the end" and requesters show what came,
        which is what Orthanc does when `LimitFindResults` cuts a query. The Modality Worklist
        is answered by `AcquisitionServices` from its own tables and is not capped.
        """
        yield from self.find(
            self._stats_for(event.assoc),
            str(event.request.AffectedSOPClassUID),
            event.identifier,
            cancel_check(event),
        )

    def find(
        self,
        stats: AssociationStats,
        sop_class_uid: str,
        identifier: Dataset,
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[int, Dataset | None]]:
        """`on_find` on plain values: the association, the request's SOP class, its decoded
        identifier and a check that says once it was cancelled (C-CANCEL). Blocks between
        answers (reads the index): for a thread."""
        stats.queries += 1
        if sop_class_uid == ModalityWorklistInformationFind:
            self._count("worklist")
            if self._acquisition is None:
                yield 0xC000, None
                return
            yield from self._acquisition.worklist_find(identifier, stats.calling_ae, cancelled)
            return
        self._count("find", identifier)
        model: QueryModel = "patient" if sop_class_uid in _PATIENT_ROOT else "study"
        cap = self._settings.node.max_find_results
        if self.audit is not None:
            keys = sorted(
                elem.keyword or str(elem.tag)
                for elem in identifier
                if elem.value not in (None, "", [])
                and elem.tag.group > 0x0002
                and elem.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet")
            )
            self.audit.record("Query", association_id=stats.association_id, model=model,
                              level=str(identifier.get("QueryRetrieveLevel", "")), keys=keys,
                              **_who(stats))  # fmt: skip
        sent = 0
        try:
            found = stream_capped(self._store, model, identifier, cap, cancelled=cancelled)
            for match in found:
                if cancelled():
                    break
                match.RetrieveAETitle = self._settings.node.ae_title
                sent += 1
                yield 0xFF00, match
        except QueryError as exc:
            log.warning("query_refused", association_id=stats.association_id, reason=str(exc))
            yield exc.status, None
            return
        except GatewayError as exc:
            log.error("query_failed", association_id=stats.association_id, reason=str(exc))
            yield 0xA700, None
            return
        if cancelled():
            log.info("find_cancelled", association_id=stats.association_id, sent=sent)
            yield 0xFE00, None
            return
        if found.truncated:
            log.warning(
                "find_results_capped",
                association_id=stats.association_id,
                sent=sent,
                reason=f"more than {cap} matches (node.max_find_results): the first {cap} were"
                " sent, then 0xFE00",
            )
            yield 0xFE00, None

    # -- C-MOVE / C-GET -----------------------------------------------------------------------

    def _studies_of(self, instances: list[StoredInstance]) -> list[str]:
        """The Study Instance UIDs of *instances*, for the audit record of a transfer."""
        return self._bridge.call(self._store.study_uids_of, [i.pk for i in instances])

    def on_move(self, event: evt.Event) -> Iterator[Any]:
        stats = self._stats_for(event.assoc)
        self._count("move", event)
        destination = str(event.move_destination).strip()
        peer = self.move_destination(stats, destination)
        if peer is None:
            yield None, None
            return
        # pynetdicom connects to the destination as soon as it has a sub-operation count, and
        # answers 0 with Success: a request that fails raises instead of yielding a count, which
        # pynetdicom answers with 0xC513 (Unable to process) without connecting to anyone.
        try:
            instances = self.retrieve(stats, "move", str(event.request.AffectedSOPClassUID),
                                      event.identifier)  # fmt: skip
        except GatewayError:  # QueryError included; logged
            yield peer.host, peer.port, self._move_kwargs([], peer)
            raise
        tally = _SubOperations()
        cancelled = cancel_check(event)
        yield peer.host, peer.port, self._move_kwargs(instances, peer, tally)
        yield from self._send(
            cancelled, stats, instances, "move", transcode=peer.transcode, peer=peer.name
        )
        if instances and not cancelled() and tally.completed == 0:
            # pynetdicom ends a C-MOVE whose sub-operations all failed with 0xB000 (warning);
            # none completed is a failure (PS3.4 C.4.2.1.4.1): 0xA702, with every failed UID.
            log.warning(
                "move_failed",
                association_id=stats.association_id,
                destination=destination,
                reason=f"the destination stored none of the {len(instances)} instances",
            )
            yield 0xA702, None

    def on_get(self, event: evt.Event) -> Iterator[Any]:
        stats = self._stats_for(event.assoc)
        self._count("get", event)
        try:
            instances = self.retrieve(stats, "get", str(event.request.AffectedSOPClassUID),
                                      event.identifier)  # fmt: skip
        except QueryError as exc:
            yield 1  # pynetdicom answers 0 sub-operations with Success, whatever follows
            yield exc.status, None
            return
        except GatewayError:
            yield 1
            yield 0xA701, None
            return
        _send_stored_files(event.assoc)  # the sub-operations go over this association
        requestor = str(event.assoc.requestor.ae_title).strip()
        transcode = self.get_transcode(requestor)
        yield from self._send(
            cancel_check(event), stats, instances, "get", transcode=transcode, peer=requestor
        )

    def retrieve(
        self, stats: AssociationStats, kind: str, sop_class_uid: str, identifier: Dataset
    ) -> list[StoredInstance]:
        """The stored instances a C-MOVE or C-GET (*kind* "move" / "get") identifier names,
        on plain values. Blocks (reads the index): for a thread.

        Raises
        ------
        QueryError
            The identifier cannot be answered (logged as ``move_refused`` / ``get_refused``).
        GatewayError
            The index could not be read (logged as ``move_failed`` / ``get_failed``).
        """
        model: QueryModel = "patient" if sop_class_uid in _PATIENT_ROOT else "study"
        try:
            where, params = retrieve_filter(model, identifier)
            instances: list[StoredInstance] = self._bridge.call(
                self._store.instance_files, where, params
            )
        except QueryError as exc:
            log.warning(f"{kind}_refused", association_id=stats.association_id, reason=str(exc))
            raise
        except GatewayError as exc:
            log.error(f"{kind}_failed", association_id=stats.association_id, reason=str(exc))
            raise
        return instances

    def move_destination(self, stats: AssociationStats, title: str) -> PeerSettings | None:
        """The peer a C-MOVE's Move Destination names (its AE title); None, logged, when no
        `[[peers]]` entry has it."""
        peer = self._settings.peer_by_ae_title(title)
        if peer is None:
            log.warning("move_destination_unknown", association_id=stats.association_id,
                        destination=title)  # fmt: skip
        return peer

    def get_transcode(self, calling_ae: str) -> bool:
        """Whether a C-GET requestor may be sent re-encoded data sets: unless it is a peer
        configured with ``transcode = false``."""
        peer = self._settings.peer_by_ae_title(calling_ae)
        return peer.transcode if peer is not None else True

    def transferred(
        self, stats: AssociationStats, instances: list[StoredInstance], kind: str, peer: str
    ) -> None:
        """Audit the instances a C-MOVE or C-GET is about to send. Blocks: for a thread."""
        if self.audit is not None and instances:
            self.audit.record("DICOM Instances Transferred", studies=self._studies_of(instances),
                              association_id=stats.association_id, service=kind,
                              destination=peer, instances=len(instances),
                              **_who(stats))  # fmt: skip

    def _send(
        self,
        cancelled: Callable[[], bool],
        stats: AssociationStats,
        instances: list[StoredInstance],
        kind: str,
        *,
        transcode: bool,
        peer: str,
    ) -> Iterator[Any]:
        self.transferred(stats, instances, kind, peer)
        yield len(instances)
        for instance in instances:
            if cancelled():
                log.info(f"{kind}_cancelled", association_id=stats.association_id)
                yield 0xFE00, None
                return
            stats.sent += 1
            yield 0xFF00, _SubOperationDataset(instance, transcode=transcode, peer=peer)
        log.info(f"{kind}_done", association_id=stats.association_id, instances=len(instances))

    def _move_kwargs(
        self,
        instances: list[StoredInstance],
        peer: PeerSettings,
        tally: _SubOperations | None = None,
    ) -> dict[str, Any]:
        """Association arguments for the move destination: the storage contexts of what is sent
        (`storage_contexts`), and Verification, so that a destination that accepts none of the
        others still associates and each instance fails as a sub-operation (pynetdicom answers
        an association that could not be made with 0xA801, Move Destination unknown)."""
        pairs = sorted({(i.sop_class_uid, i.transfer_syntax) for i in instances})
        contexts = storage_contexts(pairs, transcode=peer.transcode, limit=MAX_CONTEXTS - 1)
        contexts.append(build_context(Verification))
        node = self._settings.node
        handlers = [
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_ACCEPTED, self.on_destination_accepted),  # before any sub-operation
        ]
        if tally is not None:
            handlers.append((evt.EVT_DIMSE_RECV, tally.on_message))
        return {
            "contexts": contexts,
            "max_pdu": node.max_pdu_size,
            "evt_handlers": handlers,
            "tls_args": tls_args(node, peer),  # None: plain DICOM
        }

    def on_destination_accepted(self, event: evt.Event) -> None:
        _send_stored_files(event.assoc)
