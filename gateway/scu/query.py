"""C-FIND SCU, C-MOVE SCU and C-GET SCU against an archive (Study Root).

Used by retrieval (`gateway/retrieve/`), on the event loop. Associations are opened by
`gateway.scu.requestor.open_association`, so a failure is always a `PeerError` naming the
peer: could not be reached, rejected the association, did not answer, or answered a failure
status. C-FINDs share associations: a `FindSession` takes an idle one with the archive from
`IdleAssociations` and gives it back, so one association carries a retrieval's queries (the
study, then its series, then each series' instances) and the next retrieval's within
`[node] association_close_delay`. C-MOVE asks the archive to send to the gateway's own AE title
(the archive must know it as a DICOM modality); C-GET receives on the same association, each
instance streamed into the store's `tmp/` as its fragments arrive and ingested before its
C-STORE-RSP is sent (PS3.4 C.4.3).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import anyio.to_thread
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, build_context
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from gateway.config import NodeSettings, PeerSettings
from gateway.errors import GatewayError, PeerError
from gateway.net.association import Aborted, Association, Message
from gateway.net.dimse import C_STORE_RQ, Command, response
from gateway.scp.receiving import DatasetSpool, c_store_sink, place_received
from gateway.scu.requestor import (
    IdleAssociations,
    end_association,
    no_answer,
    open_association,
    proposal_of,
    request_command,
)
from gateway.store.index import Provenance
from gateway.store.store import Store

__all__ = [
    "FindSession",
    "Progress",
    "RetrieveResult",
    "c_find",
    "c_get",
    "c_move",
    "identifier",
]


_PENDING = frozenset({0xFF00, 0xFF01})
_WARNING = 0xB000
MAX_GET_STORAGE_CONTEXTS = 127  # one context of 128 is the C-GET model's
_FIND = StudyRootQueryRetrieveInformationModelFind


def identifier(level: str, **keys: str | list[str]) -> Dataset:
    """A Study Root identifier: QueryRetrieveLevel and the given keys (empty = return key)."""
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def _context(assoc: Association, sop_class: str) -> int:
    return next(cid for cid, cx in assoc.contexts.items() if cx.abstract_syntax == sop_class)


class FindSession:
    """C-FINDs on one association with *peer* (`async with`): one kept by *idle* when there
    is one, given back to it at the end (else released)."""

    def __init__(
        self, node: NodeSettings, peer: PeerSettings, idle: IdleAssociations | None = None
    ) -> None:
        self.node = node
        self.peer = peer
        self._idle = idle
        self._contexts = [build_context(_FIND)]
        self._assoc: Association | None = None

    async def __aenter__(self) -> FindSession:
        proposal = proposal_of(self._contexts)
        kept = self._idle.take(self.peer, proposal) if self._idle is not None else None
        self._assoc = kept or await open_association(self.node, self.peer, self._contexts)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        if self._idle is not None:
            await self._idle.give(self.peer, assoc, proposal_of(self._contexts))
        else:
            await end_association(assoc)

    async def find(self, query: Dataset) -> list[Dataset]:
        """Every match the peer answers for *query* (Study Root). An idle association the
        peer ended meanwhile is replaced once, before anything was answered on it."""
        assert self._assoc is not None, "use FindSession as an async context manager"
        if not self._assoc.is_established:
            await self._assoc.abort()
            self._assoc = await open_association(self.node, self.peer, self._contexts)
        return await self._find(self._assoc, query)

    async def _find(self, assoc: Association, query: Dataset) -> list[Dataset]:
        context_id = _context(assoc, _FIND)
        message_id = assoc.next_message_id()
        command = request_command(0x0020, message_id, _FIND)
        matches: list[Dataset] = []
        try:
            with assoc.awaiting(message_id) as responses:
                await assoc.send(context_id, command, assoc.encode_dataset(context_id, query))
                while True:
                    answer = await responses.next(self.node.dimse_timeout)
                    code = int(answer.command.Status)
                    if code in _PENDING:
                        if answer.data:
                            matches.append(assoc.decode_dataset(answer))
                        continue
                    if code != 0x0000:
                        raise PeerError(
                            "status", f"peer {self.peer.name} answered C-FIND with 0x{code:04X}"
                        )
                    return matches
        except Aborted as exc:
            raise no_answer(self.peer.name, "C-FIND", exc) from None


async def c_find(
    node: NodeSettings, peer: PeerSettings, query: Dataset, idle: IdleAssociations | None = None
) -> list[Dataset]:
    """Every match *peer* answers for *query* (Study Root)."""
    async with FindSession(node, peer, idle) as session:
        return await session.find(query)


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
    stopped: bool = False

    def touch(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self.stopped = True
        if self.assoc is not None:
            self.assoc.abort_nowait()


def _counts(status: Command) -> tuple[int, int, int]:
    def value(keyword: str) -> int:
        raw = status.get(keyword)
        return int(raw) if raw is not None else 0

    return (
        value("NumberOfCompletedSuboperations"),
        value("NumberOfFailedSuboperations"),
        value("NumberOfWarningSuboperations"),
    )


async def _retrieve(
    assoc: Association,
    command: Dataset,
    query: Dataset,
    peer: PeerSettings,
    what: str,
    progress: Progress,
) -> RetrieveResult:
    """Send a C-MOVE / C-GET request and collect its responses to the final one (no DIMSE
    timeout: a long retrieve answers only per sub-operation; the watcher stops a stalled one)."""
    context_id = _context(assoc, str(command.AffectedSOPClassUID))
    message_id = int(command.MessageID)
    try:
        with assoc.awaiting(message_id) as responses:
            await assoc.send(context_id, command, assoc.encode_dataset(context_id, query))
            while True:
                answer = (await responses.next(None)).command
                progress.touch()
                code = int(answer.Status)
                if code in _PENDING:
                    continue
                result = RetrieveResult(code, *_counts(answer))
                break
    except Aborted as exc:
        if progress.stopped:
            raise PeerError("stopped", f"peer {peer.name}: the {what} was stopped") from None
        raise no_answer(peer.name, what, exc) from None
    if result.status not in (0x0000, _WARNING):
        raise PeerError(
            "status",
            f"peer {peer.name} answered {what} with 0x{result.status:04X}"
            f" ({result.completed} completed, {result.failed} failed)",
        )
    return result


async def c_move(
    node: NodeSettings,
    peer: PeerSettings,
    query: Dataset,
    progress: Progress | None = None,
) -> RetrieveResult:
    """Ask *peer* to C-STORE what *query* selects to the gateway's own AE title."""
    progress = progress or Progress()
    model = StudyRootQueryRetrieveInformationModelMove
    assoc = await open_association(node, peer, [build_context(model)])
    progress.assoc = assoc
    try:
        command = request_command(
            0x0021, assoc.next_message_id(), model, MoveDestination=node.ae_title
        )
        return await _retrieve(assoc, command, query, peer, "C-MOVE", progress)
    finally:
        await end_association(assoc)


