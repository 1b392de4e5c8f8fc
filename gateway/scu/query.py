"""C-FIND SCU, C-MOVE SCU and C-GET SCU against an archive (Study Root).

Blocking functions for worker threads, used by retrieval (`gateway/retrieve/`). Each opens its
own association (`gateway.scu.association`), so a failure is always a `PeerError` naming the
peer: could not be reached, rejected the association, did not answer, or answered a failure
status. C-MOVE asks the archive to send to the gateway's own AE title (the archive must know it
as a DICOM modality); C-GET receives on the same association, each instance ingested into the
store as the C-STORE sub-operation arrives.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway.config import NodeSettings, PeerSettings
from gateway.errors import GatewayError, PeerError, RejectedInstance
from gateway.scp.receiving import DatasetSpool, encode_file_meta
from gateway.scu.association import associate, client_ae, no_answer
from gateway.store.index import Provenance
from gateway.store.store import Store

__all__ = ["FindSession", "RetrieveResult", "c_find", "c_get", "c_move", "identifier"]

_PENDING = frozenset({0xFF00, 0xFF01})
_WARNING = 0xB000
MAX_GET_STORAGE_CONTEXTS = 127  # one context of 128 is the C-GET model's


def identifier(level: str, **keys: str | list[str]) -> Dataset:
    """A Study Root identifier: QueryRetrieveLevel and the given keys (empty = return key)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


class FindSession:
    """One association for several C-FINDs (a study's series, then each series' instances).

    Blocking; use it as a context manager in a worker thread.
    """

    def __init__(self, node: NodeSettings, peer: PeerSettings) -> None:
        self.peer = peer
        ae = client_ae(node)
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self._assoc = associate(ae, node, peer)

    def __enter__(self) -> FindSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._assoc.is_established:
            self._assoc.release()

    def find(self, query: Dataset) -> list[Dataset]:
        """Every match the peer answers for *query* (Study Root)."""
        model = StudyRootQueryRetrieveInformationModelFind
        matches: list[Dataset] = []
        for status, answer in self._assoc.send_c_find(query, model):
            if "Status" not in status:
                raise no_answer(self.peer, "C-FIND", self._assoc.dimse_timeout)
            code = int(status.Status)
            if code in _PENDING:
                if answer is not None:
                    matches.append(answer)
                continue
            if code != 0x0000:
                raise PeerError(
                    "status", f"peer {self.peer.name} answered C-FIND with 0x{code:04X}"
                )
        return matches


def c_find(node: NodeSettings, peer: PeerSettings, query: Dataset) -> list[Dataset]:
    """Every match *peer* answers for *query* (Study Root), on an association of its own."""
    with FindSession(node, peer) as session:
        return session.find(query)


@dataclass
class RetrieveResult:
    """The final answer of a C-MOVE or C-GET, with its sub-operation counts."""

    status: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    stored: int = 0  # C-GET: instances the store took


