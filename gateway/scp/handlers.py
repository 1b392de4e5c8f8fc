"""What the DICOM node does for each request, on plain values: C-STORE, C-FIND, C-MOVE / C-GET
(which instances, to whom), MPPS, and the bookkeeping of associations (counted, logged,
audited).

The acceptor (`gateway.scp.acceptor`) decodes requests and sends responses; these methods
turn what a request asks into DIMSE statuses, here and nowhere else. The blocking ones run in
worker threads: index work goes to the store's writer (C-STORE) or over the `LoopBridge` to
the event loop (queries).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import structlog
from pydicom.dataset import Dataset
from pynetdicom.sop_class import (
    ModalityWorklistInformationFind,
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)

from gateway.audit import AuditLog
from gateway.config import PeerSettings, Settings
from gateway.errors import GatewayError
from gateway.metrics import Metrics, query_level, status_text
from gateway.scp.bridge import LoopBridge
from gateway.scp.receiving import DatasetSpool, place_received
from gateway.scp.worklist import AcquisitionServices
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

    def use_peers(self, settings: Settings) -> None:
        """Take the `[[peers]]` of reloaded settings (C-MOVE destinations); the rest stays."""
        self._settings = self._settings.model_copy(update={"peers": settings.peers})

    # -- MPPS ---------------------------------------------------------------------------------

    def n_create(
        self, attributes: Dataset, requested: str | None, calling_ae: str
    ) -> tuple[int, str | None]:
        """MPPS N-CREATE on plain values (`AcquisitionServices.mpps_create`): (status, the
        SOP Instance UID created). Blocks."""
        self.count("mpps")
        if self._acquisition is None:
            return 0x0110, None
        return self._acquisition.mpps_create(attributes, requested, calling_ae)

    def n_set(self, changes: Dataset, sop_uid: str) -> int:
        """MPPS N-SET on plain values (`AcquisitionServices.mpps_set`): the status. Blocks."""
        self.count("mpps")
        if self._acquisition is None:
            return 0x0110
        return self._acquisition.mpps_set(changes, sop_uid)

    def count(self, service: str, identifier: Dataset | None = None) -> None:
        """Count a request of *service*, with the Query/Retrieve level of its *identifier*."""
        level = "" if identifier is None else query_level(identifier)
        self.metrics.dimse_requests.labels(service=service, level=level).inc()

    def rejected(self, reason: str, calling: str, called: str, address: str | None) -> None:
        """An association refused by the node's policy: counted, logged, audited."""
        self.metrics.associations_rejected.labels(reason=reason).inc()
        log.info("association_rejected", reason=reason, calling_ae=calling, called_ae=called,
                 peer=address)  # fmt: skip
        if self.audit is not None:
            self.audit.record("Security Alert", outcome="refused", what="association rejected",
                              reason=reason, calling_ae=calling.strip(),
                              called_ae=called.strip(), address=address)  # fmt: skip

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

    async def store_received(
        self,
        stats: AssociationStats,
        sop_class_uid: str,
        sop_instance_uid: str,
        spool: DatasetSpool,
    ) -> int:
        """A C-STORE request's dataset, received into *spool*: check, store durably and index
        it (`place_received`); count the answer and the time it took; return the status
        (PS3.4 Table GG.4-1)."""
        started = time.perf_counter()
        status, size = await self._store_one(stats, sop_class_uid, sop_instance_uid, spool)
        metrics = self.metrics
        metrics.store_seconds.observe(time.perf_counter() - started)
        if status == 0x0000:
            metrics.instances_received.inc()
            metrics.received_bytes.inc(size)
        else:
            metrics.instances_refused.labels(status=status_text(status)).inc()
        return status

    async def _store_one(
        self,
        stats: AssociationStats,
        sop_class_uid: str,
        sop_instance_uid: str,
        received: DatasetSpool,
    ) -> tuple[int, int]:
        """(the C-STORE's status, the dataset's bytes as received)."""
        provenance = Provenance(
            calling_ae=stats.calling_ae,
            called_ae=stats.called_ae,
            peer_address=stats.peer_address,
            association_id=stats.association_id,
        )
        status, result = await place_received(
            self._store, received, provenance, (sop_class_uid, sop_instance_uid)
        )
        if result is None:
            stats.refused += 1
            return status, 0
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
        return 0x0000, received.dataset_bytes

    # -- C-FIND -------------------------------------------------------------------------------

    def find(
        self,
        stats: AssociationStats,
        sop_class_uid: str,
        identifier: Dataset,
        cancelled: Callable[[], bool],
    ) -> Iterator[tuple[int, Dataset | None]]:
        """C-FIND (PS3.4 C.4.1): (status, answer) pairs, one pending per match, then the final
        status; for the association's *stats*, the request's SOP class, its decoded identifier
        and a check that says once it was cancelled (C-CANCEL). Blocks between answers (reads
        the index): for a thread.

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
        stats.queries += 1
        if sop_class_uid == ModalityWorklistInformationFind:
            self.count("worklist")
            if self._acquisition is None:
                yield 0xC000, None
                return
            yield from self._acquisition.worklist_find(identifier, stats.calling_ae, cancelled)
            return
        self.count("find", identifier)
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