async def c_get(
    node: NodeSettings,
    peer: PeerSettings,
    query: Dataset,
    sop_classes: Sequence[str],
    store: Store,
    progress: Progress | None = None,
    on_stored: Callable[[str], None] | None = None,
) -> RetrieveResult:
    """C-GET what *query* selects; each instance is ingested into *store* as it arrives.

    *sop_classes* are the storage SOP classes to accept (the IMAGE-level answers' SOPClassUID),
    in the SCP role (SCP/SCU Role Selection, PS3.7 D.3.3.4); at most 127 fit next to the C-GET
    context.
    """
    progress = progress or Progress()
    classes = list(dict.fromkeys(sop_classes))
    if len(classes) > MAX_GET_STORAGE_CONTEXTS:
        raise GatewayError(
            f"C-GET of {len(classes)} SOP classes: at most {MAX_GET_STORAGE_CONTEXTS} fit on one"
            " association"
        )
    model = StudyRootQueryRetrieveInformationModelGet
    contexts = [build_context(model)]
    contexts += [build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in classes]
    assoc = await open_association(
        node, peer, contexts, roles={uid: (False, True) for uid in classes}
    )
    progress.assoc = assoc
    provenance = Provenance(
        calling_ae=peer.ae_title, called_ae=node.ae_title, peer_address=f"{peer.host}:{peer.port}"
    )
    assoc.sinks = functools.partial(c_store_sink, assoc, directory=store.files.tmp_dir,
                                    max_bytes=node.max_instance_bytes)  # fmt: skip
    stored = 0

    async def take(message: Message) -> None:
        nonlocal stored
        command = message.command
        sop_class = str(command.AffectedSOPClassUID)
        sop_instance = str(command.AffectedSOPInstanceUID)
        spool = message.sink
        status = 0xA700
        if isinstance(spool, DatasetSpool):
            status, placed = await place_received(store, spool, provenance,
                                                  (sop_class, sop_instance))  # fmt: skip
            if placed is not None:
                stored += 1
                if on_stored is not None:
                    on_stored(placed.sop_instance_uid)
        else:  # not a storage SOP class proposed: refused
            status = 0x0122
        await assoc.send_encoded(message.context_id, response(
            C_STORE_RQ | 0x8000, int(command.MessageID), status, sop_class, sop_instance
        ))  # fmt: skip

    async def serve() -> None:
        """The C-STORE sub-operations on this association, one at a time."""
        while True:
            try:
                message = await assoc.receive()
            except (Aborted, GatewayError):
                return
            progress.touch()
            if int(message.command.CommandField) == C_STORE_RQ:
                await take(message)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(serve)
            try:
                command = request_command(0x0010, assoc.next_message_id(), model)
                result = await _retrieve(assoc, command, query, peer, "C-GET", progress)
            finally:
                tg.cancel_scope.cancel()
    finally:
        await end_association(assoc)
    result.stored = stored
    return result