@dataclass(eq=False)
class Progress:
    """Shared with the watcher of a retrieve: when the archive last said something, and a way
    to stop the retrieve (an abort of its association)."""

    last: float = field(default_factory=time.monotonic)
    assoc: Association | None = None
    abort: threading.Event = field(default_factory=threading.Event)

    def touch(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self.abort.set()
        assoc = self.assoc
        if assoc is not None:
            if assoc.is_alive():
                assoc.abort()
            # With no DIMSE timeout the requestor waits on its message queue forever: wake it.
            assoc.dimse.msg_queue.put((None, None))


def _counts(status: Dataset) -> tuple[int, int, int]:
    def value(keyword: str) -> int:
        raw = status.get(keyword)
        return int(raw) if raw is not None and raw != "" else 0

    return (
        value("NumberOfCompletedSuboperations"),
        value("NumberOfFailedSuboperations"),
        value("NumberOfWarningSuboperations"),
    )


def _collect(
    responses: Iterable[tuple[Dataset, Dataset | None]],
    peer: PeerSettings,
    what: str,
    progress: Progress,
) -> RetrieveResult:
    result: RetrieveResult | None = None
    for status, _ in responses:
        progress.touch()
        if progress.abort.is_set():
            break
        if "Status" not in status:
            raise no_answer(peer, what)
        code = int(status.Status)
        completed, failed, warning = _counts(status)
        if code in _PENDING:
            continue
        result = RetrieveResult(code, completed, failed, warning)
    if progress.abort.is_set():
        raise PeerError("stopped", f"peer {peer.name}: the {what} was stopped")
    if result is None:
        raise no_answer(peer, what)
    if result.status not in (0x0000, _WARNING):
        raise PeerError(
            "status",
            f"peer {peer.name} answered {what} with 0x{result.status:04X}"
            f" ({result.completed} completed, {result.failed} failed)",
        )
    return result


def c_move(
    node: NodeSettings,
    peer: PeerSettings,
    query: Dataset,
    progress: Progress | None = None,
) -> RetrieveResult:
    """Ask *peer* to C-STORE what *query* selects to the gateway's own AE title."""
    progress = progress or Progress()
    ae = client_ae(node)
    ae.dimse_timeout = None  # a long move answers pending only per sub-operation: the watcher
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
    assoc = associate(ae, node, peer)
    progress.assoc = assoc
    try:
        responses = assoc.send_c_move(
            query, node.ae_title, StudyRootQueryRetrieveInformationModelMove
        )
        return _collect(responses, peer, "C-MOVE", progress)
    finally:
        if assoc.is_established:
            assoc.release()


def c_get(
    node: NodeSettings,
    peer: PeerSettings,
    query: Dataset,
    sop_classes: Sequence[str],
    store: Store,
    progress: Progress | None = None,
    on_stored: Callable[[str], None] | None = None,
) -> RetrieveResult:
    """C-GET what *query* selects; each instance is ingested into *store* as it arrives.

    *sop_classes* are the storage SOP classes to accept (the IMAGE-level answers' SOPClassUID);
    at most 127 fit next to the C-GET context.
    """
    progress = progress or Progress()
    classes = list(dict.fromkeys(sop_classes))
    if len(classes) > MAX_GET_STORAGE_CONTEXTS:
        raise GatewayError(
            f"C-GET of {len(classes)} SOP classes: at most {MAX_GET_STORAGE_CONTEXTS} fit on one"
            " association"
        )
    ae = client_ae(node)
    ae.dimse_timeout = None
    contexts = [build_context(StudyRootQueryRetrieveInformationModelGet)]
    contexts += [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in classes]
    roles = [build_role(uid, scp_role=True) for uid in classes]
    stored = 0
    provenance = Provenance(
        calling_ae=peer.ae_title, called_ae=node.ae_title, peer_address=f"{peer.host}:{peer.port}"
    )

    def on_store(event: evt.Event) -> int:
        nonlocal stored
        progress.touch()
        request = event.request
        checksum: str | None = None
        try:  # the node's receive path streamed it to a file in the store's tmp/ already
            temp = Path(event.dataset_path)
            received = getattr(request, "_dataset_file", None)
            if isinstance(received, DatasetSpool):
                checksum = received.dataset_digest
        except AttributeError:  # received in memory (no node running in this process)
            temp = store.files.new_temp_path()
        try:
            if not temp.exists():
                _write_part10(temp, event)
            result = store.ingest_blocking(
                temp,
                provenance,
                expect=(str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID)),
                checksum=checksum,
            )
        except RejectedInstance as exc:
            temp.unlink(missing_ok=True)
            return exc.status
        except (GatewayError, OSError):
            temp.unlink(missing_ok=True)
            return 0xA700
        stored += 1
        if on_stored is not None:
            on_stored(result.sop_instance_uid)
        return 0x0000

    assoc = associate(
        ae, node, peer, contexts=contexts, ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )  # fmt: skip
    progress.assoc = assoc
    try:
        responses = assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
        result = _collect(responses, peer, "C-GET", progress)
    finally:
        if assoc.is_established:
            assoc.release()
    result.stored = stored
    return result


def _write_part10(path: Path, event: evt.Event) -> None:
    """The received dataset as a Part 10 file: File Meta, then the bytes as they came."""
    context = event.context
    request = event.request
    meta = encode_file_meta(
        str(request.AffectedSOPClassUID),
        str(request.AffectedSOPInstanceUID),
        str(context.transfer_syntax),
    )
    with path.open("xb") as out:
        out.write(b"\x00" * 128 + b"DICM")
        out.write(meta)
        out.write(request.DataSet.getvalue())
